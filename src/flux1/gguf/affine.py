"""GGUF blocks -> MLX affine quantization (w = scale * code + bias per group along a row): the form
MLX's `quantized_matmul` multiplies by, on the MLX compute path (Metal, CUDA, FLUX1_COMPUTE=mlx).

Types with one scale and offset per 32 values map exactly, with fp32 scales (the decoded codes,
scales and offsets as they are). Q6_K, Q3_K and Q2_K have 16-value sub-blocks, which MLX's groups
(32, 64, 128) cannot express: they are expanded and re-quantized by MLX. Measured on random blocks
(relative error against the GGUF values, bits per weight): Q6_K as 8/64 5e-3 at 8.5 b/w (6/32 would be
1.8e-2 at 7.0); Q3_K and Q2_K as 6/32 1.3e-2 and 1.0e-2 at 7.0 b/w (4/32: 7.5e-2 and 4.4e-2 at 5.0).
"""

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as T

from flux1.gguf.blocks import LAYOUTS, block_size, decode
from flux1.gguf.expand import expanded
from flux1.nn.numpy_cpu import CACHED_VALUES, in_parallel

REQUANTIZED = {T.Q6_K: (8, 64), T.Q3_K: (6, 32), T.Q2_K: (6, 32)}


def mlx_form(qtype: T) -> tuple[int, int]:
    """(bits, group size) of a `qtype` weight as MLX affine quantization."""
    layout = LAYOUTS[qtype]
    return REQUANTIZED.get(qtype, (layout.bits, layout.group))


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [rows, cols] -> MLX's packing: a little-endian bit stream per row, as uint32."""
    rows, cols = codes.shape
    if bits == 8:
        return np.ascontiguousarray(codes).view(np.uint32)
    if bits == 4:
        return (codes[:, 0::2] | (codes[:, 1::2] << np.uint8(4))).view(np.uint32)
    stream = (codes[..., None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(stream.reshape(rows, cols * bits), axis=-1, bitorder="little").view(np.uint32)


def to_mlx_affine(raw_rows: np.ndarray, qtype: T, cols: int):
    """(codes, scales, biases, bits, group size) of raw_rows [rows, bytes per row], as MLX arrays."""
    rows = raw_rows.shape[0]
    bits, group = mlx_form(qtype)
    step = max(1, CACHED_VALUES // cols)
    if qtype in REQUANTIZED:
        bands = []
        for first in range(0, rows, 8 * step):  # fp32 values of one band in memory at a time
            values = expanded(raw_rows[first : first + 8 * step], qtype, cols)
            bands.append(mx.quantize(mx.array(values), group_size=group, bits=bits))
            mx.eval(bands[-1])
        return (*(mx.concatenate(parts) for parts in zip(*bands, strict=True)), bits, group)
    codes = np.empty((rows, cols * bits // 32), np.uint32)
    scales = np.empty((rows, cols // group), np.float32)
    offsets = np.empty((rows, cols // group), np.float32)

    def convert(start: int, stop: int) -> None:
        for first in range(start, stop, step):
            last = min(first + step, stop)
            c, s, o = decode(raw_rows[first:last].reshape(-1, block_size(qtype)[1]), qtype)
            codes[first:last] = pack_codes(c.reshape(last - first, cols), bits)
            scales[first:last], offsets[first:last] = s.reshape(last - first, -1), o.reshape(last - first, -1)

    in_parallel(convert, rows)
    return mx.array(codes), mx.array(scales), mx.array(offsets), bits, group
