"""LayerNorm followed by a scale and a shift, by device: per feature (CLIP's LayerNorm) or per sample
and feature (FLUX's adaptive norms, (1 + scale) LN(x) + shift).

CPU: MLX's layer norm runs there as a pass per operation on one core; with the plan's oneDNN
activations (`nn/cpu_activations.py`) oneDNN's layer normalization primitive normalizes, scales and
shifts in one pass on all cores, its statistics in fp32 as MLX's.
"""

import mlx.core as mx
import numpy as np

from flux1 import backend, cpu_plan
from flux1.nn import onednn
from flux1.nn.numpy_cpu import as_float32, as_mlx


def layer_norm(
    x: mx.array,
    eps: float,
    scale: mx.array | None = None,
    shift: mx.array | None = None,
    into_gemm: bool = False,
) -> mx.array:
    """LN(x) over the last axis, times `scale`, plus `shift`: each [features], [B, 1, features] for
    x [B, tokens, features], or None (1 and 0). `into_gemm`: the result feeds only linear layers, so
    with bf16 GEMMs oneDNN may write it rounded to bf16 as they take it."""
    if backend.numpy_kernels():
        y = numpy_layer_norm(
            as_float32(x.astype(mx.float32)),
            eps,
            *(None if a is None else as_float32(a) for a in (scale, shift)),
            into_gemm,
        )
        if y is not None:
            return as_mlx(y) if y.dtype == np.uint16 else mx.array(y).astype(x.dtype)
    if scale is None or scale.ndim == 1:
        cast = [None if a is None else a.astype(x.dtype) for a in (scale, shift)]
        return mx.fast.layer_norm(x, *cast, eps)
    return scale * mx.fast.layer_norm(x, None, None, eps) + shift


def numpy_layer_norm(
    x: np.ndarray, eps: float, scale: np.ndarray | None, shift: np.ndarray | None, into_gemm: bool
) -> np.ndarray | None:
    """`layer_norm` of fp32 NumPy arrays through oneDNN's primitive where the plan takes oneDNN's
    activations: fp32, or with `into_gemm` and bf16 GEMMs bf16 bits where oneDNN compiled that.
    None where it does not (the caller computes it otherwise), or where oneDNN has only its
    reference code for this shape (not what the plan measured)."""
    if cpu_plan.active("activation").name != "onednn":
        return None
    features = x.shape[-1]
    samples = x.shape[0] if scale is not None and scale.ndim > 1 else 1
    rows = x.size // features // samples
    if rows == 0:
        return None
    bf16 = into_gemm and cpu_plan.active().dtype == "bf16"
    primitive = onednn.layer_norm(rows, features, eps, "bf16") if bf16 else None
    if primitive is None or primitive.implementation.startswith("ref"):
        bf16, primitive = False, onednn.layer_norm(rows, features, eps)
    if primitive.implementation.startswith("ref"):
        return None
    values = np.ascontiguousarray(x).reshape(samples, rows, features)
    per_sample = [
        np.broadcast_to(default if a is None else a.reshape(-1, features), (samples, features))
        for a, default in ((scale, np.ones(features, np.float32)), (shift, np.zeros(features, np.float32)))
    ]
    out = np.empty(values.shape, np.uint16 if bf16 else np.float32)
    for sample in range(samples):
        scale_row, shift_row = (np.ascontiguousarray(a[sample]) for a in per_sample)
        primitive(values[sample], scale_row, shift_row, out[sample])
    return out.reshape(x.shape)
