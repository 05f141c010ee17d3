"""Run the presets and one-factor variants of gatys2016, and tabulate their MAE.

    python scripts/reproduce.py --size 128 --steps 300 --output outputs/reproduce
    python scripts/reproduce.py --smoke            # every variant, 32 pixels, 3 steps

Each variant changes one setting of gatys2016 (or runs the tutorial preset). Noise
starts are repeated over --seeds so that differences can be read against the
seed-to-seed spread. Results go to OUTPUT/<variant>/seed<N>/ (a normal run folder) and
OUTPUT/summary.json; the table is printed as Markdown. Every run's settings and the
images are checked before the first run starts, and an OUTPUT that already contains
results is replaced only with --overwrite.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

from stylemodule.config import GATYS2016, TUTORIAL, StyleConfig
from stylemodule.data import resolve_data_dir
from stylemodule.errors import InputError, NonFiniteLossError
from stylemodule.files import atomic_write_text
from stylemodule.run import load_inputs, run_transfer

# The tutorial's Adam step, 0.003 in torchvision's normalised units, in the caffe input
# space (0..255 grey levels): 0.003 * 255 * 0.226, the mean of torchvision's stds.
TUTORIAL_CAFFE_LR = 0.17
SUMMARY_FILE = "summary.json"

# name -> (description, config). The tutorial runs on the caffe weights because
# torchvision's weights cannot be downloaded everywhere.
VARIANTS: dict[str, tuple[str, StyleConfig]] = {
    "gatys2016": ("the paper's settings", GATYS2016),
    "tutorial": (
        "tutorial preset, caffe weights, Adam lr 0.17",
        TUTORIAL.replace(weights="caffe", lr=TUTORIAL_CAFFE_LR),
    ),
    "max-pooling": ("gatys2016 with max pooling", GATYS2016.replace(pooling="max")),
    "no-normalisation": ("gatys2016 without the Gatys normalisation", GATYS2016.replace(normalize=False)),
    "content-init": ("gatys2016 starting from the content photo", GATYS2016.replace(init="content")),
    "adam": ("gatys2016 with Adam, lr 1 (input space 0..255)", GATYS2016.replace(optimizer="adam", lr=1.0)),
    "alpha-beta-8e-3": ("gatys2016 with alpha/beta 8e-3 (more content)", GATYS2016.replace(content_weight=8e-3)),
    "alpha-beta-8e-5": ("gatys2016 with alpha/beta 8e-5 (more style)", GATYS2016.replace(content_weight=8e-5)),
    "alpha-beta-8e-6": ("gatys2016 with alpha/beta 8e-6", GATYS2016.replace(content_weight=8e-6)),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--size", type=int, default=128, help="long edge in pixels")
    parser.add_argument("--steps", type=int, default=300, help="optimisation steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of noise starts")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="variants to run")
    parser.add_argument("--output", type=Path, default=Path("outputs/reproduce"), help="folder of the runs and summary.json")
    parser.add_argument("--data-dir", help="folder of the reference images")
    parser.add_argument("--smoke", action="store_true", help="32 pixels, 3 steps, seed 0; overrides --size, --steps and --seeds")
    parser.add_argument("--overwrite", action="store_true", help="replace the results already in --output")
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.steps, args.seeds = 32, 3, [0]
    args.seeds = list(dict.fromkeys(args.seeds))  # a repeated seed would repeat the same run
    return args


def plan_runs(args: argparse.Namespace) -> dict[str, dict[int, StyleConfig]]:
    """Return the config of every run, by variant and seed; raise InputError for a bad one."""
    data_dir = resolve_data_dir(args.data_dir)
    plan = {}
    for name in args.variants:
        config = VARIANTS[name][1]
        # A start from the content photo has no randomness: one seed is enough.
        seeds = args.seeds if config.init != "content" else args.seeds[:1]
        plan[name] = {
            seed: config.replace(
                size=args.size, steps=args.steps, seed=seed, eval_every=max(1, args.steps // 6),
                image_every=args.steps, checkpoint_every=args.steps, keep_checkpoints=1,
            ).with_absolute_paths(data_dir)
            for seed in seeds
        }
    return plan


def prepare_output(output: Path, overwrite: bool) -> None:
    """Reject an output folder with earlier results unless `overwrite`, which removes them.

    Results of variants left out of this run would otherwise stay beside the new ones.
    Only summary.json and the variant folders count as results; other files stay.
    """
    if output.exists() and not output.is_dir():
        raise InputError(f"output {output} is a file, not a folder; choose another --output")
    earlier = [output / name for name in (SUMMARY_FILE, *VARIANTS) if (output / name).exists()]
    if not earlier:
        return
    if not overwrite:
        raise InputError(
            f"output folder {output} already contains results ({', '.join(path.name for path in earlier)}); "
            "pass --overwrite to replace them, or choose another --output"
        )
    for path in earlier:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def run_variant(name: str, configs: dict[int, StyleConfig], args: argparse.Namespace) -> dict:
    runs = []
    for seed, run_config in configs.items():
        started = time.perf_counter()
        try:
            record = run_transfer(run_config, args.output / name / f"seed{seed}", progress_bar=False)
        except NonFiniteLossError as error:
            # L-BFGS without a line search can diverge; that is a result, not a crash.
            record = {"steps": error.step, "stop_reason": f"loss not finite at step {error.step}"}
        runs.append({"seed": seed, "seconds": round(time.perf_counter() - started, 1), **record})
    maes = [run["metric/mae"] for run in runs if "metric/mae" in run]
    return {
        "variant": name,
        "description": VARIANTS[name][0],
        "mae_mean": statistics.fmean(maes) if maes else math.nan,
        "mae_stdev": statistics.stdev(maes) if len(maes) > 1 else 0.0,
        "diverged": len(runs) - len(maes),
        "runs": runs,
    }


def markdown_table(results: list[dict]) -> str:
    lines = ["| variant | what changes | MAE mean | MAE std (seeds) | runs | diverged | seconds per run |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for result in sorted(results, key=lambda r: (math.isnan(r["mae_mean"]), r["mae_mean"])):
        seconds = statistics.fmean(run["seconds"] for run in result["runs"])
        lines.append(
            f"| {result['variant']} | {result['description']} | {result['mae_mean']:.4f} | "
            f"{result['mae_stdev']:.4f} | {len(result['runs'])} | {result['diverged']} | {seconds:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    try:
        plan = plan_runs(args)
        # The seeds of a variant share its images and sizes, so one load per variant checks them.
        for configs in plan.values():
            load_inputs(next(iter(configs.values())))
        prepare_output(args.output, args.overwrite)
    except InputError as error:
        print(f"reproduce.py: error: {error}", file=sys.stderr)
        return 2

    results = []
    for name, configs in plan.items():
        results.append(run_variant(name, configs, args))
        print(f"{name}: MAE {results[-1]['mae_mean']:.4f} ± {results[-1]['mae_stdev']:.4f}, "
              f"{results[-1]['diverged']} diverged", flush=True)
    summary = {"size": args.size, "steps": args.steps, "seeds": args.seeds, "results": results}
    atomic_write_text(args.output / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    print(markdown_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
