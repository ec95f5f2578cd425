"""Scaled dot-product attention, by device.

GPU: MLX's fused kernel. CPU: MLX's CPU softmax runs exp at about 40 M values/s on one core, which
makes the attention of a 512x512 image 5x slower than its matmuls; NumPy's vectorized exp is about
14x faster, and a BLAS does the two products, so the CPU path computes attention in NumPy
(`nn/cpu_attention.py`), one head at a time, a block of its query rows at a time (SCORES_VALUES
bounds the scores in memory). Its two products go through the pair of GEMM paths the plan measured fastest for a
whole head (`cpu_plan.active("attention")`: one library, each product in fp32 or bf16; a 128-wide
head is a narrow product, where a bf16 GEMM may not pay for rounding its inputs); a bf16 product's
inputs are rounded to bf16 once. One more pair has no softmax pass: oneDNN's bf16 matmul writing
the exponentials itself (`cpu_attention.attend_head`); and the native kernels compute whole heads in
C, in AMX tiles or AVX512-BF16 vectors, where they run (`native.attend`; without a mask).
"""

import mlx.core as mx
import numpy as np

from flux1 import backend, cpu_plan
from flux1.nn import native
from flux1.nn.cpu_attention import EXP_FUSED, NATIVE, attend_head, head_gradients, score_bounds
from flux1.nn.numpy_cpu import as_bf16, as_numpy

# The most scores (query rows x key tokens) in memory at once, 16 MB in fp32: a 512x512 image's
# whole head (1280 x 1280 tokens); a 1024x1024 image's head (4352 tokens: 76 MB whole; 1.1 GB at
# 2048x2048) in blocks of 963 query rows, which stay in the cache between the products and the
# softmax (2 Intel Xeon cores with AMX, `python benchmarks/profile_step.py --dtype bfloat16
# --size 1024`: attention 1.665, 1.218 s a step by whole heads, 1.038, 1.040 s by blocks).
SCORES_VALUES = 2**22


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None = None) -> mx.array:
    """softmax(scale * q k^T + mask) v for q, k, v of shape [B, heads, tokens, head_dim].

    mask is additive and broadcasts to [B, heads, q_tokens, k_tokens]."""
    if backend.numpy_kernels():
        return _cpu_attention(q, k, v, scale, mask)
    if backend.cpu_kernels_in_training():
        return _differentiable_cpu_attention(q, k, v, scale, mask)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def _differentiable_cpu_attention(q, k, v, scale: float, mask) -> mx.array:
    """The CPU attention for MLX's autograd, with its gradients for q, k and v (the mask is constant)."""
    forward = mx.custom_function(lambda q, k, v: _cpu_attention(q, k, v, scale, mask))
    forward.vjp(lambda primals, dy, y: _cpu_attention_gradients(*primals, scale, mask, dy, y))
    return forward(q, k, v)


def _numpy_heads(q, k, v, mask):
    """q, k, v as fp32 NumPy, and the mask broadcast to [B, heads, q_tokens, k_tokens] (or None)."""
    arrays = [a.astype(mx.float32) for a in (q, k, v)]
    if mask is not None:
        arrays.append(mask.astype(mx.float32))
    mx.eval(arrays)
    qn, kn, vn = (np.asarray(a) for a in arrays[:3])
    shape = (*q.shape[:2], q.shape[2], k.shape[2])
    return qn, kn, vn, None if mask is None else np.broadcast_to(np.asarray(arrays[3]), shape)


def _cpu_attention(q, k, v, scale: float, mask) -> mx.array:
    qn, kn, vn, mn = _numpy_heads(q, k, v, mask)
    out = np.empty(qn.shape, dtype=np.float32)
    attend_heads(qn, kn, vn, scale, mn, out)
    return mx.array(out)


def native_kernel(head_dim: int) -> str | None:
    """`native.attend`'s kernel where the plan takes one for unmasked heads this wide, else None.
    Heads wider than the plan measured the native kernels on take a pair of GEMM paths (the VAE's
    one 512-wide head: there the chunks of k and v and the group's outputs outgrow the cache the
    kernels were sized for)."""
    if head_dim > cpu_plan.HEAD[1]:
        return None
    return NATIVE.get(cpu_plan.active("attention")[0].name)


def attend_heads(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, mask, out: np.ndarray, gemm_pair: bool = False
) -> None:
    """out[b, h] = softmax(scale q k^T + mask) v for each head of fp32 NumPy q, k, v [B, heads, tokens,
    head_dim] (each head's rows may be strided, as may out's: its rows contiguous), a block of at most
    SCORES_VALUES scores (query rows x key tokens) at a time; through the plan's native kernel
    (`native_kernel`) unless `gemm_pair` asks for its pair of GEMM paths."""
    kernel = None if gemm_pair or mask is not None else native_kernel(q.shape[-1])
    if kernel is not None:
        native.attend(q, k, v, scale, out, kernel)
        return
    scores_path, values_path = cpu_plan.active("attention", gemm_pair=True)
    bounds = score_bounds(q, k, scale) if mask is None and scores_path.name.endswith(EXP_FUSED) else None
    if scores_path.dtype == "bf16":
        q, k = as_bf16(q), as_bf16(k)
    if values_path.dtype == "bf16":
        v = as_bf16(v)
    queries, keys = q.shape[2], k.shape[2]
    rows = max(1, min(queries, SCORES_VALUES // keys))
    scores = np.empty((rows, keys), np.float32)
    weights = np.empty(scores.shape, np.uint16) if values_path.dtype == "bf16" else None
    for b, h in np.ndindex(*q.shape[:2]):
        attend_head(
            (scores_path, values_path), q[b, h], k[b, h], v[b, h], scale, None if mask is None else mask[b, h],
            (scores, weights), out[b, h], None if bounds is None else bounds[b, h],
        )  # fmt: skip


def _cpu_attention_gradients(q, k, v, scale: float, mask, dy, y) -> tuple[mx.array, mx.array, mx.array]:
    """The gradients for q, k and v of the attention's output y, given dy, a head at a time."""
    qn, kn, vn, mn = _numpy_heads(q, k, v, mask)
    dyn, yn = as_numpy(dy.astype(mx.float32)), as_numpy(y.astype(mx.float32))
    scores_path, values_path = cpu_plan.active("attention", gemm_pair=True)
    dq, dk, dv = (np.empty(a.shape, np.float32) for a in (qn, kn, vn))
    weights = np.empty((q.shape[2], k.shape[2]), np.float32)
    gradient = np.empty(weights.shape, np.float32)
    for b, h in np.ndindex(*qn.shape[:2]):
        head_gradients(
            scores_path, values_path, qn[b, h], kn[b, h], vn[b, h], scale, None if mn is None else mn[b, h],
            dyn[b, h], yn[b, h], weights, gradient, dq[b, h], dk[b, h], dv[b, h],
        )  # fmt: skip
    return tuple(mx.array(g).astype(a.dtype) for g, a in ((dq, q), (dk, k), (dv, v)))
