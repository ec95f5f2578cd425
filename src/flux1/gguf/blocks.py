"""GGUF blocks -> MLX affine quantization (w = scale * code + bias per group of 32 along a row).

Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K and Q5_K store, per 32 values, one scale and one offset (K-quants:
a super-block scale times a 6-bit sub-block scale), which is exactly MLX's affine form with fp32
scales. The codes are read back from gguf-py's own dequantization, `rint((w - bias) / scale)`, so the
bit layouts of the blocks are gguf-py's business and the values match it by construction.
"""

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

from flux1.nn.numpy_cpu import in_parallel

GROUP = 32


@dataclass(frozen=True)
class Affine:
    bits: int
    offset: float | None  # bias = offset * d for symmetric types; None: the block stores its own


# type -> bits and, for symmetric types, the fixed offset in units of d
EXACT = {
    T.Q8_0: Affine(8, -128.0),
    T.Q4_0: Affine(4, -8.0),
    T.Q5_0: Affine(5, -16.0),
    T.Q4_1: Affine(4, None),
    T.Q5_1: Affine(5, None),
    T.Q4_K: Affine(4, None),
    T.Q5_K: Affine(5, None),
}
DENSE = (T.F32, T.F16, T.BF16)
# No exact MLX form (16-value sub-blocks): dequantized, then re-quantized by MLX as (bits, group).
# Measured on random blocks (relative error against the GGUF values, bits per weight): Q6_K as 8/64
# 5e-3 at 8.5 b/w (6/32 would be 1.8e-2 at 7.0); Q3_K and Q2_K as 6/32 1.3e-2 and 1.0e-2 at 7.0 b/w
# (4/32: 7.5e-2 and 4.4e-2 at 5.0). Dequantizing to bf16 instead would cost 16 b/w.
REQUANTIZED = {T.Q6_K: (8, 64), T.Q3_K: (6, 32), T.Q2_K: (6, 32)}
SUPPORTED = (*EXACT, *REQUANTIZED, *DENSE)


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    return blocks[:, start : start + 2].copy().view(np.float16).astype(np.float32)[:, 0]


def group_scales(blocks: np.ndarray, qtype: T) -> tuple[np.ndarray, np.ndarray]:
    """fp32 (scale, bias) per 32 values, for raw blocks [n_blocks, block_bytes]."""
    if qtype in (T.Q4_K, T.Q5_K):
        d, dmin = _f16(blocks, 0), _f16(blocks, 2)
        sc, m = quants.Q4_K.get_scale_min(blocks[:, 4:16])
        return d[:, None] * sc.astype(np.float32), -(dmin[:, None] * m.astype(np.float32))
    d = _f16(blocks, 0)
    affine = EXACT[qtype]
    if affine.offset is not None:
        return d[:, None], (affine.offset * d)[:, None]
    return d[:, None], _f16(blocks, 2)[:, None]


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [rows, cols] -> MLX's packing: a little-endian bit stream per row, as uint32."""
    rows, cols = codes.shape
    stream = (codes[..., None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(stream.reshape(rows, cols * bits), axis=-1, bitorder="little").view(np.uint32)


def to_mlx_affine(raw: np.ndarray, qtype: T, shape: tuple[int, int]):
    """(codes uint32 [rows, cols*bits/32], scales fp32 [rows, cols/32], biases fp32, bits) of a tensor
    of logical `shape` [rows, cols] stored as raw bytes. Converted a band of rows at a time on each
    core, so the fp32 values of gguf-py's dequantization exist for one band per core only."""
    rows, cols = shape
    bits = EXACT[qtype].bits
    raw_rows = raw.reshape(rows, -1)  # every row holds whole blocks
    codes = np.empty((rows, cols * bits // 32), np.uint32)
    scales = np.empty((rows, cols // GROUP), np.float32)
    biases = np.empty((rows, cols // GROUP), np.float32)

    def convert(start: int, stop: int) -> None:
        for first, last in row_bands(stop - start, cols):
            band = slice(start + first, start + last)
            codes[band], scales[band], biases[band] = _band_affine(raw_rows[band], qtype, cols, bits)

    in_parallel(convert, rows)
    return codes, scales, biases, bits


def row_bands(rows: int, cols: int, values: int = 2**20):
    """(first, last) row ranges of about `values` values each."""
    step = max(1, values // cols)
    return [(first, min(first + step, rows)) for first in range(0, rows, step)]


def _band_affine(raw_rows: np.ndarray, qtype: T, cols: int, bits: int):
    rows = raw_rows.shape[0]
    _, type_size = quants.GGML_QUANT_SIZES[qtype]
    scales, biases = group_scales(raw_rows.reshape(-1, type_size), qtype)
    values = quants.dequantize(raw_rows, qtype).reshape(rows, cols // GROUP, GROUP)
    scales, biases = scales.reshape(rows, cols // GROUP), biases.reshape(rows, cols // GROUP)
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.rint((values - biases[..., None]) / scales[..., None])
    codes = np.where(scales[..., None] == 0, 0, codes).astype(np.uint8).reshape(rows, cols)
    return pack_codes(codes, bits), scales, biases
