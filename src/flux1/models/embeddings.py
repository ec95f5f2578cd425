"""Embeddings of the FLUX transformer: sinusoidal timesteps, MLP embedders, 3-axis RoPE."""

import math

import mlx.core as mx
import mlx.nn as nn

from flux1.nn.linear import Linear


def timestep_embedding(t: mx.array, dim: int = 256, max_period: float = 10000.0) -> mx.array:
    """[cos, sin] of 1000 t at `dim // 2` log-spaced frequencies (t is sigma in [0, 1], or guidance)."""
    half = dim // 2
    freqs = mx.exp(-math.log(max_period) * mx.arange(half, dtype=mx.float32) / half)
    args = 1000.0 * t.astype(mx.float32)[:, None] * freqs[None]
    return mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = Linear(in_dim, hidden_dim)
        self.out_layer = Linear(hidden_dim, hidden_dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.out_layer(nn.silu(self.in_layer(x)))


def rope_frequencies(ids: mx.array, axes_dims: tuple[int, ...], theta: float) -> tuple[mx.array, mx.array]:
    """cos and sin [B, 1, tokens, head_dim / 2] for position ids [B, tokens, axes]: axis i of the ids
    rotates `axes_dims[i] / 2` consecutive pairs of each head's features."""
    angles = []
    for axis, dim in enumerate(axes_dims):
        omega = 1.0 / theta ** (mx.arange(0, dim, 2, dtype=mx.float32) / dim)
        angles.append(ids[..., axis : axis + 1].astype(mx.float32) * omega)
    angles = mx.concatenate(angles, axis=-1)[:, None]
    return mx.cos(angles), mx.sin(angles)


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate each adjacent feature pair (x0, x1) of x [B, heads, tokens, head_dim] by its angle."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    return mx.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], axis=-1).reshape(x.shape)
