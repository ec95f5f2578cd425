"""The NumPy CPU paths (attention, GELU, convolution, group norm, linear) compute what MLX's own ops
or the reference compute."""

import mlx.core as mx
import numpy as np
import pytest
from tests.conftest import relative_error

from flux1.nn.activations import gelu_tanh, nn_gelu_tanh
from flux1.nn.attention import attention
from flux1.nn.convolution import conv2d
from flux1.nn.cpu_linear import expanded_weight
from flux1.nn.group_norm import group_norm
from flux1.nn.linear import Linear


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


@pytest.mark.parametrize(
    "height, width, in_channels, out_channels, kernel, padding",
    [(17, 20, 8, 12, 3, 1), (9, 12, 5, 7, 1, 0), (70, 6, 4, 5, 3, 0), (300, 33, 3, 4, 3, 1)],
)
def test_cpu_conv2d_equals_mlx_kernel(height, width, in_channels, out_channels, kernel, padding):
    """The CPU path is kh * kw matmuls over the flattened padded image (the last shape spans several
    bands); 1e-5 allows for the different summation order."""
    x = mx.random.normal((2, height, width, in_channels), key=mx.random.key(0))
    weight = mx.random.normal((out_channels, kernel, kernel, in_channels), key=mx.random.key(1))
    bias = mx.random.normal((out_channels,), key=mx.random.key(2))
    for stored in (mx.float32, mx.bfloat16):  # a bf16 kernel is widened exactly
        kernel = weight.astype(stored)
        expected = mx.conv2d(x, kernel.astype(mx.float32), padding=padding) + bias
        got = conv2d(x, kernel, bias, padding=padding)
        assert got.shape == expected.shape
        assert relative_error(got, expected) < 1e-5


@pytest.mark.parametrize("silu", [False, True])
def test_cpu_group_norm_equals_torch(silu):
    """Against torch.nn.functional.group_norm (+ SiLU) in float64; 1e-5: fp32 statistics."""
    import torch

    x = 3 + 2 * mx.random.normal((2, 70, 90, 64), key=mx.random.key(3))
    weight, bias = (mx.random.normal((64,), key=mx.random.key(k)) for k in (4, 5))
    reference = torch.nn.functional.group_norm(
        torch.from_numpy(np.array(x, np.float64)).permute(0, 3, 1, 2),
        32,
        torch.from_numpy(np.array(weight, np.float64)),
        torch.from_numpy(np.array(bias, np.float64)),
        1e-6,
    )
    if silu:
        reference = torch.nn.functional.silu(reference)
    got = group_norm(x, 32, weight, bias, 1e-6, silu)
    assert relative_error(got, mx.array(reference.permute(0, 2, 3, 1).numpy().astype(np.float32))) < 1e-5


@pytest.mark.parametrize("bits", [3, 4, 5, 6, 8])
def test_cpu_linear_expands_quantized_weights_exactly(bits):
    """fp32 scales: the NumPy expansion computes exactly MLX's `scale * code + bias`."""
    layer = Linear(256, 96)
    layer.weight = mx.random.normal((96, 256), key=mx.random.key(bits))
    layer.quantize(bits, 64)
    assert np.array_equal(expanded_weight(layer), np.array(layer.dense_weight(mx.float32)))


def test_cpu_linear_expands_bf16_exactly_and_multiplies():
    layer = Linear(128, 40)
    layer.weight = mx.random.normal((40, 128), key=mx.random.key(7)).astype(mx.bfloat16)
    layer.bias = mx.random.normal((40,), key=mx.random.key(8)).astype(mx.bfloat16)
    assert np.array_equal(expanded_weight(layer), np.array(layer.weight.astype(mx.float32)))
    x = mx.random.normal((3, 5, 128), key=mx.random.key(9))
    expected = x @ layer.weight.astype(mx.float32).T + layer.bias.astype(mx.float32)
    assert relative_error(layer(x), expected) < 1e-6
