"""Load the FLUX transformer from a GGUF file, keeping its quantized layers quantized: as the file's
blocks for the CPU kernels (expanded per layer, exact, 4.5 bits per weight for Q4_K), as MLX affine
quantization for MLX's kernels (`gguf/affine.py`)."""

from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

from flux1 import backend
from flux1.configs import check_config
from flux1.convert.transformer_bfl import infer_config
from flux1.gguf.affine import to_mlx_affine
from flux1.gguf.reader import GGUFFile, RawBlocks
from flux1.models.transformer import FluxTransformer
from flux1.nn.linear import Linear
from flux1.weights.assign import assign_weights
from flux1.weights.safetensors_io import Tensors, WeightFileError


def _placed(value: RawBlocks, cut) -> mx.array | None:
    """The blocks of a tensor-parallel rank's cut (read alone from the file) at their place in a lazy
    zero array of the whole layer's shape (so LoRAs fit as in one process; the cut drops the zeros)."""
    found = value.part(cut.axis, list(cut.ranges))
    if found is None:
        return None
    index, part = mx.array(found[0]), mx.array(found[1])
    placed = mx.zeros(value.raw.shape, mx.uint8)
    if cut.axis == 0:
        placed[index] = part
    else:
        placed[:, index] = part
    return placed


def load_transformer_gguf(
    path: Path, config: dict | None = None, cuts: Callable[[dict], dict] | None = None
) -> FluxTransformer:
    """`cuts` (tensor parallel): {layer path: the rank's cut} of a config; those layers' blocks are
    read in part and stay lazy until `shard_transformer` cuts and evaluates them."""
    path = Path(path)
    gguf_file = GGUFFile(path)
    model = FluxTransformer(config or check_config("transformer", infer_config(gguf_file.shapes, path), path))
    plan = cuts(model.config) if cuts else {}
    layers = dict(model.named_modules())
    keep_blocks = backend.numpy_kernels()
    tensors = Tensors()
    for name, value, origin in gguf_file.tensors():
        if not isinstance(value, RawBlocks):
            tensors.add(name, value, origin)
            continue
        module = name.removesuffix(".weight")
        layer = layers.get(module)
        if not isinstance(layer, Linear):
            raise WeightFileError(f"{origin}: belongs to no linear layer of the FLUX transformer")
        if (layer.output_dims, layer.input_dims) != value.shape:
            raise WeightFileError(
                f"{origin} has shape {list(value.shape)}, but the config expects "
                f"{[layer.output_dims, layer.input_dims]}"
            )
        placed = _placed(value, plan[module]) if module in plan else None
        if placed is not None:
            layer.set_gguf(placed, value.qtype)
            tensors.add(name, placed, origin)
            continue
        if keep_blocks:
            layer.set_gguf(mx.array(value.raw), value.qtype)
        else:
            layer.set_quantized(*to_mlx_affine(value.raw, value.qtype, value.shape[1]))
        for param in ("weight", "scales", "biases"):
            if param in layer:
                mx.eval(layer[param])
                tensors.add(f"{module}.{param}", layer[param], origin)
    assign_weights(model, tensors, f"transformer ({path})")
    return model
