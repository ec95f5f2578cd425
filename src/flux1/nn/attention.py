"""Scaled dot-product attention, by device.

GPU: MLX's fused kernel. CPU: MLX's CPU softmax runs exp at about 40 M values/s on one core, which
makes the attention of a 512x512 image 5x slower than its matmuls; NumPy's vectorized exp is about
14x faster, and its BLAS does the two products, so the CPU path computes attention in NumPy, one
head at a time (the scores of one head, not all, are in memory: 85 MB at 1024x1024), the softmax's rows
split over the cores. Each of the two products goes through the GEMM the plan measured fastest for it
(`cpu_plan.active("attention scores" | "attention values")`: a 128-wide head is a narrow product,
where a bf16 GEMM may not pay for rounding its inputs); with a bf16 GEMM its inputs are rounded to
bf16 once (the softmax, summed in fp32, writes the probabilities as bf16 while each block of rows is
still in the cache).
"""

from functools import partial

import mlx.core as mx
import numpy as np

from flux1 import backend, cpu_plan
from flux1.nn.gemm import gemm
from flux1.nn.numpy_cpu import CACHED_VALUES, as_bf16, in_parallel, round_to_bf16


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
    scores_path, values_path = cpu_plan.active("attention scores"), cpu_plan.active("attention values")
    if scores_path.dtype == "bf16":
        qn, kn = as_bf16(qn), as_bf16(kn)
    if values_path.dtype == "bf16":
        vn = as_bf16(vn)
    out = np.empty(qn.shape, dtype=np.float32)
    scores = np.empty((q.shape[2], k.shape[2]), np.float32)
    weights = np.empty(scores.shape, np.uint16) if values_path.dtype == "bf16" else None
    for b in range(qn.shape[0]):
        for h in range(qn.shape[1]):
            gemm(scores_path, qn[b, h], kn[b, h].T, out=scores, alpha=scale)
            if mn is not None:
                scores += mn[b, h]
            in_parallel(partial(_softmax_rows, scores, weights), len(scores))
            gemm(values_path, scores if weights is None else weights, vn[b, h], out=out[b, h])
    return mx.array(out)


def _softmax_rows(scores: np.ndarray, weights: np.ndarray | None, start: int, stop: int) -> None:
    """Rows start..stop of scores become their softmax, also rounded into weights (bf16 bits) if given."""
    step = max(1, CACHED_VALUES // scores.shape[1])
    for row in range(start, stop, step):
        row_end = min(row + step, stop)
        block = scores[row:row_end]
        block -= block.max(axis=-1, keepdims=True)
        np.exp(block, out=block)
        block /= block.sum(axis=-1, keepdims=True)
        if weights is not None:
            round_to_bf16(block, weights[row:row_end])
