"""Command-line programs (main.py, save.py, train.py) and how they end: an error is one line and exit
code 2, Ctrl-C is one line and exit code 130 (what a shell reports for SIGINT), never a traceback."""

import logging
import os
import sys

from flux1.configs import BASE_MODELS


def run_program(run, argv: list[str] | None, interrupted: str = "nothing was written") -> int:
    """run(arguments) with the errors and Ctrl-C turned into one line and an exit code. With `argv`
    None (run as a program, on sys.argv) Ctrl-C ends the process at once, after its line."""
    logging.basicConfig(format="flux1: %(message)s", level=logging.INFO)
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        print(f"interrupted: {interrupted}", file=sys.stderr)
        if argv is None:
            _exit_now(130)
        return 130
    except (ValueError, OSError, NotImplementedError) as e:  # flux1's own errors are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2


def _exit_now(code: int) -> None:
    """Exit without Python's teardown. After an interrupt, teardown joins the CPU kernels' worker
    threads and runs the native libraries' destructors, and an interrupt that lands while the pool
    starts a thread leaves one that is never told to stop, so teardown waits for it forever (seen
    under load). Nothing is left to clean up: files are written under temporary names and
    removed as the interrupt unwinds."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def add_model_source(group) -> None:
    """--model, --path, --gguf and --base-model, as every program that loads FLUX.1 takes them."""
    group.add_argument(
        "--model",
        "-m",
        help="schnell, dev, fill, kontext, canny or depth (from the Hugging Face hub), or a hub repo id",
    )
    group.add_argument(
        "--path", help="a local diffusers folder, a folder saved by save.py, or a BFL .safetensors file"
    )
    group.add_argument(
        "--gguf", help="a GGUF transformer file (other components from --path, --model or the hub)"
    )
    group.add_argument("--base-model", choices=BASE_MODELS, help="which model --path is, when it cannot tell")
