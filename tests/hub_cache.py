"""A Hugging Face hub cache holding a fixture under a real repo id, for offline runs of the hub path
(`HF_HOME=<home>`, `HF_HUB_OFFLINE=1`)."""

import shutil
from pathlib import Path


def hub_cache(fixture: Path, home: Path, repo_id: str = "black-forest-labs/FLUX.1-schnell") -> Path:
    """Copy `fixture` into `<home>/hub` as the snapshot of `repo_id` (diffusers-layout files only, as
    flux1 downloads them); returns `home`."""
    snapshot = home / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots" / ("0" * 40)
    shutil.copytree(fixture, snapshot, ignore=shutil.ignore_patterns("*.safetensors", "ae*"))
    for sub in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        for file in (fixture / sub).glob("*.safetensors"):
            shutil.copy(file, snapshot / sub / file.name)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    return home
