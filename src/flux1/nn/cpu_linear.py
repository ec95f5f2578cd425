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

import mlx.core as mx
import numpy as np

from flux1 import cpu_plan
from flux1.nn import native
from flux1.nn.cpu_activations import add_bias_gelu_tanh
from flux1.nn.cpu_expansion import (
    FEW_ROWS,
    TILES,
    expanded_weight,
    fits_tiles,
    product_from_codes,
    scratch_lock,
    tile_product,
)
from flux1.nn.gemm import gemm, operand
from flux1.nn.numpy_cpu import CACHED_VALUES, as_bf16, as_float32, as_numpy, float32_values, in_parallel


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
    return _product(x if isinstance(x, list) else [x], layer, layer.adapters, gelu_from, gelu_into_gemm)


def frozen_product(x: mx.array, layer) -> mx.array:
    """x @ W^T + bias as `linear` computes it, for MLX's autograd: W and the bias are frozen, and the
    gradient for x, dy @ W, goes through the same GEMM. The adapters, which train, are the caller's."""
    product = mx.custom_function(lambda x: _product([x], layer, (), None)[0])
    product.vjp(lambda x, dy, y: _input_gradient(dy, layer).astype(x.dtype))
    return product(x)


def _product(
    parts: list[mx.array], layer, adapters, gelu_from: int | None, gelu_into_gemm: bool = False
) -> list[mx.array]:
    path = cpu_plan.active()
    inputs = [as_numpy(part if part.dtype == mx.bfloat16 else part.astype(mx.float32)) for part in parts]
    leading = inputs[0].shape[:-1]
    flats = [part.reshape(-1, part.shape[-1]) for part in inputs]
    bounds = [0, layer.output_dims] if not gelu_from else [0, gelu_from, layer.output_dims]
    outputs = []  # each part of the output: (where it is written, its columns, the MLX array it views)
    for first, last in itertools.pairwise(bounds):
        y, biased = _output(
            layer, len(flats[0]), first, last, gelu_from is not None and last == layer.output_dims
        )
        outputs.append((y, first, last, biased))
    if len(flats[0]) <= FEW_ROWS and layer.is_quantized and native.library() is not None:
        # Contiguous whatever the input's layout (a broadcast row: every step's pooled text vector).
        x = np.ascontiguousarray(np.concatenate([float32_values(flat) for flat in flats], axis=1))
        for y, first, last, biased in outputs:
            product_from_codes(layer, x, first, last, y, accumulate=biased is not None)
    elif (
        path.dtype == "bf16"
        and fits_tiles(layer, [flat.shape[1] for flat in flats], bounds)
        and cpu_plan.quantized_product().name == TILES
    ):
        parts = [operand(flat, path) for flat in flats]
        parts = [part if part.strides[1] == 2 else np.ascontiguousarray(part) for part in parts]
        packed = native.pack_tile_rows(
            [(p.ctypes.data, p.strides[0] // 2, p.shape[1]) for p in parts], len(parts[0])
        )
        for y, first, last, biased in outputs:
            tile_product(layer, packed, len(flats[0]), first, last, y, accumulate=biased is not None)
    else:
        _gemms(flats, layer, path, outputs)
    bias = as_float32(layer.bias) if "bias" in layer else None
    terms = []
    if adapters:
        fp32 = [float32_values(flat) for flat in flats]
        whole = fp32[0] if len(fp32) == 1 else np.concatenate(fp32, axis=1)
        terms = [_adapter_term(whole, adapter) for adapter in adapters]
    results = []
    for y, first, last, biased in outputs:
        part_bias = None if bias is None or biased is not None else bias[first:last]
        part_terms = [term[:, first:last] for term in terms]
        gelu = gelu_from is not None and last == layer.output_dims
        if gelu and not part_terms:
            add_bias_gelu_tanh(cpu_plan.active("activation"), y, part_bias)
        else:
            if part_bias is not None or part_terms:
                in_parallel(partial(_add_to_rows, y, part_bias, part_terms), y.shape[0])
            if gelu:
                add_bias_gelu_tanh(cpu_plan.active("activation"), y, None)
        if biased is not None:
            results.append(biased.reshape(*leading, y.shape[1]))
            continue
        y = y.reshape(*leading, y.shape[1])
        results.append(gemm_input(y) if gelu and gelu_into_gemm else mx.array(y))
    return results


def _gemms(flats: list[np.ndarray], layer, path, outputs: list) -> None:
    """`_product`'s outputs through the plan's GEMM, the weight expanded for it."""
    operands = [operand(flat, path) for flat in flats]  # rounded once, not once per output part
    columns = np.cumsum([0] + [flat.shape[1] for flat in flats])
    with scratch_lock:
        weight = expanded_weight(layer, path.dtype, cpu_plan.expansion().kernel)
        for y, first, last, biased in outputs:
            for i, (a, (start, stop)) in enumerate(zip(operands, itertools.pairwise(columns), strict=True)):
                gemm(path, a, weight[first:last, start:stop].T, out=y, accumulate=i > 0 or biased is not None)


def _output(layer, rows: int, first: int, last: int, gelu: bool) -> tuple[np.ndarray, mx.array | None]:
    """(where the GEMMs write output columns first..last, the MLX array it views or None). A part with
    a bias and no GELU goes into a new MLX array holding the bias in every row, which the GEMMs add
    to: no pass that adds the bias, no copy into MLX (MLX cannot allocate without filling; the fill
    is the bias). 2 Intel Xeon cores with AMX, `python benchmarks/profile_step.py --dtype bfloat16
    --repeats 5`, alternated twice: the step 0.574, 0.579 s before, 0.558, 0.562 s after."""
    if "bias" in layer and not gelu:
        biased = mx.zeros((rows, last - first)) + layer.bias[first:last].astype(mx.float32)  # a new buffer
        return as_numpy(biased), biased
    return np.empty((rows, last - first), np.float32), None


def gemm_input(y: np.ndarray) -> mx.array:
    """fp32 y as an MLX array for linear layers only: with bf16 GEMMs rounded to bf16, the bits their
    GEMM would round it to (half the bytes to copy, no rounding pass in the next layer)."""
    if cpu_plan.active().dtype == "bf16":
        return mx.array(as_bf16(y)).view(mx.bfloat16)
    return mx.array(y)


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
