"""CLIP-L text encoder (transformers CLIPTextModel); FLUX uses only its pooled output."""

import mlx.core as mx
import mlx.nn as nn

from flux1.nn.attention import attention
from flux1.nn.layers import Embedding, LayerNorm
from flux1.nn.linear import Linear


class CLIPAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (Linear(dim, dim) for _ in range(4))

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        batch, length, dim = x.shape
        q, k, v = (
            p(x).reshape(batch, length, self.heads, -1).transpose(0, 2, 1, 3)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = attention(q, k, v, scale=q.shape[-1] ** -0.5, mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, dim))


class CLIPMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.fc1(x)
        return self.fc2(h * mx.sigmoid(1.702 * h))  # quick_gelu


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        dim, eps = config["hidden_size"], config["layer_norm_eps"]
        self.layer_norm1 = LayerNorm(dim, eps)
        self.self_attn = CLIPAttention(dim, config["num_attention_heads"])
        self.layer_norm2 = LayerNorm(dim, eps)
        self.mlp = CLIPMLP(dim, config["intermediate_size"])

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.token_embedding = Embedding(config["vocab_size"], config["hidden_size"])
        self.position_embedding = Embedding(config["max_position_embeddings"], config["hidden_size"])


class CLIPEncoder(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.layers = [CLIPEncoderLayer(config) for _ in range(config["num_hidden_layers"])]


class CLIPTextEncoder(nn.Module):
    """Parameters named as transformers names them, without the `text_model.` prefix."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = LayerNorm(config["hidden_size"], config["layer_norm_eps"])

    def __call__(self, input_ids: mx.array, dtype: mx.Dtype = mx.float32) -> mx.array:
        """Pooled output [B, hidden]: the final hidden state at the end-of-text token. With the
        config's legacy eos_token_id 2 the reference takes argmax(input_ids), the end-of-text id
        being the largest id; that is kept here so the two agree on every input."""
        length = input_ids.shape[1]
        x = self.embeddings.token_embedding(input_ids) + self.embeddings.position_embedding.weight[:length]
        x = x.astype(dtype)
        causal = mx.triu(mx.full((length, length), -mx.inf, dtype=dtype), k=1)
        for layer in self.encoder.layers:
            x = layer(x, causal)
        x = self.final_layer_norm(x)
        if self.config.get("eos_token_id", 2) == 2:
            eos = mx.argmax(input_ids, axis=-1)
        else:
            eos = mx.argmax((input_ids == self.config["eos_token_id"]).astype(mx.int32), axis=-1)
        return x[mx.arange(x.shape[0]), eos]
