"""The blocks of the FLUX transformer, as in Black Forest Labs' reference (flux/modules/layers.py)."""

import mlx.core as mx
import mlx.nn as nn

from flux1 import backend
from flux1.models.embeddings import apply_rope
from flux1.nn import cpu_flux_blocks, cpu_rope_attention
from flux1.nn.activations import gelu_tanh
from flux1.nn.attention import attention
from flux1.nn.layer_norm import layer_norm
from flux1.nn.linear import Linear

_EPS = 1e-6


class GELU(nn.Module):
    def __call__(self, x: mx.array) -> mx.array:
        return gelu_tanh(x)


class SiLU(nn.Module):
    def __call__(self, x: mx.array) -> mx.array:
        return nn.silu(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = mx.ones((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.scale.astype(x.dtype), _EPS)


class QKNorm(nn.Module):
    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)


def modulate(x: mx.array, shift: mx.array, scale: mx.array) -> mx.array:
    """LayerNorm without affine parameters of its own, then the adaptive scale and shift (the input
    of linear layers only)."""
    return layer_norm(x, _EPS, 1 + scale, shift, into_gemm=True)


class Modulation(nn.Module):
    """lin(silu(vec)) cut into (shift, scale, gate) once or twice."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.chunks = 6 if double else 3
        self.lin = Linear(dim, self.chunks * dim)

    def __call__(self, vec: mx.array) -> list[mx.array]:
        return mx.split(self.lin(nn.silu(vec))[:, None, :], self.chunks, axis=-1)


class SelfAttention(nn.Module):
    """The fused qkv projection, per-head RMS norm of q and k, and the output projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = Linear(dim, 3 * dim)
        self.norm = QKNorm(dim // num_heads)
        self.proj = Linear(dim, dim)


def split_heads(qkv: mx.array, num_heads: int, norm: QKNorm) -> tuple[mx.array, mx.array, mx.array]:
    batch, length, _ = qkv.shape
    q, k, v = qkv.reshape(batch, length, 3, num_heads, -1).transpose(2, 0, 3, 1, 4)
    return norm.query_norm(q), norm.key_norm(k), v


def joint_attention(streams: list[tuple[mx.array, QKNorm]], num_heads: int, rope) -> mx.array:
    """Attention over the tokens of every stream together (text, then image), from each stream's fused
    qkv projection [B, L_i, 3 * dim] and its q/k norms: [B, sum of L_i, dim]."""
    if backend.numpy_kernels():
        norms = [(qkv, norm.query_norm.scale, norm.key_norm.scale) for qkv, norm in streams]
        return cpu_rope_attention.rope_attention(norms, num_heads, *rope, _EPS)
    heads = [split_heads(qkv, num_heads, norm) for qkv, norm in streams]
    q, k, v = (parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2) for parts in zip(*heads))
    return rope_attention(q, k, v, rope)


def rope_attention(q: mx.array, k: mx.array, v: mx.array, rope: tuple[mx.array, mx.array]) -> mx.array:
    """Attention over RoPE-rotated q and k; heads merged back: [B, L, heads * head_dim]."""
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    out = attention(q, k, v, scale=q.shape[-1] ** -0.5)
    batch, heads, length, head_dim = out.shape
    return out.transpose(0, 2, 1, 3).reshape(batch, length, heads * head_dim)


def mlp(dim: int, hidden: int) -> list[nn.Module]:
    return [Linear(dim, hidden), GELU(), Linear(hidden, dim)]


def feed_forward(layers: list[nn.Module], x: mx.array) -> mx.array:
    """An `mlp`: its GELU goes with the first layer (`Linear.gelu_tanh`: one pass over the output on
    the CPU kernels); the list keeps the reference's weight indices (0 and 2)."""
    up, _, down = layers
    return down(up.gelu_tanh(x, into_gemm=True))


def run(layers: list[nn.Module], x: mx.array) -> mx.array:
    for layer in layers:
        x = layer(x)
    return x


class DoubleStreamBlock(nn.Module):
    """Image and text tokens, each with its own weights, attending jointly over [text, image]."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.img_mod = Modulation(dim, double=True)
        self.img_attn = SelfAttention(dim, num_heads)
        self.img_mlp = mlp(dim, hidden)
        self.txt_mod = Modulation(dim, double=True)
        self.txt_attn = SelfAttention(dim, num_heads)
        self.txt_mlp = mlp(dim, hidden)

    def modulations(self, vec: mx.array) -> tuple[list[mx.array], list[mx.array]]:
        """Each stream's (shift, scale, gate) twice, from the conditioning vectors vec [B, dim]."""
        return self.img_mod(vec), self.txt_mod(vec)

    def __call__(self, img, txt, modulations, rope):
        streams = [(self.img_attn, self.img_mlp), (self.txt_attn, self.txt_mlp)]
        layers = [layer for attn, (up, _, down) in streams for layer in (attn.qkv, attn.proj, up, down)]
        if backend.numpy_kernels() and cpu_flux_blocks.takes(*layers):
            return cpu_flux_blocks.double_block(self, img, txt, modulations, rope, _EPS)
        img_mod, txt_mod = modulations
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = img_mod
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = txt_mod

        img_qkv = self.img_attn.qkv(modulate(img, img_shift1, img_scale1))
        txt_qkv = self.txt_attn.qkv(modulate(txt, txt_shift1, txt_scale1))
        streams = [(txt_qkv, self.txt_attn.norm), (img_qkv, self.img_attn.norm)]
        attn = joint_attention(streams, self.img_attn.num_heads, rope)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        img = img + img_gate1 * self.img_attn.proj(img_attn)
        img = img + img_gate2 * feed_forward(self.img_mlp, modulate(img, img_shift2, img_scale2))
        txt = txt + txt_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + txt_gate2 * feed_forward(self.txt_mlp, modulate(txt, txt_shift2, txt_scale2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One fused projection to q, k, v and the MLP input; one projection back from [attention, mlp]."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.linear1 = Linear(dim, 3 * dim + int(dim * mlp_ratio))
        self.linear2 = Linear(dim + int(dim * mlp_ratio), dim)
        self.norm = QKNorm(dim // num_heads)
        self.modulation = Modulation(dim, double=False)

    def modulations(self, vec: mx.array) -> list[mx.array]:
        """(shift, scale, gate) from the conditioning vectors vec [B, dim]."""
        return self.modulation(vec)

    def __call__(self, x, modulations, rope):
        if backend.numpy_kernels() and cpu_flux_blocks.takes(self.linear1, self.linear2):
            return cpu_flux_blocks.single_block(self, x, modulations, rope, _EPS)
        shift, scale, gate = modulations
        qkv, mlp = self.linear1.split_gelu_tanh(modulate(x, shift, scale), 3 * self.dim, into_gemm=True)
        attn = joint_attention([(qkv, self.norm)], self.num_heads, rope)
        return x + gate * self.linear2([attn, mlp])  # of their concatenation


class LastLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.linear = Linear(dim, out_channels)
        self.adaLN_modulation = [SiLU(), Linear(dim, 2 * dim)]

    def modulations(self, vec: mx.array) -> list[mx.array]:
        """(shift, scale) from the conditioning vectors vec [B, dim]."""
        return mx.split(run(self.adaLN_modulation, vec)[:, None, :], 2, axis=-1)

    def __call__(self, x: mx.array, modulations: list[mx.array]) -> mx.array:
        shift, scale = modulations
        return self.linear(modulate(x, shift, scale))
