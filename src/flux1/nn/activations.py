"""Activations whose transcendental functions dominate on CPU (see attention.py for why NumPy)."""

import math

import mlx.core as mx
import numpy as np

from flux1 import backend

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu_tanh(x: mx.array) -> mx.array:
    """GELU with the tanh approximation (FLUX's MLPs, T5's gated-gelu "gelu_new")."""
    if not backend.on_cpu():
        return nn_gelu_tanh(x)
    x = x.astype(mx.float32)
    mx.eval(x)
    xn = np.asarray(x)
    y = xn * xn
    y *= np.float32(0.044715)
    y += 1.0
    y *= xn
    y *= np.float32(_SQRT_2_OVER_PI)
    np.tanh(y, out=y)
    y += 1.0
    y *= 0.5
    y *= xn
    return mx.array(y)


def nn_gelu_tanh(x: mx.array) -> mx.array:
    return 0.5 * x * (1.0 + mx.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3)))
