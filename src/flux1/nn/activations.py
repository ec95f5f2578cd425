"""Activations whose transcendental functions dominate on CPU: there through the path the plan measured
fastest (`nn/cpu_activations.py`)."""

import mlx.core as mx

from flux1 import backend, cpu_plan
from flux1.nn import cpu_activations
from flux1.nn.numpy_cpu import as_numpy


def gelu_tanh(x: mx.array) -> mx.array:
    """GELU with the tanh approximation (FLUX's MLPs, T5's gated-gelu "gelu_new")."""
    if not backend.numpy_kernels():
        return nn_gelu_tanh(x)
    return mx.array(cpu_activations.gelu_tanh(cpu_plan.active("activation"), as_numpy(x.astype(mx.float32))))


def nn_gelu_tanh(x: mx.array) -> mx.array:
    return 0.5 * x * (1.0 + mx.tanh(cpu_activations.SQRT_2_OVER_PI * (x + 0.044715 * x**3)))
