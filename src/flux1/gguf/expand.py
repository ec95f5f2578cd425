"""GGUF blocks expanded to fp32 on all cores, a cache-sized run of rows at a time: how the CPU path
multiplies by a layer kept as its GGUF blocks (`nn/cpu_linear.py`), and the layer's dense values."""

import numpy as np
from gguf import GGMLQuantizationType as T

from flux1.gguf.blocks import LAYOUTS, block_size, decode
from flux1.nn.numpy_cpu import CACHED_VALUES, in_parallel


def expand_into(raw_rows: np.ndarray, qtype: T, out: np.ndarray) -> np.ndarray:
    """Fill fp32 `out` [rows, cols] with the values of raw_rows [rows, bytes per row]; returns out."""
    rows, cols = out.shape
    step = max(1, CACHED_VALUES // cols)

    def fill(start: int, stop: int) -> None:
        for first in range(start, stop, step):
            last = min(first + step, stop)
            expand_rows(raw_rows[first:last], qtype, out[first:last])

    in_parallel(fill, rows)
    return out


def expand_rows(raw_rows: np.ndarray, qtype: T, target: np.ndarray) -> None:
    """Fill fp32 `target` [rows, cols] with the values of a few raw rows (a cache-sized block)."""
    group = LAYOUTS[qtype].group
    codes, scales, offsets = decode(raw_rows.reshape(-1, block_size(qtype)[1]), qtype)
    grouped = target.reshape(-1, group)
    np.multiply(codes.reshape(-1, group), scales.reshape(-1, 1), out=grouped)
    np.add(grouped, offsets.reshape(-1, 1), out=grouped)


def expanded(raw_rows: np.ndarray, qtype: T, cols: int) -> np.ndarray:
    """The fp32 values [rows, cols] of raw_rows, in a new array."""
    return expand_into(raw_rows, qtype, np.empty((raw_rows.shape[0], cols), np.float32))
