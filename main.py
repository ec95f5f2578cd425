"""Generate images with FLUX.1: python main.py --model schnell --prompt "..." (see --help)."""

import sys

from flux1.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
