"""Read a FLUX transformer GGUF file into canonical (BFL-named) MLX arrays, memory-mapped, one tensor
at a time: quantized layers as MLX affine triples, everything else dense in its stored dtype."""

import mmap
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, quants

from flux1.convert.transformer_bfl import strip_prefix
from flux1.gguf.blocks import DENSE, EXACT, GROUP, REQUANTIZED, SUPPORTED, row_bands, to_mlx_affine
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


def _release(reader: GGUFReader, tensor) -> None:
    """Drop a tensor's pages of the memory-mapped file from this process once it has been copied:
    clean file pages are reclaimable, but they count as resident memory until unmapped."""
    start = tensor.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
    reader.data._mmap.madvise(mmap.MADV_DONTNEED, start, tensor.data_offset + tensor.n_bytes - start)


def _requantized(raw: np.ndarray, qtype: T, shape: tuple[int, int], bits: int, group: int):
    """Dequantized by gguf-py and quantized by MLX a band of rows at a time."""
    rows, cols = shape
    raw_rows = raw.reshape(rows, -1)
    bands = []
    for first, last in row_bands(rows, cols):
        values = quants.dequantize(raw_rows[first:last], qtype).reshape(last - first, cols)
        bands.append(mx.quantize(mx.array(values), group_size=group, bits=bits))
        mx.eval(bands[-1])
    return tuple(mx.concatenate(parts) for parts in zip(*bands, strict=True))


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
            _release(reader, tensor)
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
            triple = _requantized(tensor.data, qtype, shape, bits, group)
        mx.eval(triple)
        _release(reader, tensor)
        quantized[name.removesuffix(".weight")] = QuantizedWeight(*triple, bits, group, shape, origin)
    return dense, quantized
