"""The CPU path of `Linear`: the weight expanded on all cores to the dtype of the plan's GEMM
(`cpu_plan.active()`: fp32, or bf16 where bf16 GEMMs are faster), then one GEMM.

Why NumPy (measured on 2 Zen 4 cores, 1280 x 3072 @ 3072 x 21504, benchmarks/profile_step.py):
NumPy's bundled OpenBLAS runs the product in 0.90 s where MLX's matmul through MKL takes 1.13 s;
expanding 8-bit codes to fp32 in NumPy on both cores takes 0.04 s where `mx.dequantize` takes 0.45 s
(bf16 -> fp32: 0.02 s against 0.16 s); and MLX's own CPU matmuls of bf16 or quantized weights do not
use a BLAS at all. Weights already in the GEMM's dtype are used in place (zero-copy views: fp32 for
fp32 GEMMs, bf16 for bf16 GEMMs). Others go into one scratch buffer reused by every layer, so a
compact model holds one layer expanded at a time.
"""

import itertools
import threading
from functools import partial

import mlx.core as mx
import numpy as np

from flux1 import cpu_plan
from flux1.gguf.expand import expand_rows
from flux1.nn.cpu_activations import add_bias_gelu_tanh
from flux1.nn.gemm import gemm, operand
from flux1.nn.numpy_cpu import CACHED_VALUES, as_float32, as_numpy, in_parallel, round_to_bf16

_lock = threading.Lock()  # guards the scratch buffer
_scratch = np.empty(0, np.uint8)


def _codes(packed: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """uint8 codes [rows, cols] of rows packed as MLX does (a little-endian bit stream per row)."""
    raw = packed.view(np.uint8)
    if bits == 8:
        return raw
    rows = raw.shape[0]
    if bits == 4:
        # Each byte widened to a uint16 holding its low code in its low byte and its high code in its
        # high byte (x86 and ARM are little-endian): contiguous passes instead of writing each byte's
        # two codes through strided views (benchmarks/gguf_expand.py on 2 Zen 1 cores: a 3072 x 21504
        # weight in 116-158 ms against 137-166).
        pair = raw.astype(np.uint16)
        high = np.left_shift(pair, 4)
        np.bitwise_and(pair, 0x000F, out=pair)
        np.bitwise_and(high, 0x0F00, out=high)
        np.bitwise_or(pair, high, out=pair)
        return pair.view(np.uint8).reshape(rows, cols)
    codes = np.empty((rows, cols // 8, 8), np.uint8)
    # Any width: 8 codes fill `bits` bytes; read them as one integer and shift each code out.
    octets = raw.reshape(rows, cols // 8, bits)
    word = octets[..., 0].astype(np.uint64)
    for i in range(1, bits):
        word |= octets[..., i].astype(np.uint64) << np.uint64(8 * i)
    mask = np.uint64((1 << bits) - 1)
    for k in range(8):
        codes[..., k] = (word >> np.uint64(k * bits)) & mask
    return codes.reshape(rows, cols)


def _scratch_matrix(rows: int, cols: int, dtype) -> np.ndarray:
    global _scratch
    size = rows * cols * np.dtype(dtype).itemsize
    if _scratch.size < size:
        _scratch = np.empty(size, np.uint8)
    return _scratch[:size].view(dtype).reshape(rows, cols)


def expanded_weight(layer, dtype: str = "fp32") -> np.ndarray:
    """The weight of a `Linear` as [out, in] in `dtype`: fp32, or bf16 (rounded to nearest, as
    uint16 bits). A view if it is stored so, else the scratch buffer."""
    weight = layer.weight
    stored = {mx.float32: "fp32", mx.bfloat16: "bf16"}.get(weight.dtype) if layer.bits is None else None
    if stored == dtype:
        return as_numpy(weight)
    rows, cols = layer.output_dims, layer.input_dims
    out = _scratch_matrix(rows, cols, np.float32 if dtype == "fp32" else np.uint16)
    if stored == "bf16":  # to fp32: exact, a shift
        source = as_numpy(weight)

        def fill(start, stop):
            np.left_shift(source[start:stop], 16, out=out[start:stop].view(np.uint32), dtype=np.uint32)

        in_parallel(fill, rows)
        return out
    if layer.gguf_type is not None:
        raw = as_numpy(weight)

        def fp32_rows(first, last, target):
            expand_rows(raw[first:last], layer.gguf_type, target)
    elif layer.bits is None:
        source = as_numpy(weight)

        def fp32_rows(first, last, target):
            np.copyto(target, source[first:last])
    else:
        packed, groups = as_numpy(weight), cols // layer.group_size
        scales = as_float32(layer.scales)[..., None]
        biases = as_float32(layer.biases)[..., None]

        def fp32_rows(first, last, target):
            codes = _codes(packed[first:last], layer.bits, cols).reshape(last - first, groups, -1)
            grouped = target.reshape(last - first, groups, -1)
            # Widened first: NumPy's multiply of uint8 by fp32 casts through a buffer, slower than
            # a plain copy and two fp32 passes (the same values; `benchmarks/gguf_expand.py` on 2
            # Intel Xeon cores, 3072 x 21504 to fp32: 4-bit 56, 62 ms against 69, 67; 8-bit 46, 47
            # against 62, 59).
            np.copyto(grouped, codes)
            grouped *= scales[first:last]
            grouped += biases[first:last]

    def fill(start, stop):
        """A cache-sized block of rows at a time, expanded to fp32 and, for bf16, rounded while
        still in the cache."""
        step = max(1, CACHED_VALUES // cols)
        block = np.empty((step, cols), np.float32) if dtype == "bf16" else None
        for first in range(start, stop, step):
            last = min(first + step, stop)
            if block is None:
                fp32_rows(first, last, out[first:last])
            else:
                fp32_rows(first, last, block[: last - first])
                round_to_bf16(block[: last - first], out[first:last])

    in_parallel(fill, rows)
    return out


def linear(x: mx.array | list[mx.array], layer, gelu_from: int | None = None) -> list[mx.array]:
    """x @ W^T + bias + the adapters' terms for a `Linear` on the CPU: the product through the plan's
    GEMM (bf16 GEMMs round x and W to bf16), the output, bias and adapters in fp32.

    x is an array or the parts of one along its last axis: each part is multiplied by its columns of
    W, summed in the GEMM's output, in place of copying the parts into their concatenation. Returns
    [y]; with `gelu_from`, [y[..., :gelu_from], gelu_tanh(y[..., gelu_from:])] (for 0 just the
    GELU'd y), each part of the output a GEMM into its own buffer, its GELU applied in the pass that
    adds the bias (`cpu_activations.add_bias_gelu_tanh`) instead of in passes and copies of its own."""
    return _product(x if isinstance(x, list) else [x], layer, layer.adapters, gelu_from)


def frozen_product(x: mx.array, layer) -> mx.array:
    """x @ W^T + bias as `linear` computes it, for MLX's autograd: W and the bias are frozen, and the
    gradient for x, dy @ W, goes through the same GEMM. The adapters, which train, are the caller's."""
    product = mx.custom_function(lambda x: _product([x], layer, (), None)[0])
    product.vjp(lambda x, dy, y: _input_gradient(dy, layer).astype(x.dtype))
    return product(x)


def _product(parts: list[mx.array], layer, adapters, gelu_from: int | None) -> list[mx.array]:
    path = cpu_plan.active()
    inputs = [as_numpy(part.astype(mx.float32)) for part in parts]
    leading = inputs[0].shape[:-1]
    flats = [part.reshape(-1, part.shape[-1]) for part in inputs]
    operands = [operand(flat, path) for flat in flats]  # rounded once, not once per output part
    columns = np.cumsum([0] + [flat.shape[1] for flat in flats])
    rows = [0, layer.output_dims] if not gelu_from else [0, gelu_from, layer.output_dims]
    outputs = []
    with _lock:
        weight = expanded_weight(layer, path.dtype)
        for first, last in itertools.pairwise(rows):
            y = np.empty((len(flats[0]), last - first), np.float32)
            for i, (a, (start, stop)) in enumerate(zip(operands, itertools.pairwise(columns), strict=True)):
                gemm(path, a, weight[first:last, start:stop].T, out=y, accumulate=i > 0)
            outputs.append((y, first, last))
    bias = as_float32(layer.bias) if "bias" in layer else None
    terms = []
    if adapters:
        whole = flats[0] if len(flats) == 1 else np.concatenate(flats, axis=1)
        terms = [_adapter_term(whole, adapter) for adapter in adapters]
    results = []
    for y, first, last in outputs:
        part_bias = None if bias is None else bias[first:last]
        part_terms = [term[:, first:last] for term in terms]
        gelu = gelu_from is not None and last == layer.output_dims
        if gelu and not part_terms:
            add_bias_gelu_tanh(cpu_plan.active("activation"), y, part_bias)
        else:
            if part_bias is not None or part_terms:
                in_parallel(partial(_add_to_rows, y, part_bias, part_terms), y.shape[0])
            if gelu:
                add_bias_gelu_tanh(cpu_plan.active("activation"), y, None)
        results.append(mx.array(y.reshape(*leading, y.shape[1])))
    return results


def _input_gradient(dy: mx.array, layer) -> mx.array:
    """dy @ W: the gradient of x @ W^T for x, through the plan's GEMM."""
    gradient = as_numpy(dy.astype(mx.float32))
    flat = gradient.reshape(-1, gradient.shape[-1])
    path = cpu_plan.active()
    with _lock:
        dx = gemm(path, flat, expanded_weight(layer, path.dtype))
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
