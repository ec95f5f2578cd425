"""Zero-copy NumPy views of MLX arrays and row-parallel NumPy work: the tools of the CPU kernels.

NumPy releases the GIL inside its loops, so a thread per core runs elementwise work in parallel;
MLX's CPU elementwise ops run on one core.
"""

import ctypes
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np

from flux1 import backend
from flux1.nn import onednn

THREADS = os.cpu_count() or 1
_pool = ThreadPoolExecutor(THREADS, thread_name_prefix="flux1-cpu")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters
_KEEP_FREED_BYTES = 2**31
CACHED_VALUES = 2**17  # 512 KB of float32: a block that one core's L2 cache holds


def _serve_large_blocks_from_the_heap() -> None:
    """glibc maps every block over 32 MB fresh from the kernel and unmaps it when it is freed, so
    each activation of a step is page-faulted and zero-filled anew: about 100,000 faults and 0.4 s
    of system time per `wide` step (Zen 4). From the heap, which is reused, fewer; but glibc still
    hands the heap's free top back to the kernel whenever it passes 128 KB, so a large activation
    freed at the top is faulted in again by the next one (a 1280 x 12288 fp32 array: 15,328 faults,
    which tests/test_cpu_kernels.py counts). Up to 2 GiB of freed heap is kept for reuse: on 2 Intel
    Xeon cores with AMX (`/usr/bin/time python benchmarks/profile_step.py --dtype bfloat16 --repeats
    5`) keeping 1 GiB took the `wide` step from 1.197 to 0.935 s, the run's page faults from 924k to
    418k, its peak RSS unchanged (1.81 GB); 2 GiB, so that the 1 GB of a 1024x1024 decode's last
    upsampling phases, freed before its output is copied into MLX, serves that copy: a warm decode
    12.36, 12.50 s -> 10.68, 10.21 s, peak RSS 5.51 -> 3.86 GB (`/usr/bin/time python
    benchmarks/profile_decode.py --dtype bfloat16 --size 1024`)."""
    if sys.platform.startswith("linux"):
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
        if mallopt is not None:
            mallopt(_M_MMAP_MAX, 0)
            mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED_BYTES)


if backend.on_cpu():
    _serve_large_blocks_from_the_heap()


def as_numpy(a: mx.array) -> np.ndarray:
    """A zero-copy NumPy view of `a` (evaluated here); bf16 as its raw uint16 bits."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    mx.eval(a)
    return np.asarray(a)


def as_mlx(x: np.ndarray) -> mx.array:
    """A copy of x in MLX; uint16 taken as bf16 bits (`as_numpy`'s inverse)."""
    return mx.array(x).view(mx.bfloat16) if x.dtype == np.uint16 else mx.array(x)


def as_float32(a: mx.array) -> np.ndarray:
    """`a` as fp32 NumPy (a view when it already is fp32)."""
    return float32_values(as_numpy(a))


def float32_values(x: np.ndarray) -> np.ndarray:
    """x as fp32, uint16 taken as bf16 bits (a view when it already is fp32)."""
    if x.dtype == np.uint16:
        out = np.empty(x.shape, np.float32)
        widen_bf16(x, out)
        return out
    return x.astype(np.float32, copy=False)


def in_parallel(work, rows: int) -> list:
    """work(start, stop) over `rows` cut into one contiguous range per core; their results."""
    bounds = np.linspace(0, rows, min(THREADS, max(rows, 1)) + 1).astype(int)
    return list(_pool.map(work, bounds[:-1], bounds[1:]))


def round_to_bf16(x: np.ndarray, out: np.ndarray) -> None:
    """out (uint16 bf16 bits) = x (fp32) rounded to the nearest bf16, ties to even; one thread,
    a cache-sized block at a time. x and out have the same shape and are C-contiguous."""
    source, target = x.reshape(-1), out.reshape(-1)
    carry = np.empty(min(source.size, CACHED_VALUES), np.uint32)
    for start in range(0, source.size, CACHED_VALUES):
        bits = source[start : start + CACHED_VALUES].view(np.uint32)
        t = carry[: bits.size]
        np.right_shift(bits, 16, out=t)  # the lowest kept bit decides the ties
        t &= 1
        t += 0x7FFF
        t += bits
        target[start : start + bits.size] = t.view(np.uint16)[1::2]  # little-endian: the upper half


def as_bf16(x: np.ndarray) -> np.ndarray:
    """x (fp32) rounded to bf16 bits (uint16) on all cores; uint16 input is taken as bf16 already.
    Through oneDNN's reorder where it is installed (one compiled pass on all cores, where NumPy makes
    five), else NumPy's `round_to_bf16` per core; the same bits either way."""
    if x.dtype == np.uint16:
        return x
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty(x.shape, np.uint16)
    flat_in, flat_out = x.reshape(-1), out.reshape(-1)
    if onednn.available():
        onednn.round_to_bf16(flat_in.shape)(flat_in, flat_out)
    else:
        in_parallel(lambda start, stop: round_to_bf16(flat_in[start:stop], flat_out[start:stop]), x.size)
    return out


def widen_bf16(bits: np.ndarray, out: np.ndarray) -> None:
    """out (fp32) = bits (uint16 bf16), exactly: a bf16 is the upper half of the same fp32."""
    np.left_shift(bits, 16, out=out.view(np.uint32), dtype=np.uint32)
