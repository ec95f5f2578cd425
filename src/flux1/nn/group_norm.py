"""PyTorch's GroupNorm (groups of consecutive channels, statistics over space and group), optionally
followed by SiLU, by device.

CPU: MLX's CPU elementwise ops run on one core and its exp at about 40 M values/s, which made
GroupNorm + SiLU a fifth of a 512x512 VAE decode; the CPU path computes the statistics in NumPy, a
band of rows per core, and the fused normalize-scale-shift-SiLU through the activations' path of the
plan (`nn/cpu_activations.py`): NumPy, or one oneDNN primitive (`benchmarks/profile_decode.py --paths
numpy onednn`, 2 Zen 1 cores: a 512x512 decode's group norms 3.70-3.98 s with NumPy, 2.52-2.60 s
with oneDNN).
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from flux1 import backend, cpu_plan
from flux1.nn import onednn
from flux1.nn.numpy_cpu import CACHED_VALUES, as_float32, in_parallel

_CHUNK = 4096  # pixels summed in float32 at a time


def group_norm(
    x: mx.array, groups: int, weight: mx.array, bias: mx.array, eps: float, silu: bool = False
) -> mx.array:
    """x [B, H, W, C] NHWC."""
    if not backend.numpy_kernels():
        return _group_norm_mlx(x, groups, weight, bias, eps, silu)
    batch, height, width, channels = x.shape
    pixels = as_float32(x.astype(mx.float32)).reshape(batch, height * width, channels)
    out = normalized(pixels, groups, as_float32(weight), as_float32(bias), eps, silu)
    return mx.array(out.reshape(x.shape))


def normalized(
    pixels: np.ndarray,
    groups: int,
    weight: np.ndarray,
    bias: np.ndarray,
    eps: float,
    silu: bool = False,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """The CPU path's group norm (and SiLU) of fp32 pixels [B, pixels, channels], into `out` (pixels
    itself, where its values are no longer needed) or a new array."""
    batch, count, channels = pixels.shape
    per_group = channels // groups

    def channel_sums(start, stop, mean=None):
        """Per-channel sum of x (or of (x - mean)^2) over pixels start..stop, in chunks: float32
        within a chunk, float64 across."""
        total = np.zeros((batch, channels))
        for chunk in range(start, stop, _CHUNK):
            part = pixels[:, chunk : min(chunk + _CHUNK, stop)]
            if mean is None:
                total += part.sum(axis=1)
            else:
                deviation = part - mean
                total += np.einsum("bpc,bpc->bc", deviation, deviation)
        return total

    def group_mean(partials):
        return sum(partials).reshape(batch, groups, per_group).sum(-1) / (count * per_group)

    mean = group_mean(in_parallel(channel_sums, count))
    channel_mean = np.repeat(mean, per_group, axis=-1).astype(np.float32)[:, None]
    var = group_mean(in_parallel(lambda a, b: channel_sums(a, b, channel_mean), count))
    # y = x * a + b per (batch, channel), with a = weight / std and b = bias - mean * a.
    a = weight * np.repeat(1.0 / np.sqrt(var + eps), per_group, axis=-1)
    b = bias - np.repeat(mean, per_group, axis=-1) * a
    a, b = a.astype(np.float32)[:, None], b.astype(np.float32)[:, None]
    out = np.empty_like(pixels) if out is None else out
    if silu and cpu_plan.active("activation").name == "onednn":
        primitive = onednn.scale_shift_silu(count, channels)
        # The plan measured GELU's primitive, not this one: where oneDNN has no compiled kernel for it
        # (only its far slower reference code), NumPy computes it.
        if not primitive.implementation.startswith("ref"):
            for image in range(batch):
                primitive(np.ascontiguousarray(pixels[image]), a[image], b[image], out[image])
            return out

    def normalize(start, stop):
        step = max(1, CACHED_VALUES // channels)  # each pass of the chunk stays in the core's cache
        t = np.empty((batch, step, channels), np.float32)
        for chunk in range(start, stop, step):
            end = min(chunk + step, stop)
            y, u = out[:, chunk:end], t[:, : end - chunk]
            np.multiply(pixels[:, chunk:end], a, out=y)
            y += b
            if silu:  # y * sigmoid(y) = y / (1 + exp(-y))
                np.negative(y, out=u)
                np.exp(u, out=u)
                u += 1.0
                np.divide(y, u, out=y)

    in_parallel(normalize, count)
    return out


def _group_norm_mlx(x, groups, weight, bias, eps, silu):
    batch, height, width, channels = x.shape
    grouped = x.reshape(batch, height * width, groups, channels // groups)
    mean = grouped.mean(axis=(1, 3), keepdims=True)
    var = mx.square(grouped - mean).mean(axis=(1, 3), keepdims=True)
    normed = ((grouped - mean) * mx.rsqrt(var + eps)).reshape(x.shape)
    y = normed * weight.astype(x.dtype) + bias.astype(x.dtype)
    return nn.silu(y) if silu else y
