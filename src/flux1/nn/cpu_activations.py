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
from flux1.nn.numpy_cpu import in_parallel

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

    def gelu(start, stop):
        x, y = flat_in[start:stop], flat_out[start:stop]
        np.multiply(x, x, out=y)
        y *= np.float32(0.044715)
        y += 1.0
        y *= x
        y *= np.float32(SQRT_2_OVER_PI)
        np.tanh(y, out=y)
        y += 1.0
        y *= 0.5
        y *= x

    in_parallel(gelu, flat_in.size)
    return out
