"""Ranks must run the same model with the same options: each rank hashes what it was given, the
digests are exchanged and any difference refuses the job at start, naming what differs."""

import hashlib
import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from flux1.distributed.ranks import gather


class RanksDisagree(ValueError):
    """Ranks started with different model files, options or settings."""


def fingerprint(*paths: Path) -> str:
    """What identifies model files without reading the weights: every file's relative name and size,
    and the full text of the small ones (configs, tokenizers, indexes: under 1 MB)."""
    lines = []
    for root in paths:
        root = Path(root)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for file in files:
            size = file.stat().st_size
            content = hashlib.sha256(file.read_bytes()).hexdigest() if size < 1 << 20 else ""
            lines.append(f"{file.relative_to(root) if root.is_dir() else file.name} {size} {content}")
    return "\n".join(lines)


def agree(fields: dict[str, object], group: mx.distributed.Group) -> None:
    """Refuse (on every rank, with the same message) unless every rank passed equal `fields`
    (JSON-able values, the same keys on every rank)."""
    if group.size() == 1:
        return
    names = sorted(fields)
    digests = np.stack(
        [
            np.frombuffer(hashlib.sha256(json.dumps(fields[n], sort_keys=True).encode()).digest(), np.uint8)
            for n in names
        ]
    )
    everyone = gather(digests, group)
    differ = [
        f"rank {rank}'s {name} differ from rank 0's"
        for rank in range(1, group.size())
        for i, name in enumerate(names)
        if not np.array_equal(everyone[rank, i], everyone[0, i])
    ]
    if differ:
        raise RanksDisagree(
            "the ranks were started with different inputs: "
            + "; ".join(differ)
            + " (every rank must see the same model files, options and settings)"
        )


def agree_on_model(flux, group: mx.distributed.Group) -> None:
    """Refuse a `Flux1` whose model files or options differ between the ranks."""
    files = flux.files
    options = {
        "base model": files.base_model,
        "transformer format": files.transformer_format,
        "quantize": flux.quantize,
        "group size": flux.group_size,
        "LoRAs": [[r.sha256, r.scale] for r in flux.lora_reports],
        "precision": flux.precision,
        "tensor parallel": flux.tensor_parallel,
    }
    agree({"model files": fingerprint(files.root, files.transformer, files.vae), "options": options}, group)
