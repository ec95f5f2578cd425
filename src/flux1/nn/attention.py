"""Scaled dot-product attention, by device.

GPU: MLX's fused kernel. CPU: MLX's CPU softmax runs exp at about 40 M values/s on one core, which
makes the attention of a 512x512 image 5x slower than its matmuls; NumPy's vectorized exp is about
14x faster, and its BLAS does the two products, so the CPU path computes attention in NumPy, one
head at a time (the scores of one head, not all, are in memory: 85 MB at 1024x1024), the softmax's rows
split over the cores.
"""

import mlx.core as mx
import numpy as np

from flux1 import backend
from flux1.nn.numpy_cpu import in_parallel


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None = None) -> mx.array:
    """softmax(scale * q k^T + mask) v for q, k, v of shape [B, heads, tokens, head_dim].

    mask is additive and broadcasts to [B, heads, q_tokens, k_tokens]."""
    if not backend.numpy_kernels():
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    q, k, v = (a.astype(mx.float32) for a in (q, k, v))
    arrays = [q, k, v] if mask is None else [q, k, v, mask.astype(mx.float32)]
    mx.eval(arrays)
    qn, kn, vn = (np.asarray(a) for a in arrays[:3])
    mn = (
        None
        if mask is None
        else np.broadcast_to(np.asarray(arrays[3]), (*q.shape[:2], q.shape[2], k.shape[2]))
    )
    out = np.empty(qn.shape, dtype=np.float32)
    for b in range(qn.shape[0]):
        for h in range(qn.shape[1]):
            scores = (qn[b, h] * np.float32(scale)) @ kn[b, h].T
            if mn is not None:
                scores += mn[b, h]
            in_parallel(lambda start, stop, s=scores: _softmax_rows(s[start:stop]), len(scores))
            np.matmul(scores, vn[b, h], out=out[b, h])
    return mx.array(out)


def _softmax_rows(scores: np.ndarray) -> None:
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
