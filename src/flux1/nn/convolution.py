"""2-D convolution (NHWC input, kernel [out, kh, kw, in]) by device.

GPU: MLX's kernel. CPU: MLX's CPU convolution reaches 49-82 GFLOP/s on the VAE's shapes on 2 Zen 4
cores, a BLAS about 190 on a plain matmul, so the convolution takes the plan's path for it
(`cpu_plan.active("convolution")`, `nn/cpu_convolution.py`): oneDNN's convolution primitive or
unfolded windows through a GEMM, whichever measured faster here. Strided convolutions (the VAE
encoder's downsampling) take oneDNN's where the plan chose unfolded windows, MLX's without oneDNN.
"""

import mlx.core as mx

from flux1 import backend, cpu_plan
from flux1.nn.cpu_convolution import convolution_paths, convolve
from flux1.nn.numpy_cpu import as_float32


def conv2d(x: mx.array, weight: mx.array, bias: mx.array, stride: int = 1, padding: int = 0) -> mx.array:
    if not backend.numpy_kernels():
        return _mlx_conv2d(x, weight, bias, stride, padding)
    path = cpu_plan.active("convolution")
    if stride != 1 and path.gemm is not None:
        path = convolution_paths().get(f"onednn convolution {path.dtype}")
        if path is None:
            return _mlx_conv2d(x, weight, bias, stride, padding)
    image = as_float32(x.astype(mx.float32))
    return mx.array(convolve(path, image, as_float32(weight), as_float32(bias), stride, padding))


def _mlx_conv2d(x, weight, bias, stride, padding):
    y = mx.conv2d(x, weight.astype(x.dtype), stride=stride, padding=padding)
    return y + bias.astype(x.dtype)
