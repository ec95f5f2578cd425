"""Validated, lazy reading of safetensors files and sharded folders.

`mx.load` maps a safetensors file lazily (a tensor is read when first evaluated) and keeps its
stored dtype, but a damaged file fails deep inside MLX; the header is checked here first so the
error names the file and the tensor.
"""

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

_ITEM_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "U32": 4,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


class WeightFileError(ValueError):
    """A weight file or folder that cannot be used, with the file (and tensor) it concerns."""


@dataclass
class Tensors:
    """Named lazy arrays, each remembering where it was read from (for error messages)."""

    arrays: dict[str, mx.array] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def __contains__(self, name: str) -> bool:
        return name in self.arrays

    def __len__(self) -> int:
        return len(self.arrays)

    def names(self) -> list[str]:
        return list(self.arrays)

    def add(self, name: str, array: mx.array, origin: str) -> None:
        self.arrays[name] = array
        self.origins[name] = origin

    def pop(self, name: str) -> tuple[mx.array, str]:
        return self.arrays.pop(name), self.origins.pop(name)

    def origin(self, name: str) -> str:
        return self.origins.get(name, f"tensor '{name}'")

    def renamed(self, rename) -> "Tensors":
        """The same tensors under `rename(name)`; a name renamed to None is dropped."""
        out = Tensors(metadata=self.metadata)
        for name in self.names():
            array, origin = self.pop(name)
            new = rename(name)
            if new is not None:
                out.add(new, array, origin)
        return out


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file, checked against the file's size."""
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"{path}: file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightFileError(f"{path}: not a safetensors file ({size} bytes, no header)")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8 or length > 1 << 28:
            raise WeightFileError(f"{path}: not a safetensors file (no valid header length; {size} bytes)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise WeightFileError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise WeightFileError(f"{path}: not a safetensors file (its header is not a JSON object)")
    data_start = 8 + length
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            well_formed = (
                isinstance(shape, list)
                and all(type(n) is int and n >= 0 for n in [*shape, begin, end])
                and begin <= end
            )
        except (KeyError, TypeError, ValueError):
            well_formed = False
        if not well_formed:
            raise WeightFileError(f"{path}: tensor '{name}': malformed header entry")
        if dtype not in _ITEM_SIZES:
            raise WeightFileError(f"{path}: tensor '{name}': unsupported dtype {str(dtype)[:20]}")
        if end - begin != math.prod(shape) * _ITEM_SIZES[dtype]:
            raise WeightFileError(f"{path}: tensor '{name}': {end - begin} bytes for shape {shape} {dtype}")
        if data_start + end > size:
            raise WeightFileError(
                f"{path}: truncated: tensor '{name}' ends at byte {data_start + end}, file has {size}"
            )
    return header, data_start


def read_file(path: Path, into: Tensors | None = None) -> Tensors:
    """All tensors of one safetensors file, lazily, after checking its header."""
    path = Path(path)
    header, _ = read_header(path)
    tensors = into if into is not None else Tensors()
    try:
        arrays, metadata = mx.load(str(path), return_metadata=True)
    except Exception as e:  # MLX's own reader, as a second line of defence
        raise WeightFileError(f"{path}: cannot be read as safetensors ({e})") from None
    for name in header:
        if name != "__metadata__":
            tensors.add(name, arrays[name], f"{path}: tensor '{name}'")
    tensors.metadata.update(metadata)
    return tensors


def check_inside(folder: Path, name: str, named_by: Path) -> Path:
    """`folder / name` for a file name that a file of the model (an index, a model_index.json) gives:
    a relative path that stays inside the folder, or a refusal before anything is opened. Symbolic
    links inside the folder are followed (the Hugging Face cache is made of them): whoever can place a
    link in the folder already controls the model."""
    relative = Path(name)
    if not name or relative.is_absolute() or ".." in relative.parts or "\0" in name:
        raise WeightFileError(f"{named_by}: names '{name[:200]}', which is not a file inside {folder}")
    return folder / relative


def read_folder(folder: Path, stem: str) -> Tensors:
    """A component folder's weights: `<stem>.safetensors` or the shards its index names.

    stem is `diffusion_pytorch_model` (diffusers) or `model` (transformers)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightFileError(f"{folder}: folder not found")
    index = folder / f"{stem}.safetensors.index.json"
    single = folder / f"{stem}.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightFileError(f"{index}: not a safetensors index ({e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise WeightFileError(f"{index}: not a safetensors index (weight_map must map names to files)")
        shards = sorted(set(weight_map.values()))
        for shard in shards:  # every name checked before any file is opened
            check_inside(folder, shard, index)
        tensors = Tensors()
        for shard in shards:
            if not (folder / shard).is_file():
                raise WeightFileError(f"{index}: names shard {shard}, which is missing from {folder}")
            read_file(folder / shard, into=tensors)
        for name, shard in weight_map.items():
            if name not in tensors:
                raise WeightFileError(f"{folder / shard}: tensor '{name}' listed in {index.name} is missing")
        return tensors
    if single.is_file():
        return read_file(single)
    raise WeightFileError(f"{folder}: no {single.name} and no {index.name}")


def read_config(folder: Path, name: str = "config.json") -> dict:
    path = Path(folder) / name
    if not path.is_file():
        raise WeightFileError(f"{path}: file not found")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise WeightFileError(f"{path}: invalid JSON ({type(e).__name__})") from None
    if not isinstance(config, dict):
        raise WeightFileError(f"{path}: expected a JSON object")
    return config
