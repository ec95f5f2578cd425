"""The VAE's resnet block on the CPU kernels, its activations NumPy's from its input to its output.

Through each layer's own CPU path every group norm and convolution hands its output to MLX (a copy on
one core) for the next kernel to read straight back, and MLX adds the residual on one core. Here the
block's kernels pass NumPy arrays to each other and the residual is added on all cores: one copy into
MLX per block.
"""

import mlx.core as mx
import numpy as np

from flux1 import cpu_plan
from flux1.nn.cpu_convolution import convolve
from flux1.nn.group_norm import normalized
from flux1.nn.numpy_cpu import as_float32, in_parallel


def resnet_block(x: mx.array, block, eps: float) -> mx.array:
    """shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x)))))) of x [B, H, W, C] NHWC, for a
    `models.vae.ResnetBlock` (its shortcut a 1x1 convolution, or none)."""
    image = as_float32(x.astype(mx.float32))
    h = _convolved(_normed_silu(image, block.norm1, eps), block.conv1)
    h = _convolved(_normed_silu(h, block.norm2, eps), block.conv2)
    skip = _convolved(image, block.conv_shortcut) if "conv_shortcut" in block else image
    flat, residual = h.reshape(-1), skip.reshape(-1)
    in_parallel(
        lambda start, stop: np.add(flat[start:stop], residual[start:stop], out=flat[start:stop]), flat.size
    )
    return mx.array(h)


def _normed_silu(image: np.ndarray, norm, eps: float) -> np.ndarray:
    batch, height, width, channels = image.shape
    pixels = image.reshape(batch, height * width, channels)
    return normalized(
        pixels, norm.groups, as_float32(norm.weight), as_float32(norm.bias), eps, silu=True
    ).reshape(image.shape)


def _convolved(image: np.ndarray, conv) -> np.ndarray:
    path = cpu_plan.active("convolution")
    return convolve(path, image, as_float32(conv.weight), as_float32(conv.bias), conv.stride, conv.padding)
