"""2-D convolution (NHWC input, kernel [out, kh, kw, in]) by device.

GPU, and strided convolutions: MLX's kernel. CPU, stride 1: MLX's CPU convolution reaches 49-82
GFLOP/s on the VAE's shapes here, NumPy's BLAS about 190 on a plain matmul, so the convolution is
one matmul per band of output rows: the band's kh * kw shifted windows of the padded image side by
side ([pixels, kh * kw * in], copied on all cores) times the kernel as [kh * kw * in, out]. One
long product instead of kh * kw short ones, and no partial sums to add up. The product goes through
the plan's GEMM (`cpu_plan.active()`); with bf16 GEMMs the image is rounded to bf16 once, before it
is unfolded (half the bytes to copy), and the output and bias stay fp32.
"""

from functools import partial

import mlx.core as mx
import numpy as np

from flux1 import backend, cpu_plan
from flux1.nn.gemm import gemm, operand
from flux1.nn.numpy_cpu import as_float32, in_parallel

_BAND_BYTES = 48 * 2**20  # one band's unfolded windows


def conv2d(x: mx.array, weight: mx.array, bias: mx.array, stride: int = 1, padding: int = 0) -> mx.array:
    if not backend.numpy_kernels() or stride != 1:
        y = mx.conv2d(x, weight.astype(x.dtype), stride=stride, padding=padding)
        return y + bias.astype(x.dtype)
    out_channels, kh, kw, in_channels = weight.shape
    batch, height, width, _ = x.shape
    out_height, out_width = height + 2 * padding - kh + 1, width + 2 * padding - kw + 1
    path = cpu_plan.active()
    image = operand(as_float32(x.astype(mx.float32)), path)
    if padding:
        image = np.pad(image, [(0, 0), (padding, padding), (padding, padding), (0, 0)])
    kernel = as_float32(weight).transpose(1, 2, 3, 0).reshape(kh * kw * in_channels, out_channels)
    kernel = operand(kernel, path)
    bias = as_float32(bias)
    out = np.empty((batch, out_height, out_width, out_channels), np.float32)
    band = max(1, _BAND_BYTES // (out_width * kernel.nbytes // out_channels))
    windows = np.empty((band, out_width, kh * kw, in_channels), image.dtype)
    for b in range(batch):
        for top in range(0, out_height, band):
            rows = min(band, out_height - top)
            pixels = rows * out_width
            if kh == kw == 1:
                source = image[b, top : top + rows].reshape(pixels, in_channels)
            else:
                in_parallel(partial(_unfold, windows, image[b, top : top + rows + kh - 1], kh, kw), rows)
                source = windows[:rows].reshape(pixels, -1)
            target = out[b, top : top + rows].reshape(pixels, out_channels)
            gemm(path, source, kernel, out=target)
            in_parallel(partial(_add_rows, target, bias), pixels)
    return mx.array(out)


def _unfold(windows: np.ndarray, image: np.ndarray, kh: int, kw: int, first: int, stop: int) -> None:
    """windows[i, j, dy * kw + dx] = image[i + dy, j + dx] for output rows first..stop."""
    width = windows.shape[1]
    for dy in range(kh):
        for dx in range(kw):
            windows[first:stop, :, dy * kw + dx] = image[first + dy : stop + dy, dx : dx + width]


def _add_rows(target: np.ndarray, bias: np.ndarray, first: int, stop: int) -> None:
    np.add(target[first:stop], bias, out=target[first:stop])
