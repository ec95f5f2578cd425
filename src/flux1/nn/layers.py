"""Small layers with parameters, shared by the text encoders and the VAE."""

import mlx.core as mx
import mlx.nn as nn

from flux1.nn.layer_norm import layer_norm


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((dim,))
        self.bias = mx.zeros((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        return layer_norm(x, self.eps, self.weight, self.bias)


class Embedding(nn.Module):
    """A lookup table (kept in its stored dtype; rows are cast by the caller)."""

    def __init__(self, count: int, dim: int):
        super().__init__()
        self.weight = mx.zeros((count, dim))

    def __call__(self, ids: mx.array) -> mx.array:
        return self.weight[ids]
