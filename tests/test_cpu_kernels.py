"""The NumPy CPU paths of attention and GELU compute what MLX's own ops compute."""

import mlx.core as mx
import pytest
from tests.conftest import relative_error

from flux1.nn.activations import gelu_tanh, nn_gelu_tanh
from flux1.nn.attention import attention


@pytest.mark.parametrize("with_mask", [False, True])
def test_cpu_attention_equals_mlx_kernel(with_mask):
    """Both are fp32 softmax attention; 1e-5 allows for a different summation order."""
    shape = (2, 3, 17, 8)
    q, k, v = (mx.random.normal(shape, key=mx.random.key(i)) for i in range(3))
    mask = mx.random.normal((1, 3, 17, 17), key=mx.random.key(9)) if with_mask else None
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=mask)
    assert relative_error(attention(q, k, v, 0.3, mask), expected) < 1e-5


def test_cpu_attention_with_causal_mask_ignores_future_tokens():
    q, k, v = (mx.random.normal((1, 2, 6, 4), key=mx.random.key(i)) for i in range(3))
    causal = mx.triu(mx.full((6, 6), -mx.inf), k=1)
    changed_future = mx.concatenate([v[:, :, :3], v[:, :, 3:] + 5.0], axis=2)
    first_three = attention(q, k, v, 0.5, causal)[:, :, :3]
    assert relative_error(attention(q, k, changed_future, 0.5, causal)[:, :, :3], first_three) == 0.0


def test_cpu_gelu_equals_formula():
    x = 3 * mx.random.normal((4, 33), key=mx.random.key(1))
    assert relative_error(gelu_tanh(x), nn_gelu_tanh(x)) < 1e-6
