"""Sharded safetensors as the Hugging Face libraries write them: `<stem>-0000K-of-0000N.safetensors`
plus `<stem>.safetensors.index.json`, or one `<stem>.safetensors`."""

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import mlx.core as mx


def split_evenly(sizes: Sequence[int], shards: int) -> list[list[int]]:
    """Indices of consecutive items, cut into at most `shards` groups of about equal total size."""
    total = max(sum(sizes), 1)
    groups: list[list[int]] = [[] for _ in range(max(1, min(shards, len(sizes))))]
    filled = 0
    for i, size in enumerate(sizes):
        groups[min(len(groups) - 1, (2 * filled + size) * len(groups) // (2 * total))].append(i)
        filled += size
    return [g for g in groups if g]


def write_sharded(
    folder: Path,
    stem: str,
    names: Sequence[str],
    sizes: Sequence[int],
    shards: int,
    make_tensors: Callable[[list[str]], dict[str, mx.array]],
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write the named tensors in `shards` files, asking `make_tensors` for one shard's tensors at a time
    (so only one shard is ever in memory). Returns the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    groups = split_evenly(sizes, shards)
    weight_map, files = {}, []
    for k, group in enumerate(groups):
        file = (
            f"{stem}.safetensors"
            if len(groups) == 1
            else f"{stem}-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        )
        shard_names = [names[i] for i in group]
        tensors = make_tensors(shard_names)
        mx.save_safetensors(str(folder / file), tensors, metadata={"format": "pt", **(metadata or {})})
        del tensors
        weight_map.update(dict.fromkeys(shard_names, file))
        files.append(folder / file)
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files
