"""GGUF quantized blocks read straight from their bytes: codes and, per group of 16 or 32 values, an
fp32 scale and offset, so that value = scale * code + offset.

Equal to gguf-py's dequantization bit for bit in fp32 for every type here: the f16 block scale (11
significant bits) times a sub-block scale (at most 7 bits) times a code (at most 6 bits) fits in fp32's
24, so `scale * code` is exact; the one rounding is the final addition of the offset, which gguf-py
makes too (`d * q - dm` rounds as `d * q + (-dm)`). Symmetric types store `q - c` with c = 2^(bits-1)
(Q3_K: 4): their offset is `-c * scale`, exact, and `scale * q - c * scale` is the exact
`scale * (q - c)` that gguf-py computes.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

_NIBBLE_SHIFTS = np.array([0, 4], np.uint8)[:, None]
_CRUMB_SHIFTS = np.array([0, 2, 4, 6], np.uint8)[:, None]
_BIT_SHIFTS = np.arange(8, dtype=np.uint8)[:, None]


@dataclass(frozen=True)
class Layout:
    bits: int  # width of a code
    group: int  # values sharing one scale and offset
    decode: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """fp32 [n, 1] of the f16 stored at byte `start` of each block."""
    return np.ascontiguousarray(blocks[:, start : start + 2]).view(np.float16).astype(np.float32)


def _split(packed: np.ndarray, shifts: np.ndarray, mask: int) -> np.ndarray:
    """Fields of each byte of packed [n, k, w], [n, k, len(shifts), w]: the field at shift s of
    byte i is value s * w + i of the run (how ggml lays out nibbles, 2-bit and 1-bit planes)."""
    return (packed[:, :, None, :] >> shifts) & np.uint8(mask)


def _q8_0(blocks):
    d = _f16(blocks, 0)
    return blocks[:, 2:] ^ np.uint8(0x80), d, -128 * d  # int8 q as the uint8 code q + 128


def _q4_0(blocks):
    n, d = len(blocks), _f16(blocks, 0)
    return _split(blocks[:, None, 2:], _NIBBLE_SHIFTS, 0xF).reshape(n, -1), d, -8 * d


def _q4_1(blocks):
    n = len(blocks)
    return _split(blocks[:, None, 4:], _NIBBLE_SHIFTS, 0xF).reshape(n, -1), _f16(blocks, 0), _f16(blocks, 2)


def _five_bit(low: np.ndarray, high_bits: np.ndarray) -> np.ndarray:
    """32 codes per block: nibbles | (bit i of the 4 bytes `high_bits`) << 4."""
    high = np.unpackbits(high_bits, axis=-1, bitorder="little")
    return low | (high << np.uint8(4))


def _q5_0(blocks):
    n, d = len(blocks), _f16(blocks, 0)
    low = _split(blocks[:, None, 6:], _NIBBLE_SHIFTS, 0xF).reshape(n, -1)
    return _five_bit(low, blocks[:, 2:6]), d, -16 * d


def _q5_1(blocks):
    n = len(blocks)
    low = _split(blocks[:, None, 8:], _NIBBLE_SHIFTS, 0xF).reshape(n, -1)
    return _five_bit(low, blocks[:, 4:8]), _f16(blocks, 0), _f16(blocks, 2)


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 6-bit sub-block scales and mins of Q4_K/Q5_K from their 12 bytes: bytes 0-3 hold the
    low 6 bits of scales 0-3, bytes 4-7 of mins 0-3; bytes 8-11 the low nibbles of scales 4-7 and
    high nibbles of mins 4-7, whose top 2 bits are the top bits of bytes 0-3 and 4-7."""
    d, m, md = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=1)
    mins = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=1)
    return scales, mins


def _k_affine(blocks) -> tuple[np.ndarray, np.ndarray]:
    scales, mins = _k_scales(blocks[:, 4:16])
    return _f16(blocks, 0) * scales, -(_f16(blocks, 2) * mins)


def _q4_k(blocks):
    n = len(blocks)
    codes = _split(blocks[:, 16:].reshape(n, 4, 32), _NIBBLE_SHIFTS, 0xF).reshape(n, -1)
    return codes, *_k_affine(blocks)


def _q5_k(blocks):
    n = len(blocks)
    low = _split(blocks[:, 48:].reshape(n, 4, 32), _NIBBLE_SHIFTS, 0xF).reshape(n, 8, 32)
    high = _split(blocks[:, None, 16:48], _BIT_SHIFTS, 1).reshape(n, 8, 32)  # sub-block j: bit j
    return (low | (high << np.uint8(4))).reshape(n, 256), *_k_affine(blocks)


def _q6_k(blocks):
    n = len(blocks)
    low = _split(blocks[:, :128].reshape(n, 2, 64), _NIBBLE_SHIFTS, 0xF).reshape(n, -1)
    high = _split(blocks[:, 128:192].reshape(n, 2, 32), _CRUMB_SHIFTS, 3).reshape(n, -1)
    scales = _f16(blocks, 208) * blocks[:, 192:208].view(np.int8)
    return low | (high << np.uint8(4)), scales, -32 * scales


def _q3_k(blocks):
    n = len(blocks)
    low = _split(blocks[:, 32:96].reshape(n, 2, 32), _CRUMB_SHIFTS, 3).reshape(n, -1)
    high = _split(blocks[:, None, :32], _BIT_SHIFTS, 1).reshape(n, -1)  # set: no -4 offset
    packed = blocks[:, 96:108]
    low_scales = _split(packed[:, None, :8], _NIBBLE_SHIFTS, 0xF).reshape(n, 16)
    high_scales = _split(packed[:, None, 8:], _CRUMB_SHIFTS, 3).reshape(n, 16)
    scales = _f16(blocks, 108) * ((low_scales | (high_scales << np.uint8(4))).astype(np.int8) - np.int8(32))
    return low | (high << np.uint8(2)), scales, -4 * scales


def _q2_k(blocks):
    n = len(blocks)
    codes = _split(blocks[:, 16:80].reshape(n, 2, 32), _CRUMB_SHIFTS, 3).reshape(n, -1)
    packed = blocks[:, :16]
    return codes, _f16(blocks, 80) * (packed & 0xF), -(_f16(blocks, 82) * (packed >> 4))


LAYOUTS = {
    T.Q8_0: Layout(8, 32, _q8_0),
    T.Q4_0: Layout(4, 32, _q4_0),
    T.Q4_1: Layout(4, 32, _q4_1),
    T.Q5_0: Layout(5, 32, _q5_0),
    T.Q5_1: Layout(5, 32, _q5_1),
    T.Q4_K: Layout(4, 32, _q4_k),
    T.Q5_K: Layout(5, 32, _q5_k),
    T.Q6_K: Layout(6, 16, _q6_k),
    T.Q3_K: Layout(3, 16, _q3_k),
    T.Q2_K: Layout(2, 16, _q2_k),
}
DENSE = (T.F32, T.F16, T.BF16)
SUPPORTED = (*LAYOUTS, *DENSE)


def decode(blocks: np.ndarray, qtype: T) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw blocks [n, bytes per block] -> (uint8 codes [n, values per block], fp32 scales and
    offsets [n, values per block / group])."""
    codes, scales, offsets = LAYOUTS[qtype].decode(blocks)
    return codes, scales.astype(np.float32, copy=False), offsets.astype(np.float32, copy=False)


def block_size(qtype: T) -> tuple[int, int]:
    """(values, bytes) of one `qtype` block."""
    return GGML_QUANT_SIZES[qtype]
