"""The CPU path of `Linear`: the weight expanded on all cores to the dtype of the plan's GEMM
(`cpu_plan.active()`: fp32, or bf16 where bf16 GEMMs are faster; `nn/cpu_expansion.py`), then one
GEMM. Quantized weights skip the expansion where the kernels can multiply their codes: products of
a few rows (`product_from_codes`), and with bf16 GEMMs 4-bit codes (MLX's, Q4_K's) in AMX tiles where the plan
measured that faster (`tile_product`).

Why NumPy (measured on 2 Zen 4 cores, 1280 x 3072 @ 3072 x 21504, benchmarks/profile_step.py):
NumPy's bundled OpenBLAS runs the product in 0.90 s where MLX's matmul through MKL takes 1.13 s;
expanding 8-bit codes to fp32 in NumPy on both cores takes 0.04 s where `mx.dequantize` takes 0.45 s
(bf16 -> fp32: 0.02 s against 0.16 s); and MLX's own CPU matmuls of bf16 or quantized weights do not
use a BLAS at all.
"""

import itertools
from functools import partial
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from flux1 import cpu_plan
from flux1.nn import native
from flux1.nn.cpu_activations import add_bias_gelu_tanh
from flux1.nn.cpu_expansion import (
    FEW_ROWS,
    expanded_weight,
    fits_tiles,
    product_from_codes,
    scratch_lock,
    tile_product,
)
from flux1.nn.gemm import NATIVE_KERNELS, gemm, operand
from flux1.nn.numpy_cpu import (
    CACHED_VALUES,
    as_bf16,
    as_float32,
    as_mlx,
    as_numpy,
    float32_values,
    in_parallel,
)


def linear(
    x: mx.array | list[mx.array], layer, gelu_from: int | None = None, gelu_into_gemm: bool = False
) -> list[mx.array]:
    """x @ W^T + bias + the adapters' terms for a `Linear` on the CPU: the product through the plan's
    GEMM (bf16 GEMMs round x and W to bf16), the output, bias and adapters in fp32.

    x is an array or the parts of one along its last axis: each part is multiplied by its columns of
    W, summed in the GEMM's output, in place of copying the parts into their concatenation. Returns
    [y]; with `gelu_from`, [y[..., :gelu_from], gelu_tanh(y[..., gelu_from:])] (for 0 just the
    GELU'd y), each part of the output a GEMM into its own buffer, its GELU applied in the pass that
    adds the bias (`cpu_activations.add_bias_gelu_tanh`) instead of in passes and copies of its own.
    With `gelu_into_gemm` (the GELU'd part feeds only linear layers) and bf16 GEMMs, that part comes
    rounded to bf16: the bits the next GEMM rounds it to, half the bytes to copy into MLX and no
    rounding pass in the next layer. Parts given in bf16 are taken as they are."""
    inputs = [_as_input(part) for part in (x if isinstance(x, list) else [x])]
    return _product(inputs, layer, layer.adapters, gelu_from, gelu_into_gemm, into_mlx=True)


def numpy_linear(x: list[np.ndarray], layer, gelu_from: int | None = None) -> list[np.ndarray]:
    """`linear` between NumPy arrays (fp32, or bf16 bits as uint16), for kernels that take NumPy
    arrays next (`nn/cpu_flux_blocks.py`): each output part fp32 (a GEMM that takes it in bf16
    rounds it as it reads it), and no MLX array made."""
    return _product(x, layer, layer.adapters, gelu_from, False, into_mlx=False)


def frozen_product(x: mx.array, layer) -> mx.array:
    """x @ W^T + bias as `linear` computes it, for MLX's autograd: W and the bias are frozen, and the
    gradient for x, dy @ W, goes through the same GEMM. The adapters, which train, are the caller's."""
    product = mx.custom_function(lambda x: _product([_as_input(x)], layer, (), None, False, into_mlx=True)[0])
    product.vjp(lambda x, dy, y: _input_gradient(dy, layer).astype(x.dtype))
    return product(x)


def _as_input(x: mx.array) -> np.ndarray:
    return as_numpy(x if x.dtype == mx.bfloat16 else x.astype(mx.float32))


def _product(
    inputs: list[np.ndarray], layer, adapters, gelu_from: int | None, gelu_into_gemm: bool, into_mlx: bool
) -> list:
    path = cpu_plan.active()
    leading = inputs[0].shape[:-1]
    flats = [part.reshape(-1, part.shape[-1]) for part in inputs]
    rows = len(flats[0])
    bounds = [0, layer.output_dims] if not gelu_from else [0, gelu_from, layer.output_dims]
    from_codes = rows <= FEW_ROWS and layer.is_quantized and native.library() is not None
    # 4-bit codes in AMX tiles or AVX512-BF16 vectors where the plan measured that faster, bf16 weights
    # where its GEMM is flux1's own: x packed once for every part of the output, fp32 parts rounded as
    # they are packed.
    kernel = None
    if (
        not from_codes
        and path.dtype == "bf16"
        and fits_tiles(layer, [flat.shape[1] for flat in flats], bounds)
    ):
        kernel = cpu_plan.quantized_product().kernel if layer.is_quantized else NATIVE_KERNELS.get(path.name)
    in_own_gemm = kernel is not None
    bias = np.ascontiguousarray(as_float32(layer.bias)) if "bias" in layer else None
    outputs = []
    for first, last in itertools.pairwise(bounds):
        gelu = gelu_from is not None and last == layer.output_dims
        part_bias = None if bias is None else bias[first:last]
        # The sums start from the bias: in the tiles, or in the output (unless the GELU's pass adds it).
        start = None if in_own_gemm or gelu else part_bias
        y, buffer = _output(rows, last - first, start, into_mlx and not gelu)
        outputs.append(_Part(y, first, last, part_bias, start is not None, buffer))
    if from_codes:
        # Contiguous whatever the input's layout (a broadcast row: every step's pooled text vector).
        x = np.ascontiguousarray(np.concatenate([float32_values(flat) for flat in flats], axis=1))
        for part in outputs:
            product_from_codes(layer, x, part.first, part.last, part.y, accumulate=part.holds_bias)
    elif in_own_gemm:
        # fp32 parts rounded to bf16 as they are packed: no pass of their own
        parts = [flat if flat.dtype == np.uint16 else float32_values(flat) for flat in flats]
        parts = [p if p.strides[1] == p.itemsize else np.ascontiguousarray(p) for p in parts]
        packed = native.pack_tile_rows(
            [(p.ctypes.data, p.strides[0] // p.itemsize, p.shape[1], p.dtype == np.float32) for p in parts],
            rows,
        )
        for part in outputs:
            tile_product(layer, packed, rows, part.first, part.last, part.y, False, part.bias, kernel)
    else:
        _gemms(flats, layer, path, outputs)
    terms = []
    if adapters:
        fp32 = [float32_values(flat) for flat in flats]
        whole = fp32[0] if len(fp32) == 1 else np.concatenate(fp32, axis=1)
        terms = [_adapter_term(whole, adapter) for adapter in adapters]
    results = []
    for y, first, last, part_bias, holds_bias, buffer in outputs:
        if in_own_gemm or holds_bias:
            part_bias = None  # in the sums already
        part_terms = [term[:, first:last] for term in terms]
        gelu = gelu_from is not None and last == layer.output_dims
        if gelu and not part_terms:
            add_bias_gelu_tanh(cpu_plan.active("activation"), y, part_bias)
        else:
            if part_bias is not None or part_terms:
                in_parallel(partial(_add_to_rows, y, part_bias, part_terms), y.shape[0])
            if gelu:
                add_bias_gelu_tanh(cpu_plan.active("activation"), y, None)
        if buffer is not None:
            results.append(buffer.reshape(*leading, y.shape[1]))
            continue
        y = y.reshape(*leading, y.shape[1])
        results.append((gemm_input(y) if gelu and gelu_into_gemm else as_mlx(y)) if into_mlx else y)
    return results


class _Part(NamedTuple):
    """A part of `_product`'s output: where it is written, its columns, their biases, whether the
    output holds them already, the MLX array it views (or None)."""

    y: np.ndarray
    first: int
    last: int
    bias: np.ndarray | None
    holds_bias: bool
    buffer: mx.array | None


def _gemms(flats: list[np.ndarray], layer, path, outputs: list) -> None:
    """`_product`'s outputs through the plan's GEMM, the weight expanded for it."""
    operands = [operand(flat, path) for flat in flats]  # rounded once, not once per output part
    columns = np.cumsum([0] + [flat.shape[1] for flat in flats])
    with scratch_lock:
        weight = expanded_weight(layer, path.dtype, cpu_plan.expansion().kernel)
        for part in outputs:
            for i, (a, (start, stop)) in enumerate(zip(operands, itertools.pairwise(columns), strict=True)):
                weight_part = weight[part.first : part.last, start:stop].T
                gemm(path, a, weight_part, out=part.y, accumulate=i > 0 or part.holds_bias)


def _output(
    rows: int, cols: int, bias: np.ndarray | None, into_mlx: bool
) -> tuple[np.ndarray, mx.array | None]:
    """(where the GEMMs write [rows, cols], the MLX array it views where `into_mlx`), each row holding
    `bias` where given, for the GEMMs to add to: no pass that adds it after them. Into MLX, a new
    MLX array the GEMMs write in place: no copy into MLX (MLX cannot allocate without filling; the
    fill is the bias). 2 Intel Xeon cores with AMX, `python benchmarks/profile_step.py --dtype
    bfloat16 --repeats 5`, alternated twice: the step 0.574, 0.579 s before, 0.558, 0.562 s after."""
    if into_mlx:
        buffer = mx.zeros((rows, cols))
        if bias is not None:
            buffer = buffer + mx.array(bias)  # a new buffer
        return as_numpy(buffer), buffer
    y = np.empty((rows, cols), np.float32)
    if bias is not None:
        in_parallel(lambda start, stop: np.copyto(y[start:stop], bias), rows)
    return y, None


def gemm_input(y: np.ndarray) -> mx.array:
    """fp32 y as an MLX array for linear layers only: with bf16 GEMMs rounded to bf16, the bits their
    GEMM would round it to (half the bytes to copy, no rounding pass in the next layer)."""
    return as_mlx(as_bf16(y) if cpu_plan.active().dtype == "bf16" else y)


def _input_gradient(dy: mx.array, layer) -> mx.array:
    """dy @ W: the gradient of x @ W^T for x, through the plan's GEMM."""
    gradient = as_numpy(dy.astype(mx.float32))
    flat = gradient.reshape(-1, gradient.shape[-1])
    path = cpu_plan.active()
    with scratch_lock:
        dx = gemm(path, flat, expanded_weight(layer, path.dtype, cpu_plan.expansion().kernel))
    return mx.array(dx.reshape(*dy.shape[:-1], dx.shape[-1]))


def _adapter_term(flat: np.ndarray, adapter) -> np.ndarray:
    """What the adapter adds to the output: scale * (x @ down^T) @ up^T, or x @ change^T."""
    if hasattr(adapter, "down"):  # low rank: the [tokens, rank] product first
        t = flat @ as_float32(adapter.down).T
        t *= adapter.scale
        if adapter.rows is None:
            return t @ as_float32(adapter.up).T
        term = np.zeros((flat.shape[0], adapter.output_dims), np.float32)
        np.matmul(t, as_float32(adapter.up).T, out=term[:, adapter.rows])
        return term
    return flat @ as_float32(adapter.change).T


def _add_to_rows(y: np.ndarray, bias, terms: list, start: int, stop: int) -> None:
    """Adds the bias and the adapters' terms to rows start..stop of y, a cache-sized block at a
    time (one pass over y, instead of one per term)."""
    step = max(1, CACHED_VALUES // y.shape[1])
    for row in range(start, stop, step):
        block = y[row : min(row + step, stop)]
        if bias is not None:
            block += bias
        for term in terms:
            block += term[row : row + len(block)]
