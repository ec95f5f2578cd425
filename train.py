"""Train a FLUX.1 LoRA on your own images: python train.py --model dev --data DIR --output my.safetensors (see --help)."""

import sys

from flux1.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
