"""The VAE's resnet and upsampling blocks on the CPU kernels, their activations NumPy's from input to
output, and the decoder's up blocks so from the mid block to the image.

Through each layer's own CPU path every group norm and convolution hands its output to MLX (a copy on
one core) for the next kernel to read straight back, and MLX adds a resnet's residual, and
interleaves an upsampling's four phases, on one core. Here a block's kernels pass NumPy arrays to
each other, the residual is added and the phases interleaved on all cores: one copy into MLX per
block, and in the decoder one in all.
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
    return mx.array(numpy_resnet_block(as_float32(x.astype(mx.float32)), block, eps))


def numpy_resnet_block(image: np.ndarray, block, eps: float, consume: bool = False) -> np.ndarray:
    """`resnet_block` of an fp32 NumPy image, into a new one; with `consume` (image not needed after
    it) a block with a shortcut convolution normalizes image in place once the shortcut has read it,
    where a normalized copy would be held beside it (at 1024x1024 the decoder's first such image is 1
    GB)."""
    shortcut = "conv_shortcut" in block
    skip = _convolved(image, block.conv_shortcut.weight, block.conv_shortcut.bias, 0) if shortcut else image
    normed = _normed_silu(image, block.norm1, eps, in_place=consume and shortcut)
    del image  # with `consume`, the caller holds it no more: freed once conv1 has read it
    h = _convolved(normed, block.conv1.weight, block.conv1.bias, 1)
    del normed
    h = _convolved(_normed_silu(h, block.norm2, eps, in_place=True), block.conv2.weight, block.conv2.bias, 1)
    flat, residual = h.reshape(-1), skip.reshape(-1)
    in_parallel(
        lambda start, stop: np.add(flat[start:stop], residual[start:stop], out=flat[start:stop]), flat.size
    )
    return h


def decoded(x: mx.array, decoder, eps: float) -> mx.array:
    """A `models.vae.Decoder`'s up blocks, its last norm (with SiLU) and convolution from x, the mid
    block's output, with NumPy arrays from block to block: one copy into MLX, of the image, where
    each block's copy of its output (at 1024x1024 the last upsampling's is 1 GB) would be made while
    the output and its NumPy heap are still held."""
    held = [as_float32(x.astype(mx.float32))]  # popped into each call: a block frees what it consumed
    owned = False  # the first image is MLX's memory
    for block in decoder.up_blocks:
        for resnet in block.resnets:
            held.append(numpy_resnet_block(held.pop(), resnet, eps, consume=owned))
            owned = True
        if "upsamplers" in block:
            upsample = block.upsamplers[0]
            held.append(numpy_upsampled(held.pop(), *upsample.phase_kernels(), upsample.conv.weight.shape[0]))
    norm, conv = decoder.conv_norm_out, decoder.conv_out
    image = _normed_silu(held.pop(), norm, eps, in_place=owned)
    return mx.array(_convolved(image, conv.weight, conv.bias, 1))


def _normed_silu(image: np.ndarray, norm, eps: float, in_place: bool = False) -> np.ndarray:
    batch, height, width, channels = image.shape
    pixels = image.reshape(batch, height * width, channels)
    out = pixels if in_place else None
    weight, bias = as_float32(norm.weight), as_float32(norm.bias)
    return normalized(pixels, norm.groups, weight, bias, eps, silu=True, out=out).reshape(image.shape)


def _convolved(image: np.ndarray, kernel: mx.array, bias: mx.array, padding: int) -> np.ndarray:
    """image convolved with stride 1 through the plan's convolution path."""
    path = cpu_plan.active("convolution")
    return convolve(path, image, as_float32(kernel), as_float32(bias), 1, padding)


def numpy_upsampled(image: np.ndarray, kernel: mx.array, bias: mx.array, channels: int) -> np.ndarray:
    """A `models.vae.Upsample` of an fp32 NumPy image [B, H, W, C], into a new one: the convolution by
    its four phases' kernels at once (kernel [4 * channels, 2, 2, C], phase (a, b) at output channels
    (2a + b) * channels..), each phase's output at rows a.., columns b.. of its padded result,
    interleaved into [B, 2H, 2W, channels] (output pixel (2i + a, 2j + b) from phase (a, b))."""
    batch, height, width, _ = image.shape
    y = _convolved(image, kernel, bias, 1)
    del image  # where the caller holds it no more, freed before the interleaved copy is made
    return _interleaved(y.reshape(batch, height + 1, width + 1, 2, 2, channels), height, width).reshape(
        batch, 2 * height, 2 * width, channels
    )


def _interleaved(phases: np.ndarray, height: int, width: int) -> np.ndarray:
    batch, channels = phases.shape[0], phases.shape[-1]
    out = np.empty((batch, height, 2, width, 2, channels), np.float32)

    def rows(start: int, stop: int) -> None:
        for a, b in itertools.product((0, 1), (0, 1)):
            out[:, start:stop, a, :, b] = phases[:, start + a : stop + a, b : b + width, a, b]

    in_parallel(rows, height)
    return out
