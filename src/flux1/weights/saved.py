"""flux1's own saved form of a component: canonical names, quantized layers as stored by MLX.

A component folder holds config.json and `flux1.safetensors` (or `flux1-0000K-of-0000N` shards
plus `flux1.safetensors.index.json`); the metadata of every shard records the quantization, so a
saved folder loads with no flag and no original weights.
"""

import json
from pathlib import Path

import mlx.nn as nn
from mlx.utils import tree_flatten

from flux1.nn.linear import Linear
from flux1.weights.assign import assign_weights
from flux1.weights.safetensors_io import Tensors, WeightFileError, read_folder
from flux1.weights.shards import write_sharded

STEM = "flux1"
_QUANTIZATION_KEY = "flux1_quantization"
SHARD_BYTES = 4 << 30


def is_saved(folder: Path) -> bool:
    folder = Path(folder)
    return (folder / f"{STEM}.safetensors").is_file() or (folder / f"{STEM}.safetensors.index.json").is_file()


def quantization_of(module: nn.Module) -> dict[str, list[int]]:
    """{layer path: [bits, group_size]} of the module's quantized layers (a GGUF source can mix them)."""
    return {
        path: [layer.bits, layer.group_size]
        for path, layer in module.named_modules()
        if isinstance(layer, Linear) and layer.is_quantized
    }


def bits_of(quantization: dict[str, list[int]]) -> int | str | None:
    """One number for a record: the bits of every quantized layer, "mixed", or None."""
    bits = {b for b, _ in quantization.values()}
    return None if not bits else bits.pop() if len(bits) == 1 else "mixed"


def save_component(module: nn.Module, folder: Path) -> None:
    """Write the module's parameters (canonical names) into `folder` as flux1 shards."""
    params = dict(tree_flatten(module.parameters()))
    names = list(params)
    sizes = [params[n].nbytes for n in names]
    shards = max(1, -(-sum(sizes) // SHARD_BYTES))
    metadata = {_QUANTIZATION_KEY: json.dumps(quantization_of(module))}
    write_sharded(folder, STEM, names, sizes, shards, lambda group: {n: params[n] for n in group}, metadata)


def saved_quantization(folder: Path) -> dict[str, list[int]]:
    return _quantization(read_folder(folder, STEM), Path(folder))


def _quantization(tensors: Tensors, folder: Path) -> dict[str, list[int]]:
    if _QUANTIZATION_KEY not in tensors.metadata:
        raise WeightFileError(f"{folder}: {STEM} shards without '{_QUANTIZATION_KEY}' metadata")
    return json.loads(tensors.metadata[_QUANTIZATION_KEY])


def load_saved_component(module: nn.Module, folder: Path, component: str) -> dict[str, list[int]]:
    """Load a saved component into `module` (built from its config.json); returns its quantization."""
    folder = Path(folder)
    tensors = read_folder(folder, STEM)
    quantization = _quantization(tensors, folder)
    for path, layer in module.named_modules():
        if isinstance(layer, Linear) and f"{path}.scales" in tensors:
            if path not in quantization:
                raise WeightFileError(
                    f"{tensors.origin(path + '.scales')}: no quantization recorded for '{path}'"
                )
            arrays = (tensors.arrays[f"{path}.{p}"] for p in ("weight", "scales", "biases"))
            layer.set_quantized(*arrays, *quantization[path])
    assign_weights(module, tensors, component)
    return quantization
