"""Entry point of the `stylemodule` command and of `python -m stylemodule`.

Importing the command line loads torch, which takes seconds. A Ctrl-C in that time
ends the command like one during a run: a line on stderr and exit code 130.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

from stylemodule.errors import EXIT_INTERRUPTED


def main() -> int:
    interrupted = False

    def on_interrupt(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupted
        interrupted = True
        raise KeyboardInterrupt

    previous = signal.getsignal(signal.SIGINT)
    try:
        # An import can catch the KeyboardInterrupt and go on, so the flag records it as well.
        if previous is signal.default_int_handler:
            signal.signal(signal.SIGINT, on_interrupt)
        from stylemodule.cli import main as cli_main
    except KeyboardInterrupt:
        interrupted = True
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        print("stylemodule: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
