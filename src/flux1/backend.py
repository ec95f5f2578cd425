"""Which kernels the networks compute with, and in which precision.

Two compute paths, one switch (`FLUX1_COMPUTE`, read here only):
- "mlx": MLX's own kernels (bf16 matmul, `quantized_matmul`, fused attention, `conv2d`): what Metal
  and CUDA run. Activations follow the weights' float dtype (a 16-bit checkpoint computes in bf16),
  or fp32 when asked.
- "numpy": the CPU device's kernels. MLX's CPU backend runs bf16 and quantized matmuls without a BLAS
  and elementwise work on one core, so weights stay compact in memory and each layer is expanded
  on all cores and multiplied through the GEMM that `cpu_plan.py` measured fastest on this machine
  (fp32, or bf16 inputs with fp32 sums); activations stay fp32 (`nn/cpu_linear.py` and siblings).
`auto` (the default) takes "numpy" on the CPU device and "mlx" on a GPU; `mlx` forces MLX's kernels on
any device (how CI runs what Metal and CUDA users run). `use("mlx")` does the same for a block of code.

Training differentiates through MLX's kernels (`training()`). A quantized base on the CPU device under
`auto` is the exception: MLX's CPU quantized matmul has no BLAS path, so there linear layers' frozen
products and attention run on the CPU kernels, which also compute their gradients for their inputs
(`cpu_linear.frozen_product`, `attention`). A dense base trains on MLX's kernels everywhere: on the
CPU they measured faster for it (benchmarks/train_step.py, README)."""

import contextlib
import os

import mlx.core as mx

SETTINGS = ("auto", "mlx")
PRECISIONS = ("auto", "fp32", "bf16")
_override: str | None = None
_cpu_kernels_in_training = False


def setting() -> str:
    return _override or _environment_setting()


def _environment_setting() -> str:
    value = os.environ.get("FLUX1_COMPUTE", "auto").strip().lower() or "auto"
    if value not in SETTINGS:
        raise ValueError(f"FLUX1_COMPUTE={value}: expected one of {', '.join(SETTINGS)}")
    return value


@contextlib.contextmanager
def use(value: str):
    """Compute with `value` ("auto" or "mlx") inside the block, whatever FLUX1_COMPUTE says."""
    global _override
    if value not in SETTINGS:
        raise ValueError(f"compute path {value}: expected one of {', '.join(SETTINGS)}")
    previous, _override = _override, value
    try:
        yield
    finally:
        _override = previous


@contextlib.contextmanager
def training(cpu_kernels: bool):
    """Inside the block the networks compute so that MLX can differentiate them; with `cpu_kernels`
    (a quantized base), on the CPU kernels where they run (`cpu_kernels_in_training`)."""
    global _cpu_kernels_in_training
    previous, _cpu_kernels_in_training = _cpu_kernels_in_training, cpu_kernels
    try:
        with use("mlx"):
            yield
    finally:
        _cpu_kernels_in_training = previous


def cpu_kernels_in_training() -> bool:
    """True while training a quantized base on the CPU device under `auto`: linear layers and attention
    compute on the CPU kernels, with their gradients for their inputs."""
    return _cpu_kernels_in_training and on_cpu() and _environment_setting() == "auto"


def on_cpu() -> bool:
    return mx.default_device().type == mx.DeviceType.cpu


def numpy_kernels() -> bool:
    """True where the CPU kernels (fp32 through NumPy's BLAS) compute instead of MLX's own."""
    return on_cpu() and setting() == "auto"


def path_name() -> str:
    return "numpy" if numpy_kernels() else "mlx"


def weights_dtype(module) -> mx.Dtype:
    """bf16 if the module holds 16-bit float weights (bf16 or fp16, dense or quantization scales),
    else fp32. fp16 weights compute in bf16: FLUX's residual stream overflows fp16's range."""
    from mlx.utils import tree_flatten

    for _, array in tree_flatten(module.parameters()):
        if array.dtype in (mx.bfloat16, mx.float16):
            return mx.bfloat16
    return mx.float32


def compute_dtype(weights: mx.Dtype = mx.float32, precision: str = "auto") -> mx.Dtype:
    """The activation dtype for weights of float dtype `weights` under `precision`."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    if numpy_kernels():
        # Activations stay fp32 on the CPU kernels; the precision picks their GEMMs (cpu_plan.py).
        if precision == "bf16":
            from flux1 import cpu_plan

            cpu_plan.require_bf16()
        return mx.float32
    if precision == "auto":
        return mx.bfloat16 if weights in (mx.bfloat16, mx.float16) else mx.float32
    return mx.bfloat16 if precision == "bf16" else mx.float32
