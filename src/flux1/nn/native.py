"""Small C kernels (`native_expansion.c`, `native_attention.c`, `native_tiles.c`, with
`native_simd.h`) compiled for this CPU on first use,
where a C compiler is installed (`$CC`, else `cc`), and kept in flux1's cache folder under a name
made from everything the machine code depends on (the sources, the compiler's version, the flags,
the CPU model and its instruction sets: a home folder shared by different CPUs gets one build per
CPU). Where there is no compiler, or the build fails (with a warning), they are simply not offered:
the CPU plan measures only what is available (`cpu_expansion.expansion_paths`,
`cpu_attention.native_pair`).

One pass of compiled code over a quantized weight (codes to values and values to bf16 together,
vectorized for this CPU) where NumPy needs several and oneDNN two (`cpu_expansion.py`); and, where
the CPU has AVX512-BF16 (or AMX tiles), attention a block of query rows at a time, its
probabilities never leaving the cache, where the libraries' GEMMs write and read them back between
two products."""

import ctypes
import functools
import hashlib
import itertools
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

from flux1 import user_cache
from flux1.gguf.blocks import Q4_K_PAIRED, block_size
from flux1.nn.gemm import cpu_flags
from flux1.nn.numpy_cpu import in_parallel

SOURCES = tuple(
    Path(__file__).with_name(name) for name in ("native_expansion.c", "native_attention.c", "native_tiles.c")
)
HEADER = Path(__file__).with_name("native_simd.h")  # included by two of them
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC")
BITS = (3, 4, 5, 6, 8)  # the code widths `expand` takes
# Every GGUF type, as flux1 holds its blocks (gguf/blocks.py's cpu_form): `expand_blocks`'s kernel
BLOCKS = {
    T.Q2_K: "q2_k",
    T.Q3_K: "q3_k",
    Q4_K_PAIRED: "q4_k",
    T.Q5_K: "q5_k",
    T.Q6_K: "q6_k",
    T.Q4_0: "q4_0",
    T.Q4_1: "q4_1",
    T.Q5_0: "q5_0",
    T.Q5_1: "q5_1",
    T.Q8_0: "q8_0",
}
ATTENTION_BLOCK = 32  # `attend`'s query rows at a time; rows, keys and head_dim padded to multiples
_P = ctypes.c_void_p
_I = ctypes.c_int64


@functools.cache
def compiler() -> tuple[str, str] | None:
    """(the compiler's path, the first line of its --version), or None where there is none."""
    found = shutil.which(os.environ.get("CC") or "cc")
    if found is None:
        return None
    try:
        version = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = version.stdout.splitlines()
    return (found, lines[0].strip()) if version.returncode == 0 and lines else None


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built now if this machine has none yet; None where they cannot be."""
    from flux1.cpu_plan import cpu_model  # here: the plan imports the kernels that import this

    found = compiler()
    if found is None:
        return None
    sources = [source.read_bytes() for source in (*SOURCES, HEADER)]
    identity = repr((sources, found[1], FLAGS, cpu_model(), sorted(cpu_flags())))
    built = (
        user_cache.folder() / "native" / f"kernels-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.so"
    )
    try:
        if not built.is_file():
            build(found[0], built)
        try:
            kernels = ctypes.CDLL(str(built))
        except OSError as damaged:
            warnings.warn(f"flux1: rebuilding the native kernels {built} ({damaged})", stacklevel=2)
            build(found[0], built)
            kernels = ctypes.CDLL(str(built))
    except (OSError, RuntimeError) as error:
        warnings.warn(f"flux1: no native kernels ({error}); NumPy's and oneDNN's are used", stacklevel=2)
        return None
    return declared(kernels)


def declared(kernels: ctypes.CDLL) -> ctypes.CDLL:
    """`kernels` (a build of SOURCES) with its functions' argument types set, as ctypes needs them."""
    for bits, dtype in itertools.product(BITS, ("fp32", "bf16")):
        getattr(kernels, f"expand_{bits}_{dtype}").argtypes = [_P, _I, _I, _I, _P, _P, _I, _P, ctypes.c_int]
    for kind, dtype in itertools.product(BLOCKS.values(), ("fp32", "bf16")):
        getattr(kernels, f"expand_{kind}_{dtype}").argtypes = [_P, _I, _I, _P, ctypes.c_int]
    product = [_P, _I, _I, _P, _I, ctypes.c_int, _I, _I]  # x, rows, cols, y, y_stride, accumulate, rows of w
    kernels.affine_products.argtypes = [_P, _P, _I, _P, _P, _I, *product]
    kernels.block_products.argtypes = [_P, _P, _I, _I, _I, *product]
    kernels.q4_k_affine.argtypes = [_P, _I, _I, _P, _P]
    kernels.widen_bf16.argtypes = [_P, _I, _P, ctypes.c_int]
    if kernels.tile_kernels():
        kernels.tile_products.argtypes = [
            ctypes.POINTER(TileWeight),
            _P,
            _I,
            _I,
            _P,
            _I,
            ctypes.c_int,
            _P,
            _I,
            _I,
            ctypes.c_int,
        ]
        kernels.pack_tile_rows.argtypes = [_P, _I, ctypes.c_int, _I, _I, _I, _I, _P, _I, _I]
    if kernels.attention_kernels():
        for name in ("pack_rows", "pack_feature_pairs", "pack_row_pairs"):
            getattr(kernels, name).argtypes = [ctypes.POINTER(Source), _I, _I, _I, _I, _P, _I, _I]
        kernels.attend_bf16.argtypes = (
            [_P] * 3 + [_I] * 6 + [ctypes.c_float, _I, _P] + [_I] * 5 + [ctypes.c_int]
        )
    return kernels


def build(compiler_path: str, built: Path, sources: tuple[Path, ...] = SOURCES) -> None:
    """Compiles `sources` (the three files of SOURCES, or another tree's) into `built`, written whole: a
    new name first, then renamed."""
    built.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(suffix=".so", dir=built.parent)
    os.close(handle)
    try:
        result = subprocess.run(
            [compiler_path, *FLAGS, "-o", partial, *map(str, sources)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode:
            *others, last = (source.name for source in sources)
            names = f"{', '.join(others)} and {last}"
            raise RuntimeError(f"{compiler_path} failed on {names}: {result.stderr.strip()[-500:]}")
        os.replace(partial, built)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def expand(codes: np.ndarray, bits: int, scales: np.ndarray, offsets: np.ndarray, group: int, out) -> None:
    """out (fp32, or bf16 bits as uint16; C-contiguous) = code * scale + offset per group of `group`
    values, the codes given as units [units, bytes] (rows of uint8, each row's bytes contiguous,
    rows may be strided) of `bits`-bit codes packed as MLX packs them; scales and offsets
    C-contiguous fp32, one per group of out's values in order. out is a whole weight's rows, written
    past the cache where out is 64-byte aligned (`native_expansion.c`'s `stream`)."""
    units, unit_bytes = codes.shape
    assert codes.dtype == np.uint8 and codes.strides[1] == 1 and out.flags.c_contiguous and bits in BITS
    assert scales.flags.c_contiguous and offsets.flags.c_contiguous and scales.dtype == np.float32
    values = unit_bytes * 8 // bits
    assert out.size == units * values and scales.size == offsets.size == out.size // group
    function = getattr(library(), f"expand_{bits}_{'bf16' if out.dtype == np.uint16 else 'fp32'}")
    function(codes.ctypes.data, units, values, codes.strides[0], scales.ctypes.data, offsets.ctypes.data, group,
             out.ctypes.data, True)  # fmt: skip


def widen_bf16(values: np.ndarray, out: np.ndarray) -> None:
    """out (fp32, C-contiguous) = bf16 values (uint16 bits, C-contiguous) exactly, written past the
    cache as `expand` writes."""
    assert values.dtype == np.uint16 and out.dtype == np.float32 and values.shape == out.shape
    assert values.flags.c_contiguous and out.flags.c_contiguous
    library().widen_bf16(values.ctypes.data, values.size, out.ctypes.data, True)


def expand_blocks(qtype, blocks: np.ndarray, out: np.ndarray) -> None:
    """out (fp32, or bf16 bits as uint16; C-contiguous) = the values of GGUF blocks [count, block
    bytes] of a type in BLOCKS (each block's bytes contiguous), their scales decoded in the same
    pass; written past the cache as `expand` writes."""
    values, nbytes = block_size(qtype)
    assert blocks.dtype == np.uint8 and blocks.shape[1] == nbytes and blocks.strides[1] == 1
    assert out.flags.c_contiguous and out.size == values * len(blocks)
    function = getattr(library(), f"expand_{BLOCKS[qtype]}_{'bf16' if out.dtype == np.uint16 else 'fp32'}")
    function(blocks.ctypes.data, len(blocks), blocks.strides[0], out.ctypes.data, True)


def affine_products(
    codes: np.ndarray, bits: int, scales, offsets, group: int, x, out, accumulate: bool
) -> None:
    """out [rows, n] (+= with `accumulate`) x [rows, cols] @ W^T, W [n, cols] given as MLX's codes [n,
    bytes] (`expand`'s units) with fp32 scales and offsets [n, cols / group]: each row of W expanded
    to fp32 where the cache holds it, never the whole of W (`native_expansion.c`'s products); fp32
    sums, the rows of W split over the cores."""
    assert codes.dtype == np.uint8 and codes.strides[1] == 1 and bits in BITS
    assert (
        scales.flags.c_contiguous
        and offsets.flags.c_contiguous
        and scales.dtype == offsets.dtype == np.float32
    )
    expand = ctypes.cast(getattr(library(), f"expand_{bits}_fp32"), _P).value
    _products(x, out, accumulate, library().affine_products, expand, codes.ctypes.data, codes.strides[0],
              scales.ctypes.data, offsets.ctypes.data, group)  # fmt: skip


def block_products(qtype, blocks: np.ndarray, x, out, accumulate: bool) -> None:
    """`affine_products` for W given as GGUF blocks [n, blocks a row, block bytes] of a type in BLOCKS."""
    assert blocks.dtype == np.uint8 and blocks.strides[2] == 1 and blocks.shape[2] == block_size(qtype)[1]
    expand = ctypes.cast(getattr(library(), f"expand_{BLOCKS[qtype]}_fp32"), _P).value
    _products(x, out, accumulate, library().block_products, expand, blocks.ctypes.data, blocks.strides[0],
              blocks.shape[1], blocks.strides[1])  # fmt: skip


def _products(x: np.ndarray, out: np.ndarray, accumulate: bool, kernel, *weight) -> None:
    assert x.dtype == out.dtype == np.float32 and x.flags.c_contiguous and out.strides[1] == 4
    rows, cols = x.shape
    step = out.strides[0] // 4

    def part(first: int, last: int) -> None:
        kernel(*weight, x.ctypes.data, rows, cols, out.ctypes.data, step, accumulate, first, last)

    in_parallel(part, out.shape[1])


def _running(query: str) -> tuple[str, ...]:
    """How a kernel file's products run here, as its `query`() answers in bits: "tiles" (2: AMX, the
    kernels were built for a CPU with AMX-BF16 and Linux granted this process the tile registers),
    "vectors" (1: AVX512-BF16)."""
    kernels = library()
    found = getattr(kernels, query)() if kernels is not None else 0
    return tuple(name for bit, name in ((2, "tiles"), (1, "vectors")) if found & bit)


@functools.cache
def gemm_kernels() -> tuple[str, ...]:
    """How `tile_products` can compute its products here (`_running`)."""
    return _running("tile_kernels")


TILE_ROWS = 32  # tile_products' rows of W and of x at a time: W's rows are split over the cores by them


class TileWeight(ctypes.Structure):
    """`native_expansion.c`'s struct tile_weight: W for `tile_products`, bf16 rows or 4-bit codes;
    `arrays` keeps the NumPy arrays it points into alive as long as it is."""

    _fields_ = [
        ("data", _P), ("stride", _I), ("scales", _P), ("offsets", _P), ("groups", _I), ("group", _I), ("q4_k", _I),
        ("bf16_scales", _I),
    ]  # fmt: skip


def bf16_tiles(rows: int, row_stride: int) -> TileWeight:
    """W as bf16 values: its rows at address `rows`, `row_stride` values apart."""
    return TileWeight(rows, 2 * row_stride, None, None, 0, 0, 0, 0)


def code_tiles(codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray, group: int) -> TileWeight:
    """W as MLX's 4-bit codes [n, cols / 2] with scales and offsets [n, cols / group], fp32 or bf16
    bits (uint16) (group a multiple of 32)."""
    assert codes.dtype == np.uint8 and codes.strides[1] == 1 and group % 32 == 0
    assert scales.shape == offsets.shape == (len(codes), codes.shape[1] * 2 // group)
    assert scales.flags.c_contiguous and offsets.flags.c_contiguous
    assert scales.dtype == offsets.dtype and scales.dtype in (np.float32, np.uint16)
    made = TileWeight(codes.ctypes.data, codes.strides[0], scales.ctypes.data, offsets.ctypes.data,
                      scales.shape[1], group, 0, scales.dtype == np.uint16)  # fmt: skip
    made.arrays = (codes, scales, offsets)
    return made


def q4_k_tiles(blocks: np.ndarray) -> TileWeight:
    """W as Q4_K_PAIRED blocks [n, blocks a row, 144], the scales and offsets of their sub-blocks
    decoded here on all cores."""
    n, count, nbytes = blocks.shape
    assert blocks.dtype == np.uint8 and blocks.flags.c_contiguous and nbytes == block_size(Q4_K_PAIRED)[1]
    scales, offsets = (np.empty((n, count * 8), np.float32) for _ in range(2))

    def decode(first: int, last: int) -> None:
        library().q4_k_affine(blocks[first].ctypes.data, (last - first) * count, nbytes, scales[first].ctypes.data,
                              offsets[first].ctypes.data)  # fmt: skip

    in_parallel(decode, n)
    made = TileWeight(blocks.ctypes.data, blocks.strides[0], scales.ctypes.data, offsets.ctypes.data,
                      count * 8, 32, 1, 0)  # fmt: skip
    made.arrays = (blocks, scales, offsets)
    return made


def pack_tile_rows(parts: list[tuple[int, int, int, bool]], rows: int) -> np.ndarray:
    """x [rows, cols] given as its parts along cols, each (the address of its values, its rows'
    stride in values, its width: a multiple of 32, whether the values are fp32: rounded to the
    nearest bf16 as they are packed, else bf16 bits), laid out as `tile_products` takes it: panels
    of 16 rows (rows padded with zeros to a multiple of TILE_ROWS), each 32 columns of a panel a
    tile of 16 x 32."""
    width = sum(cols for _, _, cols, _ in parts)
    padded = -(-rows // TILE_ROWS) * TILE_ROWS
    out = np.empty(padded * width, np.uint16)
    start = 0
    for address, stride, cols, fp32 in parts:
        assert cols % 32 == 0
        call = functools.partial(
            library().pack_tile_rows, address, stride, fp32, rows, cols, start, width, out.ctypes.data
        )
        in_parallel(call, padded // 16)
        start += cols
    return out


def tile_products(weight: TileWeight, n: int, packed: np.ndarray, rows: int, out: int, out_stride: int,
                  accumulate: bool, bias: np.ndarray | None = None, kernel: str = "tiles") -> None:  # fmt: skip
    """out [rows, n] at address `out`, rows `out_stride` floats apart (+= with `accumulate`, else +
    `bias`, fp32 [n], where given: the sums start from it) = x @ W^T in AMX tiles or AVX512-BF16
    vectors (`kernel`, one of `gemm_kernels`; `native_expansion.c`'s tile_products: bf16 products,
    fp32 sums), x as `pack_tile_rows` packed it, W's n rows (a multiple of 32) `weight`; the rows of
    W split over the cores 32 at a time."""
    cols = packed.size // (-(-rows // TILE_ROWS) * TILE_ROWS)
    assert n % TILE_ROWS == 0 and cols % 32 == 0 and packed.dtype == np.uint16 and kernel in gemm_kernels()
    assert bias is None or (bias.shape == (n,) and bias.dtype == np.float32 and bias.flags.c_contiguous)
    address = None if bias is None else bias.ctypes.data

    def part(first: int, last: int) -> None:
        library().tile_products(weight, packed.ctypes.data, rows, cols, out, out_stride, accumulate, address,
                                first * TILE_ROWS, last * TILE_ROWS, kernel == "tiles")  # fmt: skip

    in_parallel(part, n // TILE_ROWS)


def description() -> str:
    """What the kernels are, for the plan's record: "C compiled by <the compiler's version>"."""
    return f"C compiled by {compiler()[1]}"


@functools.cache
def attention_kernels() -> tuple[str, ...]:
    """How `attend` can compute its products here (`_running`)."""
    return _running("attention_kernels")


class Source(ctypes.Structure):
    """Rows [begin, end) of each head of one of `attend_sources`' operands (`native_attention.c`'s
    struct source): from fp32 x [B, heads, tokens, features], each row's features contiguous; with
    `scale`, RMS-normed (eps), times scale and rotated by cos + i sin [B or 1, rows, features / 2]."""

    _fields_ = [
        ("x", _P), ("per_batch", _I), ("batch", _I), ("head", _I), ("row", _I), ("features", _I),
        ("begin", _I), ("end", _I), ("scale", _P), ("cos", _P), ("sin", _P), ("rope_batch", _I),
        ("eps", ctypes.c_float),
    ]  # fmt: skip


def source(x: np.ndarray, begin: int = 0, norm: tuple | None = None) -> tuple[Source, tuple]:
    """(x's rows as rows begin.. of an operand, the arrays it points into: keep them while it is used);
    norm: (scale [features], cos, sin [B or 1, rows, features / 2], eps), all fp32."""
    if x.dtype != np.float32 or x.strides[3] != 4:
        x = np.ascontiguousarray(x, np.float32)
    batch, heads, tokens, features = x.shape
    strides = [stride // 4 for stride in x.strides[:3]]
    kept = (x,)
    rope = (None, None, None, 0, 0.0)
    if norm is not None:
        scale, cos, sin, eps = norm
        scale, cos, sin = (np.ascontiguousarray(a, np.float32) for a in (scale, cos, sin))
        kept += (scale, cos, sin)
        rope_batch = cos[0].size if len(cos) > 1 else 0
        rope = (scale.ctypes.data, cos.ctypes.data, sin.ctypes.data, rope_batch, eps)
    made = Source(
        x.ctypes.data, heads, strides[0], strides[1], strides[2], features, begin, begin + tokens, *rope
    )
    return made, kept


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, out: np.ndarray, kernel: str) -> None:
    """out[b, h] = softmax(scale q k^T) v for fp32 q, k, v [B, heads, tokens, head_dim] (any strides;
    each row's features contiguous, or copied so): `attend_sources` of them."""
    attend_sources([source(q)], [source(k)], [source(v)], k.shape[2], scale, out, kernel)


def attend_sources(q: list, k: list, v: list, keys: int, scale: float, out: np.ndarray, kernel: str) -> None:
    """out[b, h] = softmax(scale q k^T) v, q, k and v given as `source`s of their rows (k and v: `keys`
    rows), the products' inputs and the probabilities in bf16, the sums in fp32, in `kernel` (one
    of `attention_kernels`; `native_attention.c`); out fp32 [B, heads, q_tokens, head_dim], each
    row contiguous. The operands are rounded and laid out as the products take them (normed and
    rotated where their source says), their tokens split over the cores, then the heads' blocks of
    query rows."""
    assert kernel in attention_kernels()
    assert scale > 0  # the kernel's largest score is the largest scaled score
    assert out.dtype == np.float32 and out.strides[3] == 4
    batch, heads, queries, dim = out.shape
    padded = [-(-n // ATTENTION_BLOCK) * ATTENTION_BLOCK for n in (queries, keys, dim)]
    kernels = library()
    q_in, k_in, v_in = (
        _packed(pack, sources, batch * heads, rows, padded[2])
        for pack, sources, rows in (
            (kernels.pack_rows, q, padded[0]),
            (kernels.pack_feature_pairs, k, padded[1]),
            (kernels.pack_row_pairs, v, padded[1]),
        )
    )
    strides = [stride // 4 for stride in out.strides[:3]]

    def blocks(first: int, last: int) -> None:
        kernels.attend_bf16(q_in.ctypes.data, k_in.ctypes.data, v_in.ctypes.data, *padded, queries, keys, dim,
                            scale, heads, out.ctypes.data, *strides, first, last, kernel == "tiles")  # fmt: skip

    in_parallel(blocks, batch * heads * padded[0] // ATTENTION_BLOCK)


def _packed(pack, sources: list, heads: int, rows: int, dim: int) -> np.ndarray:
    """An operand from its `source`s through one of the attention's packing kernels, each of the
    `heads` padded to rows x dim: [heads, rows, dim] bf16 bits, in the kernel's layout; blocks of 32
    rows (all heads) split over the cores."""
    made = (Source * len(sources))(*(made for made, _ in sources))
    out = np.empty((heads, rows, dim), np.uint16)

    def blocks(first: int, last: int) -> None:
        block = ATTENTION_BLOCK
        pack(made, len(sources), heads, rows, dim, out.ctypes.data, first * block, last * block)

    in_parallel(blocks, rows // ATTENTION_BLOCK)
    return out
