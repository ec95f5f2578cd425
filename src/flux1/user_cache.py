"""flux1's cache folder, `$XDG_CACHE_HOME/flux1` (`~/.cache/flux1`): what is measured or built once
per machine (the CPU plan, the tokenizers' pipelines). Its files are written whole and re-made, with
a warning, when they do not parse or no longer match what they were made from."""

import os
from pathlib import Path


def folder() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "flux1"
