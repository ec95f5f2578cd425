"""GGUF quantized blocks read straight from their bytes: codes and, per group of 16 or 32 values, an
fp32 scale and offset, so that value = scale * code + offset.

Equal to gguf-py's dequantization bit for bit in fp32 for every type here: the f16 block scale (11
significant bits) times a sub-block scale (at most 7 bits) times a code (at most 6 bits) fits in fp32's
24, so `scale * code` is exact; the one rounding is the final addition of the offset, which gguf-py
makes too (`d * q - dm` rounds as `d * q + (-dm)`). Symmetric types store `q - c` with c = 2^(bits-1)
(Q3_K: 4): their offset is `-c * scale`, exact, and `scale * q - c * scale` is the exact
`scale * (q - c)` that gguf-py computes.

The CPU kernels re-lay Q4_K blocks in a form of their own, `Q4_K_PAIRED` (`to_cpu_form`, at a
layer's first expansion): the same bytes per block with each byte holding two consecutive codes, as
MLX packs 4-bit codes, so that they expand through the same integer pass as MLX's
(`nn/cpu_expansion.py`) instead of one strided pass per nibble plane.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from flux1.nn.numpy_cpu import CACHED_VALUES, in_parallel

_NIBBLE_SHIFTS = np.array([0, 4], np.uint8)[:, None]
_CRUMB_SHIFTS = np.array([0, 2, 4, 6], np.uint8)[:, None]
_BIT_SHIFTS = np.arange(8, dtype=np.uint8)[:, None]


Q4_K_PAIRED = "Q4_K paired"  # not a GGML type: flux1's form of Q4_K blocks (above)


@dataclass(frozen=True)
class Layout:
    bits: int  # width of a code
    group: int  # values sharing one scale and offset
    decode: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]
    # Codes packed as MLX packs 4-bit codes: the byte of a block they start at, and what `decode`
    # returns besides them (blocks -> fp32 scales, offsets).
    nibbles_from: int | None = None
    affine: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None


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


def _k_affine(blocks) -> tuple[np.ndarray, np.ndarray]:
    """Scales and offsets of Q4_K/Q5_K: the f16 d and dmin times 8 6-bit sub-block scales and mins
    packed in 12 bytes: bytes 0-3 hold the low 6 bits of scales 0-3, bytes 4-7 of mins 0-3; bytes
    8-11 the low nibbles of scales 4-7 and high nibbles of mins 4-7, whose top 2 bits are the top
    bits of bytes 0-3 and 4-7. Each field is unpacked 4 bytes at a time, as a uint32."""
    n = len(blocks)
    words = np.ascontiguousarray(blocks[:, :16]).view(np.uint32)  # d and dmin, then the 12 bytes
    low, high, mixed = words[:, 1], words[:, 2], words[:, 3]
    fields = np.empty((n, 4), np.uint32)  # as bytes: scales 0-7, then mins 0-7
    fields[:, 0] = low & 0x3F3F3F3F
    fields[:, 1] = (mixed & 0x0F0F0F0F) | ((low >> 2) & 0x30303030)
    fields[:, 2] = high & 0x3F3F3F3F
    fields[:, 3] = ((mixed >> 4) & 0x0F0F0F0F) | ((high >> 2) & 0x30303030)
    factors = words[:, :1].view(np.float16).astype(np.float32)  # [n, 2]: d, dmin
    products = fields.view(np.uint8).reshape(n, 2, 8) * factors[:, :, None]
    return products[:, 0], -products[:, 1]


def _q4_k(blocks):
    n = len(blocks)
    codes = _split(blocks[:, 16:].reshape(n, 4, 32), _NIBBLE_SHIFTS, 0xF).reshape(n, -1)
    return codes, *_k_affine(blocks)


def nibbles(packed: np.ndarray) -> np.ndarray:
    """uint8 codes [rows, 2 * bytes] of packed [rows, bytes] holding two 4-bit codes a byte, low
    nibble first (as MLX packs them). Each byte is widened to a uint16 holding its low code in its
    low byte and its high code in its high byte (x86 and ARM are little-endian): contiguous passes
    instead of writing each byte's two codes through strided views (benchmarks/gguf_expand.py on 2
    Zen 1 cores: a 3072 x 21504 weight in 116-158 ms against 137-166)."""
    pair = packed.astype(np.uint16)
    high = np.left_shift(pair, 4)
    np.bitwise_and(pair, 0x000F, out=pair)
    np.bitwise_and(high, 0x0F00, out=high)
    np.bitwise_or(pair, high, out=pair)
    return pair.view(np.uint8).reshape(len(packed), -1)


def _q4_k_paired(blocks):
    return nibbles(blocks[:, 16:]), *_k_affine(blocks)


def _pair_q4_k(blocks: np.ndarray) -> None:
    """Re-lays the codes of Q4_K `blocks` [n, 144] in place as `Q4_K_PAIRED` holds them. A file's
    block holds its values in 4 runs of 64, each as 32 bytes of (value i, value 32 + i) nibble
    pairs: read as 16 little-endian uint16 words, word j's low nibbles are values 2j and 2j + 1,
    its high nibbles values 32 + 2j and 33 + 2j."""
    words = blocks[:, 16:].view(np.uint16).reshape(-1, 4, 1, 16)
    low = words & np.uint16(0x0F0F)
    high = words >> np.uint16(4)
    high &= np.uint16(0x0F0F)
    low |= low >> np.uint16(4)  # each uint16's low byte: its first nibble | its third << 4
    high |= high >> np.uint16(4)
    pairs = blocks[:, 16:].reshape(-1, 4, 2, 16)  # written once both are read
    np.copyto(pairs[:, :, :1], low, casting="unsafe")  # the low bytes
    np.copyto(pairs[:, :, 1:], high, casting="unsafe")


def cpu_form(qtype: T | str) -> T | str:
    """The type the CPU kernels hold `qtype` blocks as: Q4_K as `Q4_K_PAIRED`, others as they are."""
    return Q4_K_PAIRED if qtype == T.Q4_K else qtype


def to_cpu_form(raw_rows: np.ndarray, qtype: T | str) -> T | str:
    """Re-lays raw_rows [rows, bytes per row] in place into `cpu_form(qtype)`, which it returns (for
    Q4_K a pass over the bytes, a cache-sized block at a time on all cores)."""
    if cpu_form(qtype) == qtype:
        return qtype
    if not (raw_rows.flags.c_contiguous and raw_rows.flags.writeable):
        raise ValueError("Q4_K blocks are re-laid in place: they must be writable, C-contiguous rows")
    nbytes = block_size(qtype)[1]
    step = max(1, 4 * CACHED_VALUES // raw_rows.shape[1])

    def pair(start: int, stop: int) -> None:
        for first in range(start, stop, step):
            _pair_q4_k(raw_rows[first : min(first + step, stop)].reshape(-1, nbytes))

    in_parallel(pair, len(raw_rows))
    return Q4_K_PAIRED


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
    Q4_K_PAIRED: Layout(4, 32, _q4_k_paired, nibbles_from=16, affine=_k_affine),
    T.Q5_K: Layout(5, 32, _q5_k),
    T.Q6_K: Layout(6, 16, _q6_k),
    T.Q3_K: Layout(3, 16, _q3_k),
    T.Q2_K: Layout(2, 16, _q2_k),
}
DENSE = (T.F32, T.F16, T.BF16)
SUPPORTED = (*(t for t in LAYOUTS if t != Q4_K_PAIRED), *DENSE)  # in files


def decode(blocks: np.ndarray, qtype: T | str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw blocks [n, bytes per block] -> (uint8 codes [n, values per block], fp32 scales and
    offsets [n, values per block / group])."""
    codes, scales, offsets = LAYOUTS[qtype].decode(blocks)
    return codes, scales.astype(np.float32, copy=False), offsets.astype(np.float32, copy=False)


def block_size(qtype: T | str) -> tuple[int, int]:
    """(values, bytes) of one `qtype` block."""
    return GGML_QUANT_SIZES[T.Q4_K if qtype == Q4_K_PAIRED else qtype]
