"""Zero-copy NumPy views of MLX arrays and row-parallel NumPy work: the tools of the CPU kernels.

NumPy releases the GIL inside its loops, so a thread per core runs elementwise work in parallel;
MLX's CPU elementwise ops run on one core.
"""

import os
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np

THREADS = os.cpu_count() or 1
_pool = ThreadPoolExecutor(THREADS, thread_name_prefix="flux1-cpu")


def as_numpy(a: mx.array) -> np.ndarray:
    """A zero-copy NumPy view of `a` (evaluated here); bf16 as its raw uint16 bits."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    mx.eval(a)
    return np.asarray(a)


def as_float32(a: mx.array) -> np.ndarray:
    """`a` as fp32 NumPy (a view when it already is fp32)."""
    if a.dtype == mx.bfloat16:  # a bf16 value is the upper half of the float32 of the same value
        return np.left_shift(as_numpy(a), 16, dtype=np.uint32).view(np.float32)
    return as_numpy(a).astype(np.float32, copy=False)


def in_parallel(work, rows: int) -> list:
    """work(start, stop) over `rows` cut into one contiguous range per core; their results."""
    bounds = np.linspace(0, rows, min(THREADS, max(rows, 1)) + 1).astype(int)
    return list(_pool.map(work, bounds[:-1], bounds[1:]))
