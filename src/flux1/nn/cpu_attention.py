"""One head of attention on the CPU, and its gradients for training: softmax(scale q k^T + mask) v in
NumPy, each product through a GEMM path of `nn/gemm.py`. The softmax goes with the products' thread
pool: oneDNN's softmax primitive (one compiled pass on all cores) for oneDNN's and MKL's paths (both
on GNU OpenMP's threads), else NumPy, its rows split over the cores (on AVX2, where NumPy's exp is not
vectorized, the plan measured a head through oneDNN's products on 2 Zen 1 cores at 26 GFLOP/s with
NumPy's softmax, 40 with oneDNN's). With a bf16 path for the values, the probabilities (summed in
fp32) are rounded to bf16 (oneDNN's reorder, or NumPy a block of rows at a time). On 2 Intel Xeon
cores with AMX the plan measured a head through MKL's bf16 GEMMs at 138 GFLOP/s with NumPy's softmax
and rounding, 345 with oneDNN's (`benchmarks/profile_step.py` prints the plan's rates)."""

from functools import partial

import numpy as np

from flux1.nn import onednn
from flux1.nn.gemm import GemmPath, gemm
from flux1.nn.numpy_cpu import CACHED_VALUES, in_parallel, round_to_bf16


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
