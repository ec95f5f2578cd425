"""Activations whose transcendental functions dominate on CPU (see attention.py for why NumPy)."""

import math

import mlx.core as mx
import numpy as np

from flux1 import backend
from flux1.nn.numpy_cpu import as_numpy, in_parallel

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu_tanh(x: mx.array) -> mx.array:
    """GELU with the tanh approximation (FLUX's MLPs, T5's gated-gelu "gelu_new")."""
    if not backend.numpy_kernels():
        return nn_gelu_tanh(x)
    xn = as_numpy(x.astype(mx.float32))
    out = np.empty_like(xn)
    flat_in, flat_out = xn.reshape(-1), out.reshape(-1)

    def gelu(start, stop):
        x, y = flat_in[start:stop], flat_out[start:stop]
        np.multiply(x, x, out=y)
        y *= np.float32(0.044715)
        y += 1.0
        y *= x
        y *= np.float32(_SQRT_2_OVER_PI)
        np.tanh(y, out=y)
        y += 1.0
        y *= 0.5
        y *= x

    in_parallel(gelu, flat_in.size)
    return mx.array(out)


def nn_gelu_tanh(x: mx.array) -> mx.array:
    return 0.5 * x * (1.0 + mx.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3)))
