"""FLUX's double and single blocks on the CPU kernels, NumPy arrays passed between the kernels.

Through `Linear` and `layer_norm` each kernel's output is copied into a new MLX array (MLX cannot
allocate without filling, and fills on one core), and each gated residual sum is two of MLX's passes
on one core. Here a block reads its input in place, every kernel's output stays the NumPy array the
kernel wrote (fp32, rounded by the bf16 GEMM that takes it; the modulated inputs in bf16 bits from
the layer norm), the residual sums are one pass on all cores into the output projection's array, and
only the block's output is copied into MLX. The
arithmetic is `flux_blocks.py`'s, kernel for kernel: the same outputs as through `Linear`.
"""

import mlx.core as mx
import numpy as np

from flux1.nn import cpu_linear, cpu_rope_attention
from flux1.nn.layer_norm import layer_norm, numpy_layer_norm
from flux1.nn.linear import Linear
from flux1.nn.numpy_cpu import CACHED_VALUES, as_float32, as_mlx, as_numpy, in_parallel


def takes(*layers) -> bool:
    """Whether these layers of a block are all `Linear`s (a tensor-parallel rank wraps some: its
    blocks run as `flux_blocks.py` writes them)."""
    return all(isinstance(layer, Linear) for layer in layers)


def double_block(
    block, img: mx.array, txt: mx.array, modulations, rope, eps: float
) -> tuple[mx.array, mx.array]:
    """`DoubleStreamBlock.__call__` on the CPU kernels."""
    (img_mod, txt_mod), length = ([as_float32(m) for m in stream] for stream in modulations), txt.shape[1]
    img_x, txt_x = as_float32(img), as_float32(txt)
    img_qkv = _linear(block.img_attn.qkv, modulated(img_x, img_mod[0], img_mod[1], eps))
    txt_qkv = _linear(block.txt_attn.qkv, modulated(txt_x, txt_mod[0], txt_mod[1], eps))
    streams = [(txt_qkv, *_norm_scales(block.txt_attn.norm)), (img_qkv, *_norm_scales(block.img_attn.norm))]
    attn = cpu_rope_attention.numpy_rope_attention(streams, block.img_attn.num_heads, *rope, eps)

    img_x = gated_sum(img_x, img_mod[2], _linear(block.img_attn.proj, attn[:, length:]))
    img_x = gated_sum(img_x, img_mod[5], _feed_forward(block.img_mlp, modulated(img_x, *img_mod[3:5], eps)))
    txt_x = gated_sum(txt_x, txt_mod[2], _linear(block.txt_attn.proj, attn[:, :length]))
    txt_x = gated_sum(txt_x, txt_mod[5], _feed_forward(block.txt_mlp, modulated(txt_x, *txt_mod[3:5], eps)))
    return as_mlx(img_x).astype(img.dtype), as_mlx(txt_x).astype(txt.dtype)


def single_block(block, x: mx.array, modulations, rope, eps: float) -> mx.array:
    """`SingleStreamBlock.__call__` on the CPU kernels."""
    shift, scale, gate = (as_float32(m) for m in modulations)
    values = as_float32(x)
    qkv, mlp = cpu_linear.numpy_linear(
        [modulated(values, shift, scale, eps)], block.linear1, gelu_from=3 * block.dim
    )
    attn = cpu_rope_attention.numpy_rope_attention(
        [(qkv, *_norm_scales(block.norm))], block.num_heads, *rope, eps
    )
    return as_mlx(gated_sum(values, gate, _linear(block.linear2, [attn, mlp]))).astype(x.dtype)


def _linear(layer: Linear, x: np.ndarray | list[np.ndarray], gelu: bool = False) -> np.ndarray:
    parts = x if isinstance(x, list) else [x]
    gelu_from = 0 if gelu else None
    return cpu_linear.numpy_linear(parts, layer, gelu_from=gelu_from)[0]


def _feed_forward(layers: list, x: np.ndarray) -> np.ndarray:
    up, _, down = layers
    return _linear(down, _linear(up, x, gelu=True))


def _norm_scales(norm) -> tuple[mx.array, mx.array]:
    return norm.query_norm.scale, norm.key_norm.scale


def modulated(x: np.ndarray, shift: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
    """`flux_blocks.modulate`: (1 + scale) LN(x) + shift, for linear layers only."""
    y = numpy_layer_norm(x, eps, 1 + scale, shift, into_gemm=True)
    if y is None:
        y = as_numpy(layer_norm(mx.array(x), eps, mx.array(1 + scale), mx.array(shift)))
    return y


def gated_sum(x: np.ndarray, gate: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x + gate * y into y (x, y [B, L, dim], gate [B, 1, dim]): MLX's two roundings, one pass on all
    cores, a cache-sized block of rows at a time."""
    step = max(1, CACHED_VALUES // y.shape[-1])

    def rows(start: int, stop: int) -> None:
        for b in range(len(y)):
            for row in range(start, stop, step):
                block = y[b, row : min(row + step, stop)]
                block *= gate[b]
                block += x[b, row : row + len(block)]

    in_parallel(rows, y.shape[1])
    return y
