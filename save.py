"""Save FLUX.1 (optionally quantized) for main.py --path: python save.py --path OUT --model schnell -q 4."""

import sys

from flux1.cli.save import main

if __name__ == "__main__":
    sys.exit(main())
