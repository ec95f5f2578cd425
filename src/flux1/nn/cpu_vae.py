"""The VAE's resnet and upsampling blocks on the CPU kernels, their activations NumPy's from input to
output.

Through each layer's own CPU path every group norm and convolution hands its output to MLX (a copy on
one core) for the next kernel to read straight back, and MLX adds a resnet's residual, and
interleaves an upsampling's four phases, on one core. Here a block's kernels pass NumPy arrays to
each other, the residual is added and the phases interleaved on all cores: one copy into MLX per
block.
"""

import itertools

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
    h = _convolved(_normed_silu(image, block.norm1, eps), block.conv1.weight, block.conv1.bias, 1)
    h = _convolved(_normed_silu(h, block.norm2, eps), block.conv2.weight, block.conv2.bias, 1)
    if "conv_shortcut" in block:
        skip = _convolved(image, block.conv_shortcut.weight, block.conv_shortcut.bias, 0)
    else:
        skip = image
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


def _convolved(image: np.ndarray, kernel: mx.array, bias: mx.array, padding: int) -> np.ndarray:
    """image convolved with stride 1 through the plan's convolution path."""
    path = cpu_plan.active("convolution")
    return convolve(path, image, as_float32(kernel), as_float32(bias), 1, padding)


def upsampled(x: mx.array, kernel: mx.array, bias: mx.array, channels: int) -> mx.array:
    """A `models.vae.Upsample`: the convolution of x [B, H, W, C] by its four phases' kernels at once
    (kernel [4 * channels, 2, 2, C], phase (a, b) at output channels (2a + b) * channels..), each
    phase's output at rows a.., columns b.. of its padded result, interleaved into [B, 2H, 2W,
    channels] (output pixel (2i + a, 2j + b) from phase (a, b))."""
    batch, height, width, _ = x.shape
    y = _convolved(as_float32(x.astype(mx.float32)), kernel, bias, 1)
    out = _interleaved(y.reshape(batch, height + 1, width + 1, 2, 2, channels), height, width)
    del y  # freed before the copy into MLX, which reuses it (at 1024x1024 the phases are 1 GB)
    return mx.array(out.reshape(batch, 2 * height, 2 * width, channels))


def _interleaved(phases: np.ndarray, height: int, width: int) -> np.ndarray:
    batch, channels = phases.shape[0], phases.shape[-1]
    out = np.empty((batch, height, 2, width, 2, channels), np.float32)

    def rows(start: int, stop: int) -> None:
        for a, b in itertools.product((0, 1), (0, 1)):
            out[:, start:stop, a, :, b] = phases[:, start + a : stop + a, b : b + width, a, b]

    in_parallel(rows, height)
    return out
