"""The CPU paths of the activations whose transcendental functions cost most, one of which the plan
picks by measurement on GELU (`cpu_plan`, kind "activation"); the VAE's group norms take the same
path for their SiLU (`nn/group_norm.py`):

- "numpy": NumPy's ufuncs on all cores, a block of values per core. NumPy vectorizes tanh and exp
  for AVX-512 but not for AVX2.
- "onednn": one oneDNN primitive compiled for this CPU's instructions (`nn/onednn.py`), the whole
  formula fused into one pass on all cores.

On 2 Zen 1 cores (AVX2) the plan measured GELU at 0.13 G values/s through NumPy and 0.53 through
oneDNN (`benchmarks/profile_step.py` prints the plan's rates).
"""

import math
from dataclasses import dataclass
from functools import cache

import numpy as np

from flux1.nn import onednn
from flux1.nn.numpy_cpu import CACHED_VALUES, in_parallel

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@dataclass(frozen=True)
class ActivationPath:
    name: str  # "numpy" or "onednn"
    library: str
    dtype: str = "fp32"  # what it computes in (as the GEMM paths, for the plan's choice by precision)


@cache
def activation_paths() -> dict[str, ActivationPath]:
    paths = [ActivationPath("numpy", f"NumPy {np.__version__}")]
    if onednn.available():
        paths.append(ActivationPath("onednn", onednn.version()))
    return {path.name: path for path in paths}


def gelu_tanh(path: ActivationPath, x: np.ndarray) -> np.ndarray:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) of fp32 x, a new array."""
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty_like(x)
    if path.name == "onednn":
        return onednn.gelu_tanh(x.size)(x, out)
    flat_in, flat_out = x.reshape(-1), out.reshape(-1)
    in_parallel(lambda start, stop: _numpy_gelu_tanh(flat_in[start:stop], flat_out[start:stop]), x.size)
    return out


def add_bias_gelu_tanh(path: ActivationPath, y: np.ndarray, bias: np.ndarray | None) -> None:
    """y [rows, cols] (fp32, C-contiguous) becomes gelu_tanh(y + bias) in place, bias [cols] or None:
    one pass over a linear layer's output while it is still NumPy's (oneDNN: one primitive; NumPy: a
    cache-sized block of rows at a time per core)."""
    rows, cols = y.shape
    if path.name == "onednn":
        onednn.bias_gelu_tanh(rows, cols)(y, np.zeros(cols, np.float32) if bias is None else bias)
        return

    def rows_of(start: int, stop: int) -> None:
        step = max(1, CACHED_VALUES // cols)
        before = np.empty((min(step, stop - start), cols), np.float32)
        for row in range(start, stop, step):
            block = y[row : min(row + step, stop)]
            if bias is not None:
                block += bias
            x = before[: len(block)]
            np.copyto(x, block)
            _numpy_gelu_tanh(x, block)

    in_parallel(rows_of, rows)


def _numpy_gelu_tanh(x: np.ndarray, y: np.ndarray) -> None:
    """y = gelu_tanh(x), a pass per operation (x and y the same shape, not overlapping)."""
    np.multiply(x, x, out=y)
    y *= np.float32(0.044715)
    y += 1.0
    y *= x
    y *= np.float32(SQRT_2_OVER_PI)
    np.tanh(y, out=y)
    y += 1.0
    y *= 0.5
    y *= x
