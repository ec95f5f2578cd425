"""Read a FLUX transformer GGUF file into canonical (BFL-named) MLX arrays, memory-mapped, one tensor
at a time: quantized layers as MLX affine triples, everything else dense in its stored dtype."""

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, quants

from flux1.gguf.blocks import DENSE, EXACT, GROUP, REQUANTIZED, SUPPORTED, to_mlx_affine
from flux1.loaders.transformer import strip_prefix
from flux1.weights.safetensors_io import Tensors, WeightFileError


@dataclass
class QuantizedWeight:
    weight: mx.array  # uint32 codes
    scales: mx.array
    biases: mx.array
    bits: int
    group_size: int
    shape: tuple[int, int]  # logical [out, in]
    origin: str


def _architecture(reader: GGUFReader) -> str | None:
    field = reader.fields.get("general.architecture")
    return None if field is None else bytes(field.parts[field.data[0]]).decode()


def _dense(data: np.ndarray, qtype: T) -> mx.array:
    if qtype == T.BF16:
        return mx.array(np.ascontiguousarray(data).view(np.uint16)).view(mx.bfloat16)
    return mx.array(np.ascontiguousarray(data))


def read_gguf(path: Path) -> tuple[Tensors, dict[str, QuantizedWeight]]:
    """(dense tensors, quantized weights by module path) of a FLUX GGUF file."""
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"{path}: file not found")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # gguf-py raises many kinds on damaged files
        raise WeightFileError(
            f"{path}: not a readable GGUF file, truncated or corrupt ({type(e).__name__}: {e})"
        ) from None
    architecture = _architecture(reader)
    if architecture != "flux":
        raise WeightFileError(
            f"{path}: general.architecture is '{architecture}', expected 'flux' (a FLUX.1 transformer)"
        )
    dense, quantized = Tensors(), {}
    for tensor in reader.tensors:
        name, qtype = strip_prefix(tensor.name), tensor.tensor_type
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        origin = f"{path}: tensor '{tensor.name}' ({qtype.name})"
        if qtype not in SUPPORTED:
            supported = ", ".join(t.name for t in SUPPORTED)
            raise WeightFileError(f"{origin}: unsupported type; supported: {supported}")
        if qtype in DENSE:
            dense.add(name, _dense(tensor.data, qtype).reshape(shape), origin)
            continue
        if len(shape) != 2 or not name.endswith(".weight"):
            raise WeightFileError(
                f"{origin}: quantized tensor of shape {list(shape)}; only 2-D weights can be"
            )
        if qtype in EXACT:
            codes, scales, biases, bits = to_mlx_affine(tensor.data, qtype, shape)
            triple, group = (mx.array(codes), mx.array(scales), mx.array(biases)), GROUP
        else:
            bits, group = REQUANTIZED[qtype]
            values = mx.array(quants.dequantize(tensor.data, qtype).reshape(shape))
            triple = mx.quantize(values, group_size=group, bits=bits)
        mx.eval(triple)
        quantized[name.removesuffix(".weight")] = QuantizedWeight(*triple, bits, group, shape, origin)
    return dense, quantized
