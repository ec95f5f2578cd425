"""The GEMMs the CPU plan chooses between: `out = alpha * a @ b` with fp32 output, either in fp32 or
with bf16 inputs and fp32 accumulation, through NumPy's BLAS, the BLAS `_blas.py` loaded (MKL's
cblas, called in place on NumPy's buffers: MLX's matmul would run the same kernel after copying
both operands into MLX arrays), oneDNN, or flux1's own in AMX tiles or AVX512-BF16 vectors
(`native.tile_products`).

Which is fastest depends on the CPU (MKL picks slow kernels on AMD; oneDNN's bf16 kernels need
AVX512-BF16 or AMX), so `cpu_plan.py` times them; this module only runs them. Operands are NumPy
matrices, row-major or transposed views of row-major ones; bf16 operands are uint16 bit patterns.
"""

import ctypes
import functools
import re
from dataclasses import dataclass

import numpy as np

from flux1 import _blas
from flux1.nn import onednn
from flux1.nn.numpy_cpu import as_bf16, float32_values

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


@dataclass(frozen=True)
class GemmPath:
    name: str  # "numpy fp32", "mkl fp32", "onednn fp32", "onednn bf16", "mkl bf16", TILES, VECTORS, ...
    library: str  # with its version, for the plan's description and cache key
    dtype: str  # "fp32" or "bf16": what the inputs are rounded to; the sum is always fp32
    _call: object = None  # (trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc); None: NumPy


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def has_bf16_instructions() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def numpy_blas() -> str:
    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    return f"NumPy {np.__version__} ({blas.get('name', '?')} {blas.get('version', '?')})"


@functools.cache
def available_paths() -> dict[str, GemmPath]:
    """Every GEMM this process can run; bf16 ones only where the CPU has bf16 instructions (elsewhere
    the libraries emulate them, far slower than fp32)."""
    paths = [GemmPath("numpy fp32", numpy_blas(), "fp32")]
    bf16 = has_bf16_instructions()
    if _blas.library is not None and _blas.loaded.startswith("MKL"):
        mkl = _blas.library
        version = ctypes.create_string_buffer(256)
        mkl.MKL_Get_Version_String(version, 256)
        text = version.value.decode(errors="replace")
        name = "MKL " + (re.search(r"Version ([0-9.]+)", text) or re.search("(.*)", text)).group(1)
        paths.append(GemmPath("mkl fp32", name, "fp32", _cblas(mkl.cblas_sgemm)))
        if bf16:
            paths.append(GemmPath("mkl bf16", name, "bf16", _cblas(mkl.cblas_gemm_bf16bf16f32)))
    dnnl = _blas.onednn()
    if dnnl is not None:
        name = onednn.version()
        paths.append(GemmPath("onednn fp32", name, "fp32", _dnnl(dnnl.dnnl_sgemm)))
        if bf16:
            paths.append(GemmPath("onednn bf16", name, "bf16", _dnnl(dnnl.dnnl_gemm_bf16bf16f32)))
        paths.append(GemmPath("onednn matmul fp32", name, "fp32", _matmul("fp32")))
        if bf16:
            paths.append(GemmPath("onednn matmul bf16", name, "bf16", _matmul("bf16")))
    from flux1.nn import native  # here: it builds its kernels with this module's CPU flags

    library_gemms = [path for path in paths if path.dtype == "bf16" and path._call is not None]
    if library_gemms and native.library() is not None:
        for name, kernel in NATIVE_KERNELS.items():
            if kernel in native.gemm_kernels():
                call = _native(native, kernel, library_gemms[0]._call)
                paths.append(GemmPath(name, native.description(), "bf16", call))
    return {path.name: path for path in paths}


TILES, VECTORS = "native tiles bf16", "native vectors bf16"
NATIVE_KERNELS = {TILES: "tiles", VECTORS: "vectors"}  # flux1's own GEMMs: `native.tile_products`' kernel


def _native(native, kernel: str, other):
    """flux1's own GEMM in AMX tiles or AVX512-BF16 vectors (`native.tile_products`) for the products
    it takes: a @ W^T (W's rows in memory as Linear holds them), alpha 1, N and K multiples of 32;
    `other`, a library's bf16 GEMM, for the rest."""

    def call(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        if trans_a or not trans_b or alpha != 1.0 or n % 32 or k % 32:
            other(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
            return
        packed = native.pack_tile_rows([(a, lda, k, False)], m)
        native.tile_products(native.bf16_tiles(b, ldb), n, packed, m, c, ldc, beta != 0.0, kernel=kernel)

    return call


def _cblas(function):
    dim, pointer = ctypes.c_int, ctypes.c_void_p  # MKL's LP64 interface: 32-bit sizes
    function.argtypes = [dim] * 6 + [ctypes.c_float, pointer, dim, pointer, dim, ctypes.c_float, pointer, dim]
    function.restype = None

    def call(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        ta, tb = (_TRANS if t else _NO_TRANS for t in (trans_a, trans_b))
        function(_ROW_MAJOR, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)

    return call


def _dnnl(function):
    dim, pointer = ctypes.c_int64, ctypes.c_void_p
    function.argtypes = [ctypes.c_char] * 2 + [dim] * 3 + [ctypes.c_float, pointer, dim, pointer, dim]
    function.argtypes += [ctypes.c_float, pointer, dim]
    function.restype = ctypes.c_int

    def call(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        ta, tb = (b"T" if t else b"N" for t in (trans_a, trans_b))
        status = function(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
        if status:
            raise RuntimeError(f"oneDNN GEMM {m}x{k} @ {k}x{n} failed with status {status}")

    return call


def _matmul(dtype: str):
    """oneDNN's matmul primitive, made once per shape and layout: its brgemm kernels (AMX tiles where
    the CPU has them), which its GEMM API does not use."""

    def call(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        a_strides, b_strides = ((1, lda) if trans_a else (lda, 1)), ((1, ldb) if trans_b else (ldb, 1))
        onednn.matmul(m, n, k, a_strides, b_strides, ldc, alpha, beta != 0.0, dtype)(a, b, c)

    return call


def operand(x: np.ndarray, path: GemmPath) -> np.ndarray:
    """x (fp32, or bf16 bits as uint16) in the dtype `path` multiplies: bf16 inputs are rounded to
    the nearest bf16, bf16 bits widened exactly to fp32."""
    return as_bf16(x) if path.dtype == "bf16" else float32_values(x)


def gemm(
    path: GemmPath,
    a: np.ndarray,
    b: np.ndarray,
    out: np.ndarray | None = None,
    alpha: float = 1.0,
    accumulate: bool = False,
):
    """out [M, N] (fp32, rows contiguous) = alpha * a [M, K] @ b [K, N], added to out if `accumulate`."""
    a, b = operand(a, path), operand(b, path)
    (m, k), n = a.shape, b.shape[1]
    if out is None:
        out = np.empty((m, n), np.float32)
    if path._call is None:
        # NumPy: alpha scales a first, as the fp32 kernels always did (bit for bit the same products).
        product = np.matmul(a if alpha == 1.0 else a * np.float32(alpha), b, out=None if accumulate else out)
        if accumulate:
            out += product
        return out
    if min(m, n) == 0:
        return out
    if k == 0:
        if not accumulate:
            out[...] = 0.0
        return out
    a, trans_a, lda = _layout(a)
    b, trans_b, ldb = _layout(b)
    if out.strides[1] != 4 or out.strides[0] % 4:
        raise ValueError("gemm: the output's rows must be contiguous")
    path._call(
        trans_a,
        trans_b,
        m,
        n,
        k,
        alpha,
        a.ctypes.data,
        lda,
        b.ctypes.data,
        ldb,
        1.0 if accumulate else 0.0,
        out.ctypes.data,
        out.strides[0] // 4,
    )
    return out


def _layout(x: np.ndarray) -> tuple[np.ndarray, bool, int]:
    """x as (buffer, transposed, leading dimension) for a row-major BLAS call."""
    rows, cols = x.shape
    size = x.itemsize
    if x.strides[1] == size and x.strides[0] % size == 0 and x.strides[0] >= cols * size:
        return x, False, x.strides[0] // size
    if x.strides[0] == size and x.strides[1] % size == 0 and x.strides[1] >= rows * size:
        return x, True, x.strides[1] // size
    return np.ascontiguousarray(x), False, max(1, cols)
