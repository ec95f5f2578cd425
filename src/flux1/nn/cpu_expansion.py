"""A `Linear`'s weight expanded for the CPU's GEMMs: [out, in] in the GEMM's dtype (fp32, or bf16 as
uint16 bits), on all cores. Weights already in that dtype are used in place (zero-copy views); others
go into one scratch buffer reused by every layer, so a compact model holds one layer expanded at a
time.

Quantized weights (MLX's affine codes, GGUF blocks: value = scale * code + offset per group of a
row) are expanded one of three ways, the plan taking the fastest on this machine
(`cpu_plan.expansion()`, kind "expansion"):

- "numpy": codes widened to fp32, times the scales, plus the offsets, then rounded to bf16 for bf16
  GEMMs: a pass per operation (five for the rounding), a cache-sized block of rows per core.
- "onednn": each code c of b bits <= 7 written as the float 2^b + c, whose bits are 2^b's with c in
  the top of its mantissa (exact: bf16 has 7 mantissa bits), for MLX's 4-bit codes in one integer
  pass over the packed bytes; 8-bit codes converted as they are (exact in bf16 too). oneDNN's binary
  primitive then computes, per group, x * scale + (offset - 2^b * scale, the offset for 8-bit
  codes) and rounds to the target
  dtype in one compiled pass (`onednn.GroupAffine`; oneDNN 3.2 compiles it for floats of the
  target dtype, not for uint8 codes). (2^b + c) * scale is exact in fp32 where the scale has at
  most 23 - b significant bits (16 for 8-bit codes): bf16 or fp16 scales of MLX's (a model saved
  from bf16 or fp16 weights), and GGUF's but Q6_K's (f16 times 7 bits); then both ways give the
  same bits. Elsewhere
  oneDNN's value is within a few fp32 roundings of NumPy's.
- "native": one pass of C compiled for this CPU (`nn/native.py`, where a C compiler is installed)
  from the codes to the target dtype, NumPy's arithmetic (the same bits for MLX's codes), and for
  every GGUF type straight from its blocks, their scales decoded in the same pass (gguf-py's
  values, bit for bit). Where its stores are AVX-512's (4-bit codes, MLX's and Q4_K's), a whole
  weight is written past the cache into the cache-line-aligned scratch buffer: no line is read
  before it is written, none of the cache's is evicted.
"""

import threading
from dataclasses import dataclass
from functools import cache

import mlx.core as mx
import numpy as np

from flux1.gguf.blocks import LAYOUTS, Q4_K_PAIRED, block_size, cpu_form, decode, nibbles
from flux1.gguf.expand import expand_rows
from flux1.nn import native, onednn
from flux1.nn.numpy_cpu import CACHED_VALUES, as_float32, as_numpy, float32_values, in_parallel, round_to_bf16

# Products of at most this many rows (a modulation's: a row per image) with a quantized weight are
# computed from its codes (`product_from_codes`): a multiply-add or a few per weight value, where
# expanding the weight for a GEMM writes and reads back two or four bytes of each.
FEW_ROWS = 4
_MANTISSA_BITS = {"bf16": 7, "fp32": 23}
_TARGETS = {"bf16": np.uint16, "fp32": np.float32}
_scratch = np.empty(0, np.uint8)
scratch_lock = threading.RLock()  # held while the scratch buffer is written or read


@dataclass(frozen=True)
class ExpansionPath:
    name: str  # "<kernel> to <dtype>"
    kernel: str  # "numpy" or "onednn"
    library: str
    dtype: str  # what it expands to: the GEMM's input dtype


@cache
def expansion_paths() -> dict[str, ExpansionPath]:
    kernels = {"numpy": f"NumPy {np.__version__}"}
    if onednn.available():
        kernels["onednn"] = onednn.version()
    if native.library() is not None:
        kernels["native"] = f"C compiled by {native.compiler()[1]}"
    paths = [ExpansionPath(f"{k} to {d}", k, library, d) for k, library in kernels.items() for d in _TARGETS]
    return {path.name: path for path in paths}


def _codes(packed: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """uint8 codes [rows, cols] of rows packed as MLX does (a little-endian bit stream per row)."""
    raw = packed.view(np.uint8)
    if bits == 8:
        return raw
    rows = raw.shape[0]
    if bits == 4:
        return nibbles(raw)
    codes = np.empty((rows, cols // 8, 8), np.uint8)
    # Any width: 8 codes fill `bits` bytes; read them as one integer and shift each code out.
    octets = raw.reshape(rows, cols // 8, bits)
    word = octets[..., 0].astype(np.uint64)
    for i in range(1, bits):
        word |= octets[..., i].astype(np.uint64) << np.uint64(8 * i)
    mask = np.uint64((1 << bits) - 1)
    for k in range(8):
        codes[..., k] = (word >> np.uint64(k * bits)) & mask
    return codes.reshape(rows, cols)


def _offset_form(bits: int, dtype: str) -> tuple[int, int]:
    """(the bits of the float 2^bits in `dtype`, the shift that puts a code at the top of its
    mantissa): their OR is the float 2^bits + code."""
    mantissa = _MANTISSA_BITS[dtype]
    return (127 + bits) << mantissa, mantissa - bits


def _code_offset(bits: int) -> int:
    """What `_write_offset` adds to a code: 2^bits for codes of up to 7 bits, 0 for 8-bit codes
    (converted as they are: exact, 8 significant bits at most)."""
    return 2**bits if bits < 8 else 0


def _write_offset(codes: np.ndarray, bits: int, target: np.ndarray) -> None:
    """target (bf16 bits or fp32) = _code_offset(bits) + codes (uint8), the same shape."""
    dtype = "bf16" if target.dtype == np.uint16 else "fp32"
    if bits == 8 and dtype == "fp32":
        np.copyto(target, codes)
    elif bits == 8:  # an integer of 8 bits converted to fp32 leaves the low half zero: bf16 exactly
        target[...] = codes.astype(np.float32).view(np.uint16)[..., 1::2]  # little-endian: the upper half
    else:
        magic, shift = _offset_form(bits, dtype)
        integer = target.view(np.uint16 if dtype == "bf16" else np.uint32)
        np.left_shift(codes, shift, out=integer, dtype=integer.dtype)
        integer |= integer.dtype.type(magic)


def _write_offset_nibbles(packed: np.ndarray, target: np.ndarray) -> None:
    """_write_offset for MLX's 4-bit codes [rows, cols] straight from their packed rows: a byte's
    two codes become two adjacent values, one integer of twice their width. The byte times
    2^shift + 2^(width + shift - 4) holds its low code at bit `shift` and its high code at bit
    `width + shift` (copies between them are masked out)."""
    dtype = "bf16" if target.dtype == np.uint16 else "fp32"
    magic, shift = _offset_form(4, dtype)
    width = 8 * target.itemsize
    pairs = target.view(np.uint32 if width == 16 else np.uint64)
    wide = pairs.dtype.type
    both = 1 + (1 << width)
    np.multiply(packed.view(np.uint8), wide((1 << shift) + (1 << (width + shift - 4))), out=pairs, dtype=wide)
    pairs &= wide((0xF << shift) * both)
    pairs |= wide(magic * both)


def _expand_through_onednn(layer, out: np.ndarray) -> bool:
    """Expands the quantized `layer` into out [rows, cols] (bf16 bits or fp32) as its codes offset by
    `_code_offset`, then oneDNN's affine per group; False (nothing written) where oneDNN has only its
    reference code for the shape."""
    rows, cols = out.shape
    qtype = layer.gguf_type
    bits, group = (
        (LAYOUTS[qtype].bits, LAYOUTS[qtype].group) if qtype is not None else (layer.bits, layer.group_size)
    )
    affine = onednn.group_affine(rows * cols // group, group, "bf16" if out.dtype == np.uint16 else "fp32")
    if affine.implementation.startswith("ref"):  # slow: NumPy is faster
        return False
    raw, magic = as_numpy(layer.weight), np.float32(_code_offset(bits))
    if qtype is None:
        scales = as_float32(layer.scales)
        shifts = as_float32(layer.biases) - magic * scales

        def write(first, last):
            if bits == 4:
                _write_offset_nibbles(raw[first:last], out[first:last])
            else:
                _write_offset(_codes(raw[first:last], bits, cols), bits, out[first:last])
    else:
        layout, (values, nbytes) = LAYOUTS[qtype], block_size(qtype)
        scales = np.empty((rows, cols // group), np.float32)
        shifts = np.empty_like(scales)

        def keep(first, last, scale, offset):
            scales[first:last] = scale.reshape(last - first, -1)
            np.subtract(offset.reshape(last - first, -1), magic * scales[first:last], out=shifts[first:last])

        if layout.nibbles_from is None:

            def write(first, last):
                codes, scale, offset = decode(raw[first:last].reshape(-1, nbytes), qtype)
                _write_offset(codes.reshape(last - first, cols), bits, out[first:last])
                keep(first, last, scale, offset)
        else:
            # The scales first, over more rows at a time than the codes: a few rows' scales are
            # arrays small enough that NumPy's per-call work, under the GIL, would serialize the cores.
            def keep_affine(start, stop):
                step = max(1, 8 * CACHED_VALUES // cols)
                for first in range(start, stop, step):
                    last = min(first + step, stop)
                    keep(first, last, *layout.affine(raw[first:last].reshape(-1, nbytes)))

            in_parallel(keep_affine, rows)

            def write(first, last):
                codes = raw[first:last].reshape(-1, nbytes)[:, layout.nibbles_from :]
                _write_offset_nibbles(codes, out[first:last].reshape(-1, values))

    _blocks_of_rows(write, rows, cols * out.itemsize)
    affine(out, scales, shifts)
    return True


def _expand_native(layer, out: np.ndarray) -> None:
    """Expands the quantized `layer` into out [rows, cols] (bf16 bits or fp32) by the native kernel,
    a block of rows at a time: MLX's codes with their scales and biases, GGUF blocks with their
    scales decoded in the same pass."""
    rows, cols = out.shape
    raw = as_numpy(layer.weight)
    if layer.gguf_type is not None:
        blocks = raw.reshape(rows, -1, block_size(layer.gguf_type)[1])

        def write(first, last):
            native.expand_blocks(
                layer.gguf_type, blocks[first:last].reshape(-1, blocks.shape[2]), out[first:last]
            )
    else:
        scales, biases = (np.ascontiguousarray(as_float32(a)) for a in (layer.scales, layer.biases))

        def write(first, last):
            packed = raw[first:last].view(np.uint8)
            native.expand(
                packed, layer.bits, scales[first:last], biases[first:last], layer.group_size, out[first:last]
            )

    _blocks_of_rows(write, rows, cols * out.itemsize)


def product_from_codes(
    layer, x: np.ndarray, first: int, last: int, out: np.ndarray, accumulate: bool
) -> None:
    """out [rows, last - first] (+= with `accumulate`) x [rows, cols] (fp32) @ W[first:last]^T for a
    quantized `layer`, straight from its codes by the native kernels (`native.affine_products`,
    `native.block_products`): no row of W leaves the cache expanded."""
    layer.to_cpu_form()
    if layer.gguf_type is not None:
        raw = as_numpy(layer.weight)[first:last]
        blocks = raw.reshape(last - first, -1, block_size(layer.gguf_type)[1])
        native.block_products(layer.gguf_type, blocks, x, out, accumulate)
        return
    native.affine_products(*_affine_rows(layer, first, last), layer.group_size, x, out, accumulate)


def _affine_rows(
    layer, first: int, last: int, bf16_kept: bool = False
) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
    """(codes, bits, scales, offsets) of rows first..last of an MLX-quantized layer: the scales and
    offsets fp32 (only these rows converted), or with `bf16_kept` bf16 ones as stored (uint16 bits)."""
    scales, biases = (np.ascontiguousarray(as_numpy(a)[first:last]) for a in (layer.scales, layer.biases))
    if not (bf16_kept and scales.dtype == np.uint16):
        scales, biases = float32_values(scales), float32_values(biases)
    return as_numpy(layer.weight)[first:last].view(np.uint8), layer.bits, scales, biases


@dataclass(frozen=True)
class QuantizedPath:
    name: str  # EXPANDED, TILES or VECTORS
    library: str
    kernel: str | None = None  # `native.tile_products`' kernel, "tiles" or "vectors"; None: expanded


EXPANDED = "expanded for the GEMM"
TILES, VECTORS = "4-bit codes in AMX tiles", "4-bit codes in AVX512-BF16 vectors"


@cache
def quantized_paths() -> dict[str, QuantizedPath]:
    """How a layer of 4-bit codes (MLX's, GGUF Q4_K's) can be multiplied here: its weight expanded for the GEMM
    (`expanded_weight`), and where AMX tiles or AVX512-BF16 vectors run (`native.gemm_kernels`) from
    its codes in them (`tile_product`)."""
    paths = [QuantizedPath(EXPANDED, "flux1")]
    kernels = native.gemm_kernels() if native.library() is not None else ()
    names = {"tiles": TILES, "vectors": VECTORS}
    paths += [QuantizedPath(names[kernel], native.description(), kernel) for kernel in kernels]
    return {path.name: path for path in paths}


def fits_tiles(layer, widths: list[int], bounds: list[int]) -> bool:
    """Whether `tile_product` takes this layer, x given in parts of `widths` columns and the output
    in parts between `bounds`: MLX's 4-bit codes, GGUF Q4_K blocks or bf16 values, all of them
    multiples of 32."""
    if layer.gguf_type is not None:
        return cpu_form(layer.gguf_type) == Q4_K_PAIRED and all(size % 32 == 0 for size in [*widths, *bounds])
    if layer.bits is None:
        return layer.weight.dtype == mx.bfloat16 and all(size % 32 == 0 for size in [*widths, *bounds])
    return layer.bits == 4 and all(size % 32 == 0 for size in [layer.group_size, *widths, *bounds])


def tile_product(
    layer,
    packed: np.ndarray,
    rows: int,
    first: int,
    last: int,
    out: np.ndarray,
    accumulate: bool,
    bias: np.ndarray | None = None,
    kernel: str = "tiles",
):
    """out [rows, last - first] (+= with `accumulate`, else + `bias`, W's biases first..last, where
    given) x @ W[first:last]^T for a layer `fits_tiles` takes, x packed by `native.pack_tile_rows`,
    from W's codes (or bf16 values) in AMX tiles or AVX512-BF16 vectors (`kernel`;
    `native.tile_products`): bf16 products, fp32 sums, no row of W leaving the cache expanded."""
    layer.to_cpu_form()
    if layer.bits is None and layer.gguf_type is None:
        values = as_numpy(layer.weight)[first:last]
        values = values if values.strides[1] == 2 else np.ascontiguousarray(values)
        weight = native.bf16_tiles(values.ctypes.data, values.strides[0] // 2)
        weight.arrays = (values,)
    elif layer.gguf_type is not None:
        blocks = as_numpy(layer.weight)[first:last].view(np.uint8)
        weight = native.q4_k_tiles(blocks.reshape(last - first, -1, block_size(layer.gguf_type)[1]))
    else:
        # bf16 scales as they are stored: the kernel widens them as it reads them
        codes, _, scales, biases = _affine_rows(layer, first, last, bf16_kept=True)
        weight = native.code_tiles(codes, scales, biases, layer.group_size)
    assert out.strides[1] == 4 and out.shape == (rows, last - first)
    native.tile_products(
        weight, last - first, packed, rows, out.ctypes.data, out.strides[0] // 4, accumulate, bias, kernel
    )


def _scratch_matrix(rows: int, cols: int, dtype) -> np.ndarray:
    """[rows, cols] of the scratch buffer, 64-byte aligned (a cache line: the native kernels write
    whole lines past the cache)."""
    global _scratch
    size = rows * cols * np.dtype(dtype).itemsize
    if _scratch.size < size + 64:
        _scratch = np.empty(size + 64, np.uint8)
    start = -_scratch.ctypes.data % 64
    return _scratch[start : start + size].view(dtype).reshape(rows, cols)


def _blocks_of_rows(work, rows: int, row_bytes: int) -> None:
    """work(first, last) over blocks of rows of about one core's cache (row_bytes each, as they are
    worked on), the blocks spread over the cores."""
    step = max(1, 4 * CACHED_VALUES // row_bytes)

    def fill(start, stop):
        for first in range(start, stop, step):
            work(first, min(first + step, stop))

    in_parallel(fill, rows)


def expanded_weight(layer, dtype: str = "fp32", kernel: str = "numpy") -> np.ndarray:
    """The weight of a `Linear` as [out, in] in `dtype`: fp32, or bf16 (rounded to nearest, as
    uint16 bits), quantized codes expanded by `kernel` (an `ExpansionPath`'s). A view if it is
    stored so, else the scratch buffer (the caller holds it until done with it)."""
    layer.to_cpu_form()
    weight = layer.weight
    stored = {mx.float32: "fp32", mx.bfloat16: "bf16"}.get(weight.dtype) if layer.bits is None else None
    if stored == dtype:
        return as_numpy(weight)
    rows, cols = layer.output_dims, layer.input_dims
    out = _scratch_matrix(rows, cols, _TARGETS[dtype])
    if stored == "bf16":  # to fp32: exact, a shift (by the native kernel written past the cache)
        source = as_numpy(weight)

        def fill(start, stop):
            if kernel == "native":  # a weight cut by columns (tensor parallel): its rows copied whole
                native.widen_bf16(np.ascontiguousarray(source[start:stop]), out[start:stop])
            else:
                np.left_shift(source[start:stop], 16, out=out[start:stop].view(np.uint32), dtype=np.uint32)

        in_parallel(fill, rows)
        return out
    if kernel == "native" and layer.is_quantized:
        _expand_native(layer, out)
        return out
    if kernel == "onednn" and layer.is_quantized and _expand_through_onednn(layer, out):
        return out
    if layer.gguf_type is not None:
        raw = as_numpy(weight)

        def fp32_rows(first, last, target):
            expand_rows(raw[first:last], layer.gguf_type, target)
    elif layer.bits is None:
        source = as_numpy(weight)

        def fp32_rows(first, last, target):
            np.copyto(target, source[first:last])
    else:
        packed, groups = as_numpy(weight), cols // layer.group_size
        scales = as_float32(layer.scales)[..., None]
        biases = as_float32(layer.biases)[..., None]

        def fp32_rows(first, last, target):
            codes = _codes(packed[first:last], layer.bits, cols).reshape(last - first, groups, -1)
            grouped = target.reshape(last - first, groups, -1)
            # Widened first: NumPy's multiply of uint8 by fp32 casts through a buffer, slower than
            # a plain copy and two fp32 passes (the same values; `benchmarks/gguf_expand.py` on 2
            # Intel Xeon cores, 3072 x 21504 to fp32: 4-bit 56, 62 ms against 69, 67; 8-bit 46, 47
            # against 62, 59).
            np.copyto(grouped, codes)
            grouped *= scales[first:last]
            grouped += biases[first:last]

    if dtype == "fp32":
        _blocks_of_rows(lambda first, last: fp32_rows(first, last, out[first:last]), rows, 4 * cols)
        return out

    def bf16_rows(first, last):  # rounded while the fp32 block is still in the core's cache
        block = np.empty((last - first, cols), np.float32)
        fp32_rows(first, last, block)
        round_to_bf16(block, out[first:last])

    _blocks_of_rows(bf16_rows, rows, 4 * cols)
    return out
