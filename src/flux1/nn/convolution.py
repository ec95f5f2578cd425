"""2-D convolution (NHWC input, kernel [out, kh, kw, in]) by device.

GPU, and strided convolutions: MLX's kernel. CPU, stride 1: MLX's CPU convolution reaches 49-82
GFLOP/s on the VAE's shapes here, NumPy's BLAS about 180 on a plain matmul, so the convolution is
done as kh * kw matmuls. With the padded image flattened to [(H + 2p) * (W + 2p), in], the output
pixel (i, j) of a padded-width row is sum over (dy, dx) of the input row (i + dy) * Wp + (j + dx)
times kernel[dy, dx]: each tap is one contiguous slice of the flattened image, no unfolding copy.
The 2p extra columns of each output row are computed and dropped. Bands of output rows keep the
partial sums small.
"""

import mlx.core as mx
import numpy as np

from flux1 import backend
from flux1.nn.numpy_cpu import as_float32

_BAND_BYTES = 32 * 2**20  # one band's partial sums


def conv2d(x: mx.array, weight: mx.array, bias: mx.array, stride: int = 1, padding: int = 0) -> mx.array:
    if not backend.on_cpu() or stride != 1:
        y = mx.conv2d(x, weight.astype(x.dtype), stride=stride, padding=padding)
        return y + bias.astype(x.dtype)
    out_channels, kh, kw, in_channels = weight.shape
    batch, height, width, _ = x.shape
    out_height, out_width = height + 2 * padding - kh + 1, width + 2 * padding - kw + 1
    # One extra zero row at the bottom: the last taps of the last band read past the image.
    padded = np.pad(
        as_float32(x.astype(mx.float32)), [(0, 0), (padding, padding + 1), (padding, padding), (0, 0)]
    )
    padded_width = padded.shape[2]
    flat = padded.reshape(batch, -1, in_channels)
    taps = as_float32(weight).transpose(1, 2, 3, 0)  # [kh, kw, in, out]
    out = np.empty((batch, out_height, padded_width, out_channels), np.float32)
    band = max(1, _BAND_BYTES // (padded_width * out_channels * 4))
    partial = np.empty((band * padded_width, out_channels), np.float32)
    for b in range(batch):
        for top in range(0, out_height, band):
            rows = min(band, out_height - top) * padded_width
            target = out[b, top : top + band].reshape(rows, out_channels)
            for dy in range(kh):
                for dx in range(kw):
                    start = (top + dy) * padded_width + dx
                    source = flat[b, start : start + rows]
                    if dy == dx == 0:
                        np.matmul(source, taps[0, 0], out=target)
                    else:
                        np.matmul(source, taps[dy, dx], out=partial[:rows])
                        target += partial[:rows]
    result = out[:, :, :out_width]
    result += as_float32(bias)
    return mx.array(result)
