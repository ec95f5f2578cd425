"""Load the FLUX transformer from a GGUF file, keeping its quantized layers quantized."""

from pathlib import Path

from flux1.configs import check_config
from flux1.convert.transformer_bfl import infer_config
from flux1.gguf.reader import read_gguf
from flux1.models.transformer import FluxTransformer
from flux1.nn.linear import Linear
from flux1.weights.assign import assign_weights
from flux1.weights.safetensors_io import WeightFileError


def load_transformer_gguf(path: Path, config: dict | None = None) -> FluxTransformer:
    path = Path(path)
    tensors, quantized = read_gguf(path)
    shapes = {n: a.shape for n, a in tensors.arrays.items()}
    shapes.update({f"{module}.weight": q.shape for module, q in quantized.items()})
    model = FluxTransformer(config or check_config("transformer", infer_config(shapes, path), path))
    layers = dict(model.named_modules())
    for module, q in quantized.items():
        layer = layers.get(module)
        if not isinstance(layer, Linear):
            raise WeightFileError(f"{q.origin}: belongs to no linear layer of the FLUX transformer")
        if (layer.output_dims, layer.input_dims) != q.shape:
            raise WeightFileError(
                f"{q.origin} has shape {list(q.shape)}, but the config expects {[layer.output_dims, layer.input_dims]}"
            )
        layer.set_quantized(q.weight, q.scales, q.biases, q.bits, q.group_size)
        for param in ("weight", "scales", "biases"):
            tensors.add(f"{module}.{param}", getattr(layer, param), q.origin)
    assign_weights(model, tensors, f"transformer ({path})")
    return model
