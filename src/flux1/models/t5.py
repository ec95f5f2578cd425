"""The T5 v1.1 encoder (transformers T5EncoderModel): RMS norms, shared relative position bias,
no attention scaling, gated-GELU feed-forward."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from flux1.nn.attention import attention
from flux1.nn.layers import Embedding
from flux1.nn.linear import Linear


class T5LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight.astype(x.dtype), self.eps)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional buckets [query, key] of key - query, exactly as transformers computes them
    (float32 log, truncated toward zero)."""
    relative = np.arange(length)[None, :] - np.arange(length)[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int64) * half
    distance = np.abs(relative)
    max_exact = half // 2
    # Distances below max_exact take the exact branch; 1 keeps the log finite for them.
    nonzero = np.maximum(distance, 1).astype(np.float32)
    scaled = np.log(nonzero / max_exact) / np.float32(math.log(max_distance / max_exact))
    large = max_exact + (scaled * (half - max_exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return buckets + np.where(distance < max_exact, distance, large)


class T5Attention(nn.Module):
    def __init__(self, config: dict, has_relative_bias: bool):
        super().__init__()
        self.heads = config["num_heads"]
        inner = self.heads * config["d_kv"]
        self.q, self.k, self.v = (Linear(config["d_model"], inner, bias=False) for _ in range(3))
        self.o = Linear(inner, config["d_model"], bias=False)
        if has_relative_bias:
            self.relative_attention_bias = Embedding(config["relative_attention_num_buckets"], self.heads)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        batch, length, _ = x.shape
        q, k, v = (
            p(x).reshape(batch, length, self.heads, -1).transpose(0, 2, 1, 3)
            for p in (self.q, self.k, self.v)
        )
        out = attention(q, k, v, scale=1.0, mask=bias)
        return self.o(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class T5SelfAttentionLayer(nn.Module):
    def __init__(self, config: dict, has_relative_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_bias)
        self.layer_norm = T5LayerNorm(config["d_model"], config["layer_norm_epsilon"])

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedGelu(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.wi_0 = Linear(config["d_model"], config["d_ff"], bias=False)
        self.wi_1 = Linear(config["d_model"], config["d_ff"], bias=False)
        self.wo = Linear(config["d_ff"], config["d_model"], bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.wo(self.wi_0.gelu_tanh(x) * self.wi_1(x))


class T5FeedForwardLayer(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.DenseReluDense = T5DenseGatedGelu(config)
        self.layer_norm = T5LayerNorm(config["d_model"], config["layer_norm_epsilon"])

    def __call__(self, x: mx.array) -> mx.array:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, config: dict, has_relative_bias: bool):
        super().__init__()
        self.layer = [T5SelfAttentionLayer(config, has_relative_bias), T5FeedForwardLayer(config)]

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.block = [T5Block(config, has_relative_bias=i == 0) for i in range(config["num_layers"])]
        self.final_layer_norm = T5LayerNorm(config["d_model"], config["layer_norm_epsilon"])


class T5Encoder(nn.Module):
    """Parameters named as transformers' T5EncoderModel names them."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        self.shared = Embedding(config["vocab_size"], config["d_model"])
        self.encoder = T5Stack(config)

    def position_bias(self, length: int, dtype: mx.Dtype) -> mx.array:
        """[1, heads, length, length], computed once by block 0's table and reused by every block."""
        buckets = relative_position_buckets(
            length,
            self.config["relative_attention_num_buckets"],
            self.config["relative_attention_max_distance"],
        )
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
        return table[mx.array(buckets)].transpose(2, 0, 1)[None].astype(dtype)

    def __call__(self, input_ids: mx.array, dtype: mx.Dtype = mx.float32) -> mx.array:
        x = self.shared(input_ids).astype(dtype)
        bias = self.position_bias(input_ids.shape[1], dtype)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)
