"""One head of attention on the CPU, and its gradients for training: softmax(scale q k^T + mask) v in
NumPy, each product through a GEMM path of `nn/gemm.py`. The softmax goes with the products' thread
pool: oneDNN's softmax primitive (one compiled pass on all cores) for oneDNN's and MKL's paths (both
on GNU OpenMP's threads), else NumPy, its rows split over the cores (on AVX2, where NumPy's exp is not
vectorized, the plan measured a head through oneDNN's products on 2 Zen 1 cores at 26 GFLOP/s with
NumPy's softmax, 40 with oneDNN's). With a bf16 path for the values, the probabilities (summed in
fp32) are rounded to bf16 (oneDNN's reorder, or NumPy a block of rows at a time). On 2 Intel Xeon
cores with AMX the plan measured a head through MKL's bf16 GEMMs at 138 GFLOP/s with NumPy's softmax
and rounding, 345 with oneDNN's (`benchmarks/profile_step.py` prints the plan's rates). Where the
CPU has AVX512-BF16 (or AMX tiles) and a C compiler is installed, more candidates compute whole heads
without the libraries: `native.attend` in each of its kernels (`native_pairs`)."""

import dataclasses
import math
from functools import partial

import numpy as np

from flux1.nn import native, onednn
from flux1.nn.gemm import GemmPath, gemm
from flux1.nn.numpy_cpu import CACHED_VALUES, in_parallel, round_to_bf16

EXP_FUSED = ", exponentials in the product"
NATIVE = {
    "native bf16, AMX tiles": "tiles",
    "native bf16, AVX512-BF16": "vectors",
}  # -> native.attend's kernel
# exp underflows below e^-87: a row whose largest exponential is below e^-60 may have lost
# probabilities that count (within e^-25 of its largest), so its block is computed the usual way.
_SMALLEST_LARGEST = math.exp(-60.0)
_BOUND_MARGIN = 1.0 + 2.0**-7  # q and k rounded to bf16 (2^-9 each), the scores' fp32 sums


def exp_fused(path: GemmPath) -> GemmPath:
    """oneDNN's bf16 matmul primitive as the scores' path of `attend_head`'s exponentials in the
    product (as a plain GEMM, for the gradients, the same path)."""
    return dataclasses.replace(path, name=path.name + EXP_FUSED)


def native_pairs() -> dict[str, tuple[GemmPath, GemmPath]]:
    """`native.attend` as candidates of the plan's attention (both products, bf16), one per kernel
    that runs here (NATIVE's names); no GEMM of their own: a mask or the gradients take a pair of
    GEMM paths."""
    kernels = native.attention_kernels()
    paths = [
        GemmPath(name, native.description(), "bf16") for name, kernel in NATIVE.items() if kernel in kernels
    ]
    return {path.name: (path, path) for path in paths}


def attend_head(
    pair: tuple[GemmPath, GemmPath], q, k, v, scale: float, mask, scratch: tuple, out, bounds=None
) -> None:
    """out [q_tokens, width] = softmax(scale q k^T + mask) v for one head through the plan's pair of
    paths (scores, values), a block of len(scores) query rows at a time (`head_attention`); q, k, v
    already in their path's dtype; scratch: (scores, weights) as `head_attention` takes them.

    With `exp_fused` scores, no mask and `bounds` (`score_bounds` of q and k), each block's
    probabilities are never written in fp32: oneDNN's matmul writes e = exp(scale q k^T - bound) in
    bf16 straight from its sums, the bound the largest of the block's rows' bounds on their scores,
    and e @ [v | 1] gives the unnormalized output and each row's sum of e at once, so each row is
    divided by the sum of the very weights it was made of. A block with a row whose largest
    exponential came out below e^-60 (the bound far above its scores) is computed the usual way."""
    (scores_path, values_path), (scores, weights) = pair, scratch
    fused = scores_path.name.endswith(EXP_FUSED) and mask is None and bounds is not None
    if fused:
        v_ones = np.empty((len(v), v.shape[1] + 1), np.uint16)
        v_ones[:, :-1] = v
        v_ones[:, -1] = 0x3F80  # 1.0 in bf16
        product = np.empty((len(scores), v_ones.shape[1]), np.float32)
    queries, rows = len(q), len(scores)
    for start in range(0, queries, rows):
        block = slice(start, min(start + rows, queries))
        size = block.stop - block.start
        block_weights = None if weights is None else weights[:size]
        if fused and _exp_attention(
            values_path, q[block], k, v_ones, scale, float(bounds[block].max()), block_weights,
            product[:size], out[block],
        ):  # fmt: skip
            continue
        head_attention(
            scores_path, values_path, q[block], k, v, scale, None if mask is None else mask[block],
            scores[:size], block_weights, out[block],
        )  # fmt: skip


def score_bounds(q: np.ndarray, k: np.ndarray, scale: float) -> np.ndarray:
    """A bound on the scores scale q_i . k_j of each query row of fp32 q, k [..., tokens, head_dim]:
    |q_i| times the longest k_j, times scale (Cauchy-Schwarz), with room for their rounding to bf16:
    [..., q_tokens]."""
    q_norms, k_norms = (np.sqrt(np.einsum("...ij,...ij->...i", x, x)) for x in (q, k))
    return q_norms * (scale * _BOUND_MARGIN * k_norms.max(axis=-1, keepdims=True))


def _exp_attention(values_path, q, k, v_ones, scale, bound, exps, product, out) -> bool:
    """out = exp(scale q k^T - bound) @ v, each row over its sum of exponentials (v_ones is v with a
    column of ones); False, out untouched, if a row's largest exponential is below e^-60."""
    rows, keys = exps.shape
    a_strides, b_strides = (q.strides[0] // 2, q.strides[1] // 2), (k.strides[1] // 2, k.strides[0] // 2)
    onednn.shifted_exp_matmul(rows, keys, q.shape[1], a_strides, b_strides, scale)(q, k, -bound, exps)
    gemm(values_path, exps, v_ones, out=product)
    sums = product[:, -1]
    if sums.min() < keys * _SMALLEST_LARGEST:  # the largest of a row is at least its sum / keys
        return False
    np.divide(product[:, :-1], sums[:, None], out=out)
    return True


def head_attention(
    scores_path: GemmPath,
    values_path: GemmPath,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    scale: float,
    mask: np.ndarray | None,
    scores: np.ndarray,
    weights: np.ndarray | None,
    out: np.ndarray,
) -> None:
    """out [q_tokens, width] = softmax(scale q k^T + mask) v; q, k, v already in their path's dtype;
    scores [q_tokens, k_tokens] fp32 and weights (bf16 bits, for a bf16 values path) are scratch."""
    gemm(scores_path, q, k.T, out=scores, alpha=scale)
    if mask is not None:
        scores += mask
    _softmax(scores_path, scores, weights)
    gemm(values_path, scores if weights is None else weights, v, out=out)


def head_gradients(
    scores_path: GemmPath,
    values_path: GemmPath,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    scale: float,
    mask: np.ndarray | None,
    dy: np.ndarray,
    y: np.ndarray,
    weights: np.ndarray,
    gradient: np.ndarray,
    dq: np.ndarray,
    dk: np.ndarray,
    dv: np.ndarray,
) -> None:
    """dq, dk, dv: the gradients of one head's output y = head_attention(q, k, v) given dy (all fp32).
    The probabilities P are recomputed into `weights`; then dV = P^T dy, dS = P * (dy v^T -
    rowsum(dy * y)) in `gradient`, dQ = scale dS k, dK = scale dS^T q."""
    gemm(scores_path, q, k.T, out=weights, alpha=scale)
    if mask is not None:
        weights += mask
    _softmax(scores_path, weights, None)
    gemm(values_path, weights.T, dy, out=dv)
    gemm(scores_path, dy, v.T, out=gradient)
    delta = np.einsum("ij,ij->i", dy, y)
    in_parallel(partial(_softmax_gradient_rows, weights, gradient, delta), len(weights))
    gemm(scores_path, gradient, k, out=dq, alpha=scale)
    gemm(scores_path, gradient.T, q, out=dk, alpha=scale)


def _softmax_gradient_rows(weights, gradient, delta, start: int, stop: int) -> None:
    """Rows start..stop of gradient (dP) become dS = P * (dP - delta), a cache-sized block at a time."""
    step = max(1, CACHED_VALUES // weights.shape[1])
    for row in range(start, stop, step):
        end = min(row + step, stop)
        block = gradient[row:end]
        block -= delta[row:end, None]
        block *= weights[row:end]


def _softmax(path: GemmPath, scores: np.ndarray, weights: np.ndarray | None) -> None:
    """The rows of scores (C-contiguous) become their softmax, also rounded into weights (bf16 bits)
    if given."""
    if path.name.startswith("numpy") or not onednn.available():
        in_parallel(partial(_softmax_rows, scores, weights), len(scores))
        return
    onednn.softmax(scores.shape)(scores, scores)
    if weights is not None:
        onednn.round_to_bf16(scores.shape)(scores, weights)


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
