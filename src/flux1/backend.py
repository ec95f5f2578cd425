"""Where and in which precision the networks compute.

CPU (the MLX CPU backend): weights stay compact (bf16 or quantized) in memory and are expanded
to fp32 per layer, because only fp32 matmuls go through BLAS. GPU (Metal, CUDA): MLX's native
bf16 and quantized kernels.
"""

import mlx.core as mx


def on_cpu() -> bool:
    return mx.default_device().type == mx.DeviceType.cpu


def compute_dtype(weight_dtype: mx.Dtype = mx.bfloat16) -> mx.Dtype:
    """Activation dtype: fp32 on CPU, the weights' float dtype on GPU."""
    if on_cpu() or weight_dtype not in (mx.float16, mx.bfloat16):
        return mx.float32
    return weight_dtype
