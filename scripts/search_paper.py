"""Launch the paper search: ASHA over the `paper` space, sized for a 2-core CPU by default.

    python scripts/search_paper.py                # 16 trials at 128 pixels on the CPU
    python scripts/search_paper.py --smoke        # 2 trials of a few steps at 32 pixels
    python scripts/search_paper.py --gpu          # 32 trials at 512 pixels, a quarter GPU each

Any further arguments go to `stylemodule search` and override these.

    python scripts/search_paper.py --resume       # continue the interrupted search above
    python scripts/search_paper.py --gpu --resume # the same for the GPU search
    python scripts/search_paper.py --resume DIR   # continue the search in DIR
"""

from __future__ import annotations

import sys

from stylemodule.cli import main

CPU = ["--samples", "16", "--size", "128", "--steps", "400", "--eval-every", "25", "--image-every", "100",
       "--checkpoint-every", "100", "--grace-period", "50", "--reduction-factor", "2",
       "--output", "outputs/search-paper"]
SMOKE = ["--samples", "2", "--size", "32", "--steps", "6", "--eval-every", "3", "--grace-period", "3",
         "--output", "outputs/search-paper-smoke", "--overwrite"]
GPU = ["--samples", "32", "--size", "512", "--steps", "1000", "--eval-every", "50", "--image-every", "200",
       "--grace-period", "100", "--reduction-factor", "3", "--gpus-per-trial", "0.25", "--cpus-per-trial", "2",
       "--accelerator", "gpu", "--output", "outputs/search-paper-gpu"]


def build_argv(argv: list[str]) -> list[str]:
    """Return the `stylemodule` arguments for this script's arguments."""
    mode = CPU
    if "--smoke" in argv:
        mode, argv = SMOKE, [a for a in argv if a != "--smoke"]
    elif "--gpu" in argv:
        mode, argv = GPU, [a for a in argv if a != "--gpu"]
    if any(token.startswith("--resume=") for token in argv):
        return ["search", *argv]
    if "--resume" in argv:
        # `search --resume` takes the saved settings and no other options, so the mode's
        # options stay out. Without a folder, the mode's --output is resumed.
        index = argv.index("--resume")
        if index + 1 == len(argv) or argv[index + 1].startswith("-"):
            argv = [*argv[: index + 1], mode[mode.index("--output") + 1], *argv[index + 1:]]
        return ["search", *argv]
    return ["search", "--space", "paper", *mode, *argv]


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
        print("The options of `stylemodule search`, with its own defaults (the modes above set others):\n")
    sys.exit(main(build_argv(sys.argv[1:])))
