"""Load an optimized BLAS into the process before MLX is imported, and find oneDNN.

MLX's Linux CPU wheel links the reference BLAS (about 3 GFLOP/s here); MLX resolves its cblas
symbols through the global namespace, so a library opened first with RTLD_GLOBAL takes over
(about 120 GFLOP/s with MKL on 2 cores). The handles are kept: the CPU plan (`cpu_plan.py`) times
their GEMMs too. This module must not import mlx.
"""

import ctypes
import glob
import os
import sys
import warnings

_CANDIDATES = (
    ("MKL", "libmkl_rt.so*"),
    ("OpenBLAS", "libopenblas*.so*"),
)
_SYSTEM_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")

loaded: str | None = None
library: ctypes.CDLL | None = None  # the BLAS named by `loaded`
_onednn: list = []  # [handle or None] once looked for


def _search_dirs():
    yield os.path.join(sys.prefix, "lib")
    if sys.base_prefix != sys.prefix:
        yield os.path.join(sys.base_prefix, "lib")
    yield from _SYSTEM_DIRS


def load_blas() -> str | None:
    """Open MKL (from the `mkl` wheel) or the system OpenBLAS; return the one loaded."""
    global loaded, library
    if loaded or not sys.platform.startswith("linux"):
        return loaded  # macOS: MLX uses Accelerate / Metal already.
    if "mlx.core" in sys.modules:
        warnings.warn(
            "flux1: mlx was imported before flux1, so no optimized BLAS could be loaded", stacklevel=2
        )
        return None
    # MKL's default Intel threading layer needs libiomp5; GNU OpenMP is always there with gcc.
    os.environ.setdefault("MKL_THREADING_LAYER", "GNU")
    for name, pattern in _CANDIDATES:
        for folder in _search_dirs():
            for path in sorted(glob.glob(os.path.join(folder, pattern))):
                try:
                    library = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                except OSError:
                    continue
                loaded = f"{name} ({path})"
                return loaded
    warnings.warn(
        "flux1: no optimized BLAS found (pip install mkl, or apt install libopenblas0): "
        "MLX's CPU matmuls will run about 40x slower",
        stacklevel=2,
    )
    return None


def onednn() -> ctypes.CDLL | None:
    """oneDNN's `libdnnl.so.3` (PyPI `onednn-cpu-gomp`, or `onednn`), or None where it is not
    installed. Its wheels put their own dependencies (TBB, Intel's runtime) beside it, outside the
    loader's path: each one the loader misses is opened from the same folder, then it retries."""
    if not _onednn:
        _onednn.append(_open_with_siblings("libdnnl.so.3") if sys.platform.startswith("linux") else None)
    return _onednn[0]


def _open_with_siblings(name: str) -> ctypes.CDLL | None:
    for folder in _search_dirs():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        for _ in range(16):
            try:
                return ctypes.CDLL(path)
            except OSError as error:
                missing = str(error).split(":", 1)[0]
                sibling = os.path.join(folder, missing)
                if missing == path or not os.path.isfile(sibling):
                    break
                try:
                    ctypes.CDLL(sibling, mode=ctypes.RTLD_GLOBAL)
                except OSError:
                    break
    return None
