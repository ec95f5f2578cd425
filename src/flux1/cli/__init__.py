"""Command-line programs (main.py, save.py) and how they end: an error is one line and exit code 2,
Ctrl-C is one line and exit code 130 (what a shell reports for SIGINT), never a traceback."""

import logging
import sys


def run_program(run, argv: list[str] | None) -> int:
    logging.basicConfig(format="flux1: %(message)s", level=logging.INFO)
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    except (ValueError, OSError, NotImplementedError) as e:  # flux1's own errors are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
