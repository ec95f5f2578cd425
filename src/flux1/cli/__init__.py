"""Command-line programs (main.py, save.py) and how they end: an error is one line and exit code 2,
Ctrl-C is one line and exit code 130 (what a shell reports for SIGINT), never a traceback."""

import logging
import sys

from flux1.configs import BASE_MODELS


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


def add_model_source(group) -> None:
    """--model, --path, --gguf and --base-model, as every program that loads FLUX.1 takes them."""
    group.add_argument("--model", "-m", help="schnell or dev (from the Hugging Face hub), or a hub repo id")
    group.add_argument(
        "--path", help="a local diffusers folder, a folder saved by save.py, or a BFL .safetensors file"
    )
    group.add_argument(
        "--gguf", help="a GGUF transformer file (other components from --path, --model or the hub)"
    )
    group.add_argument("--base-model", choices=BASE_MODELS, help="which model --path is, when it cannot tell")
