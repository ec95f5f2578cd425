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


def quantization_of(module: nn.Module) -> dict | None:
    """{"bits", "group_size"} of the module's quantized layers, or None if all are dense."""
    for _, layer in module.named_modules():
        if isinstance(layer, Linear) and layer.is_quantized:
            return {"bits": layer.bits, "group_size": layer.group_size}
    return None


def save_component(module: nn.Module, folder: Path) -> None:
    """Write the module's parameters (canonical names) into `folder` as flux1 shards."""
    params = dict(tree_flatten(module.parameters()))
    names = list(params)
    sizes = [params[n].nbytes for n in names]
    shards = max(1, -(-sum(sizes) // SHARD_BYTES))
    metadata = {_QUANTIZATION_KEY: json.dumps(quantization_of(module))}
    write_sharded(folder, STEM, names, sizes, shards, lambda group: {n: params[n] for n in group}, metadata)


def saved_quantization(folder: Path) -> dict | None:
    return _quantization(read_folder(folder, STEM), Path(folder))


def _quantization(tensors: Tensors, folder: Path) -> dict | None:
    if _QUANTIZATION_KEY not in tensors.metadata:
        raise WeightFileError(f"{folder}: {STEM} shards without '{_QUANTIZATION_KEY}' metadata")
    return json.loads(tensors.metadata[_QUANTIZATION_KEY])


def load_saved_component(module: nn.Module, folder: Path, component: str) -> dict | None:
    """Load a saved component into `module` (built from its config.json); returns its quantization."""
    folder = Path(folder)
    tensors = read_folder(folder, STEM)
    quantization = _quantization(tensors, folder)
    for path, layer in module.named_modules():
        if isinstance(layer, Linear) and f"{path}.scales" in tensors:
            if quantization is None:
                raise WeightFileError(
                    f"{tensors.origin(path + '.scales')}: quantized layer in an unquantized save"
                )
            arrays = (tensors.arrays[f"{path}.{p}"] for p in ("weight", "scales", "biases"))
            layer.set_quantized(*arrays, quantization["bits"], quantization["group_size"])
    assign_weights(module, tensors, component)
    return quantization
