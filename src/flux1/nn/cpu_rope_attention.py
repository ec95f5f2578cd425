"""FLUX's attention on the CPU kernels, from the fused qkv projections to the merged heads.

MLX's graph for it (split the heads, RMS-norm q and k, rotate them, attend, merge the heads) is a pass
over memory per operation on one core, several of them transposing copies. Here the projections are
read in place, a block of tokens at a time (all heads) normalized and rotated while in the cache (the
pairs a RoPE rotates are complex numbers: one complex product) and written head by head, the tokens
split over the cores; each head's attention writes its columns of the merged [B, tokens, heads *
head_dim] output. Where the plan takes the native attention, its packing kernels normalize and
rotate q and k themselves as they round them to bf16, straight from the projections.
"""

import itertools

import mlx.core as mx
import numpy as np

from flux1.nn import native
from flux1.nn.attention import attend_heads, native_kernel
from flux1.nn.cpu_linear import gemm_input
from flux1.nn.numpy_cpu import CACHED_VALUES, as_float32, as_numpy, in_parallel


def rope_attention(streams: list[tuple], heads: int, cos: mx.array, sin: mx.array, eps: float) -> mx.array:
    """Attention over the tokens of every stream at once. streams: (qkv [B, L_i, 3 * heads *
    head_dim], q norm scale [head_dim], k norm scale [head_dim]) in token order; cos and sin [B, 1,
    L, head_dim / 2] for the L = sum L_i tokens. Returns [B, L, heads * head_dim] for FLUX's output
    projections: fp32, or with bf16 GEMMs rounded to bf16 as they take it."""
    projections = [(as_numpy(qkv.astype(mx.float32)), q_scale, k_scale) for qkv, q_scale, k_scale in streams]
    return gemm_input(numpy_rope_attention(projections, heads, cos, sin, eps))


def numpy_rope_attention(
    streams: list[tuple], heads: int, cos: mx.array, sin: mx.array, eps: float
) -> np.ndarray:
    """`rope_attention` of fp32 NumPy projections, into fp32 NumPy (a GEMM that takes it in bf16
    rounds it as it reads it)."""
    batch, tokens = streams[0][0].shape[0], sum(qkv.shape[1] for qkv, _, _ in streams)
    head_dim = streams[0][0].shape[2] // (3 * heads)
    out = np.empty((batch, tokens, heads, head_dim), np.float32)
    if (kernel := native_kernel(head_dim)) is not None:
        native_rope_attention(streams, heads, cos, sin, eps, out.transpose(0, 2, 1, 3), kernel)
    else:
        q, k, v = normed_rotated_heads(streams, heads, cos, sin, eps)
        attend_heads(q, k, v, head_dim**-0.5, None, out.transpose(0, 2, 1, 3))  # [b, h]: a head's columns
    return out.reshape(batch, tokens, heads * head_dim)


def native_rope_attention(
    streams: list[tuple], heads: int, cos: mx.array, sin: mx.array, eps: float, out, kernel: str
) -> None:
    """`numpy_rope_attention` through a native kernel, into out [B, heads, L, head_dim]: q and k normed
    and rotated as the kernel rounds them to bf16 from the projections (`native.source`), v read
    from them as it is."""
    sources = {"q": [], "k": [], "v": []}
    rope = [np.ascontiguousarray(as_float32(a)[:, 0]) for a in (cos, sin)]  # [B, L, head_dim / 2]
    first = 0
    for projection, q_scale, k_scale in streams:
        batch, length = projection.shape[:2]
        parts = projection.reshape(batch, length, 3, heads, -1).transpose(
            2, 0, 3, 1, 4
        )  # [qkv, B, h, L_i, d]
        sources["q"].append(native.source(parts[0], first, (as_float32(q_scale), *rope, eps)))
        sources["k"].append(native.source(parts[1], first, (as_float32(k_scale), *rope, eps)))
        sources["v"].append(native.source(parts[2], first))
        first += length
    native.attend_sources(sources["q"], sources["k"], sources["v"], first, out.shape[-1] ** -0.5, out, kernel)


def normed_rotated_heads(streams: list[tuple], heads: int, cos: mx.array, sin: mx.array, eps: float):
    """q, k and v [B, heads, L, head_dim] of streams as `numpy_rope_attention` takes them: q and k
    RMS-normed and rotated, v a view of the projection where there is one stream."""
    projections = [qkv for qkv, _, _ in streams]
    batch = projections[0].shape[0]
    parts = [p.reshape(batch, p.shape[1], 3, heads, -1) for p in projections]  # [B, L_i, qkv, heads, d]
    lengths = [p.shape[1] for p in projections]
    shape = (batch, heads, sum(lengths), parts[0].shape[-1])
    rotations = np.empty(cos.shape, np.complex64)  # [B, 1, L, head_dim / 2]
    rotations.real, rotations.imag = as_float32(cos), as_float32(sin)
    rotations = np.broadcast_to(rotations[:, 0, :, None], (batch, shape[2], 1, shape[3] // 2))
    q, k = np.empty(shape, np.float32), np.empty(shape, np.float32)
    v = parts[0][:, :, 2].transpose(0, 2, 1, 3) if len(streams) == 1 else np.empty(shape, np.float32)
    scales = [(as_float32(q_scale), as_float32(k_scale)) for _, q_scale, k_scale in streams]
    step = max(1, CACHED_VALUES // (heads * shape[3]))
    by_token = [a.transpose(0, 2, 1, 3) for a in (q, k, v)]  # [b, tokens]: [tokens, heads, head_dim]
    firsts = np.cumsum([0, *lengths[:-1]])

    def prepare(start: int, stop: int) -> None:
        """Tokens start..stop of the joint sequence, each sample, a cache-sized block at a time."""
        for part, (q_scale, k_scale), first, length in zip(parts, scales, firsts, lengths, strict=True):
            for b, row in itertools.product(
                range(batch), range(max(start, first), min(stop, first + length), step)
            ):
                joint = slice(row, min(row + step, stop, first + length))
                local = slice(joint.start - first, joint.stop - first)
                rotation = rotations[b, joint]
                _normed_rotated(part[b, local, 0], q_scale, rotation, eps, by_token[0][b, joint])
                _normed_rotated(part[b, local, 1], k_scale, rotation, eps, by_token[1][b, joint])
                if len(streams) > 1:
                    np.copyto(by_token[2][b, joint], part[b, local, 2])

    in_parallel(prepare, shape[2])
    return q, k, v


def _normed_rotated(
    x: np.ndarray, scale: np.ndarray, rotation: np.ndarray, eps: float, out: np.ndarray
) -> None:
    """out [tokens, heads, head_dim] = RoPE(RMSNorm(x) * scale) for x of the same shape: each feature
    pair (x0, x1) as x0 + i x1, rotated by multiplying with rotation [tokens, 1, head_dim / 2] = cos +
    i sin."""
    mean_square = np.einsum("thd,thd->th", x, x)
    mean_square /= x.shape[-1]
    mean_square += eps
    inverse_rms = 1.0 / np.sqrt(mean_square, out=mean_square)
    np.multiply(x, scale, out=out)
    out *= inverse_rms[..., None]
    pairs = out.view(np.complex64)
    np.multiply(pairs, rotation, out=pairs)
