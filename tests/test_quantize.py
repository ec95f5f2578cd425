import mlx.core as mx
import numpy as np
import pytest
from tests.conftest import relative_error

from flux1.nn.linear import Linear
from flux1.quantize import BITS, quantize_linears


def _linear(inputs: int, outputs: int, seed: int = 0) -> Linear:
    layer = Linear(inputs, outputs)
    key = mx.random.key(seed)
    layer.weight = mx.random.normal((outputs, inputs), key=key) / inputs**0.5
    layer.bias = mx.random.normal((outputs,), key=mx.random.key(seed + 1))
    return layer


@pytest.mark.parametrize("bits", BITS)
def test_cpu_path_equals_quantized_matmul(bits):
    """The CPU path (dequantize to fp32, BLAS) and MLX's quantized_matmul kernel compute the same
    product of the same quantized weights. Bound 1e-5: both accumulate 256 fp32 products."""
    layer = _linear(256, 96)
    layer.quantize(bits, 64)
    x = mx.random.normal((5, 256), key=mx.random.key(7))
    kernel = (
        mx.quantized_matmul(
            x, layer.weight, layer.scales, layer.biases, transpose=True, group_size=64, bits=bits
        )
        + layer.bias
    )
    assert relative_error(layer(x), kernel) < 1e-5


def test_quantized_output_close_to_dense_and_error_shrinks_with_bits():
    dense = _linear(512, 128)
    x = mx.random.normal((4, 512), key=mx.random.key(3))
    reference = dense(x)
    errors = []
    for bits in BITS:
        layer = _linear(512, 128)
        layer.quantize(bits, 64)
        errors.append(relative_error(layer(x), reference))
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 0.01  # 8 bits: about 2^-8 of each group's range


def test_quantize_linears_keeps_layers_that_do_not_fit_the_group():
    import mlx.nn as nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fits = _linear(128, 32)
            self.narrow = _linear(40, 32)

    net = Net()
    report = quantize_linears(net, 4, 64)
    assert report.quantized == 1 and report.kept_dense == ["narrow"]
    assert net.fits.bits == 4 and net.narrow.bits is None
    assert np.array_equal(np.array(net.narrow.weight), np.array(_linear(40, 32).weight))


@pytest.mark.parametrize(("bits", "group", "message"), [(7, 64, "--quantize 7"), (4, 48, "--group-size 48")])
def test_bad_quantization_is_refused(bits, group, message):
    with pytest.raises(ValueError, match=message):
        quantize_linears(_linear(64, 8), bits, group)
