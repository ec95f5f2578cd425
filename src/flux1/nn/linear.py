"""The one linear layer of the project: dense or quantized weights, plus low-rank adapters."""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from flux1 import backend
from flux1.gguf import affine as gguf_affine
from flux1.gguf.blocks import block_size, cpu_form, to_cpu_form
from flux1.gguf.expand import expanded
from flux1.nn import cpu_linear
from flux1.nn.activations import gelu_tanh
from flux1.nn.numpy_cpu import as_numpy


class LowRankAdapter(nn.Module):
    """Adds `scale * (x @ down.T) @ up.T` to the output rows `rows` (all rows when None: a LoRA of a
    whole layer, or one whose `up` is zero outside its slice). An MLX module whose only parameters
    are `down` and `up`, so a trainer can differentiate and optimize exactly these; a `Linear`
    keeps its adapters out of its own parameters (weight files stay strict)."""

    def __init__(self, down: mx.array, up: mx.array, scale: float, rows: slice | None = None):
        super().__init__()
        if rows is not None and rows.stop - rows.start != up.shape[0]:
            raise ValueError(f"adapter up of {up.shape[0]} rows for rows {rows.start}..{rows.stop}")
        self.down = down  # [rank, in]
        self.up = up  # [len(rows) or out, rank]
        self.scale = scale
        object.__setattr__(self, "rows", rows)

    @property
    def shape(self) -> tuple[int, int]:
        """[out, in] of the layer it fits (for a row slice, the least output width that holds it)."""
        out = self.up.shape[0] if self.rows is None else self.rows.stop
        return out, self.down.shape[1]

    def delta(self) -> mx.array:
        """The full-height change of the layer it was added to (`output_dims` rows)."""
        change = self.scale * (self.up.astype(mx.float32) @ self.down.astype(mx.float32))
        return self._placed(change, axis=0)

    def full_up(self) -> mx.array:
        """`up` at its rows of the layer's output, zero elsewhere."""
        return self._placed(self.up, axis=0)

    def __call__(self, x: mx.array) -> mx.array:
        dtype = x.dtype
        term = (x @ self.down.astype(dtype).T) @ (self.scale * self.up.astype(dtype)).T
        return self._placed(term, axis=-1)

    def _placed(self, part: mx.array, axis: int) -> mx.array:
        """`part` (the rows' share) at its rows of the layer's output, zero elsewhere."""
        if self.rows is None:
            return part
        widths = [(0, 0)] * part.ndim
        widths[axis] = (self.rows.start, self.output_dims - self.rows.stop)
        return mx.pad(part, widths)


@dataclass
class DenseDeltaAdapter:
    """Adds `x @ change.T`: a full-rank change (LoHa, LoKr, ComfyUI .diff) kept beside a quantized
    weight, which merging would erase."""

    change: mx.array  # [out, in]

    @property
    def shape(self) -> tuple[int, int]:
        return self.change.shape

    def delta(self) -> mx.array:
        return self.change.astype(mx.float32)

    def __call__(self, x: mx.array) -> mx.array:
        return x @ self.change.astype(x.dtype).T


class Linear(nn.Module):
    """`y = x W^T + b`. W is dense (any float dtype), MLX affine-quantized (`weight` uint32 codes,
    `scales`, `biases`, with `bits` and `group_size`) or GGUF blocks (`weight` the file's uint8
    blocks, row by row, with `gguf_type`)."""

    def __init__(self, input_dims: int, output_dims: int, bias: bool = True):
        super().__init__()
        self.weight = mx.zeros((output_dims, input_dims))
        if bias:
            self.bias = mx.zeros((output_dims,))
        self.bits: int | None = None
        self.group_size: int | None = None
        self.gguf_type: int | str | None = None  # a `gguf.blocks.LAYOUTS` key
        object.__setattr__(self, "adapters", [])

    @property
    def input_dims(self) -> int:
        if self.gguf_type is not None:
            values, nbytes = block_size(self.gguf_type)
            return self.weight.shape[1] // nbytes * values
        if self.bits is None:
            return self.weight.shape[1]
        return self.weight.shape[1] * 32 // self.bits

    @property
    def output_dims(self) -> int:
        return self.weight.shape[0]

    @property
    def is_quantized(self) -> bool:
        return self.bits is not None or self.gguf_type is not None

    def set_quantized(self, weight, scales, biases, bits: int, group_size: int) -> None:
        """Hold already-quantized weights (from a saved folder or a GGUF file)."""
        self.weight, self.scales, self.biases = weight, scales, biases
        self.bits, self.group_size, self.gguf_type = bits, group_size, None

    def set_gguf(self, blocks: mx.array, gguf_type: int | str) -> None:
        """Hold a GGUF weight as its blocks (uint8 [out, bytes per row]), expanded per call on the CPU."""
        self.weight, self.gguf_type = blocks, gguf_type

    def to_affine(self) -> None:
        """GGUF blocks -> MLX affine quantization, which MLX's quantized_matmul multiplies by."""
        if self.gguf_type is not None:
            self.set_quantized(
                *gguf_affine.to_mlx_affine(as_numpy(self.weight), self.gguf_type, self.input_dims)
            )

    def to_cpu_form(self) -> None:
        """GGUF blocks re-laid in place as the CPU kernels expand them fastest (`gguf.blocks.to_cpu_form`:
        Q4_K's codes; the same values), once, at the layer's first expansion. The blocks are the
        layer's own (the loader's copy of the file's bytes)."""
        if self.gguf_type is not None and cpu_form(self.gguf_type) != self.gguf_type:
            self.weight = mx.contiguous(self.weight)  # rows the re-laying can write in place
            self.gguf_type = to_cpu_form(as_numpy(self.weight), self.gguf_type)

    def set_dense(self, weight: mx.array) -> None:
        """Hold `weight` as a dense matrix (in the dtype of the scales if the layer was quantized)."""
        if self.gguf_type is not None:
            dtype, self.gguf_type = mx.float32, None
        elif self.bits is not None:
            dtype = self.scales.dtype
            del self["scales"], self["biases"]
            self.bits = self.group_size = None
        else:
            dtype = self.weight.dtype
        self.weight = weight.astype(dtype)

    def quantize(self, bits: int, group_size: int) -> bool:
        """Quantize the dense weight in place; False (and unchanged) if the width does not fit."""
        if self.bits is not None or self.input_dims % group_size:
            return False
        weight, scales, biases = mx.quantize(self.weight, group_size=group_size, bits=bits)
        self.set_quantized(weight, scales, biases, bits, group_size)
        return True

    def dense_weight(self, dtype: mx.Dtype | None = None) -> mx.array:
        """The weight as a dense matrix [out, in] (dequantized if quantized)."""
        if self.gguf_type is not None:
            weight = mx.array(expanded(as_numpy(self.weight), self.gguf_type, self.input_dims))
        elif self.bits is None:
            weight = self.weight
        else:
            weight = mx.dequantize(
                self.weight, self.scales, self.biases, group_size=self.group_size, bits=self.bits
            )
        return weight if dtype is None else weight.astype(dtype)

    def add_adapter(self, adapter: LowRankAdapter | DenseDeltaAdapter) -> None:
        expected = (self.output_dims, self.input_dims)
        got = tuple(adapter.shape)
        row_slice = getattr(adapter, "rows", None) is not None
        fits = got[1] == expected[1] and (got[0] <= expected[0] if row_slice else got[0] == expected[0])
        if not fits:
            raise ValueError(f"adapter of shape [out, in] = {list(got)} on a layer of {list(expected)}")
        if row_slice:
            object.__setattr__(adapter, "output_dims", self.output_dims)
        self.adapters.append(adapter)

    def merge_adapters(self) -> None:
        """Fold the adapters into the weight (re-quantized at the same bits and group if quantized)."""
        if not self.adapters:
            return
        weight = self.dense_weight(mx.float32) + sum(adapter.delta() for adapter in self.adapters)
        self.adapters.clear()
        bits, group_size = self.bits, self.group_size
        if self.gguf_type is not None:
            bits, group_size = gguf_affine.mlx_form(self.gguf_type)
        self.set_dense(weight)
        if bits is not None:
            self.quantize(bits, group_size)

    def keep_rows(self, rows: list[tuple[int, int]]) -> None:
        """Keep only the output rows in the ranges `rows` (a column-parallel shard): the weight's rows
        (codes, scales and biases if quantized), the bias and the adapters' rows. Lazy arrays stay lazy:
        `mx.take` copies, so evaluating the shard does not keep the whole tensor alive."""
        index = _indices(rows)
        self.weight = _take(self.weight, index, 0)
        if self.bits is not None:
            self.scales = _take(self.scales, index, 0)
            self.biases = _take(self.biases, index, 0)
        if "bias" in self:
            self.bias = _take(self.bias, index, 0)
        self.adapters[:] = [
            LowRankAdapter(a.down, _take(a.up, index, 0), a.scale)
            if isinstance(a, LowRankAdapter)
            else DenseDeltaAdapter(_take(a.change, index, 0))
            for a in self.adapters
        ]

    def keep_columns(self, columns: list[tuple[int, int]]) -> None:
        """Keep only the input columns in the ranges `columns` (a row-parallel shard: the outputs of
        the shards sum to the layer's output without its bias, which the caller adds once). A quantized
        layer can only be cut at multiples of its group; GGUF blocks (256 values for K-quants) become MLX
        affine groups of 32 first."""
        self.to_affine()
        index = _indices(columns)
        if self.bits is None:
            self.weight = _take(self.weight, index, 1)
        else:
            cuts = [c for pair in columns for c in pair if c % self.group_size]
            if cuts:
                raise ValueError(
                    f"cannot split the {self.input_dims} inputs of a {self.bits}-bit layer at column "
                    f"{cuts[0]}: not a multiple of its quantization group {self.group_size}"
                )
            words = [(a * self.bits // 32, b * self.bits // 32) for a, b in columns]
            groups = [(a // self.group_size, b // self.group_size) for a, b in columns]
            self.weight = _take(self.weight, _indices(words), 1)
            self.scales = _take(self.scales, _indices(groups), 1)
            self.biases = _take(self.biases, _indices(groups), 1)
        self.adapters[:] = [
            LowRankAdapter(_take(a.down, index, 1), a.up, a.scale)
            if isinstance(a, LowRankAdapter)
            else DenseDeltaAdapter(_take(a.change, index, 1))
            for a in self.adapters
        ]

    def __call__(self, x: mx.array | list[mx.array]) -> mx.array:
        """x W^T + b (+ the adapters), for x an array or the parts of one along its last axis (FLUX's
        single block multiplies [attention, MLP]: the CPU kernels do not concatenate them)."""
        if backend.numpy_kernels():
            return cpu_linear.linear(x, self)[0]  # with the bias and the adapters
        if isinstance(x, list):
            x = mx.concatenate(x, axis=-1)
        on_cpu = backend.cpu_kernels_in_training()  # training: the CPU kernels' GEMM, with the bias
        y = cpu_linear.frozen_product(x, self) if on_cpu else self._mlx_product(x)
        for adapter in self.adapters:
            y = y + adapter(x)
        return y

    def gelu_tanh(self, x: mx.array, into_gemm: bool = False) -> mx.array:
        """gelu_tanh(self(x)): an MLP's first layer and its activation, one pass over the output on
        the CPU kernels (`cpu_linear.linear`; `into_gemm`: the result feeds only linear layers, so
        with bf16 GEMMs it may come rounded to bf16 as they take it)."""
        if backend.numpy_kernels():
            return cpu_linear.linear(x, self, gelu_from=0, gelu_into_gemm=into_gemm)[0]
        return gelu_tanh(self(x))

    def split_gelu_tanh(self, x: mx.array, at: int, into_gemm: bool = False) -> tuple[mx.array, mx.array]:
        """(y[..., :at], gelu_tanh(y[..., at:])) of y = self(x): FLUX's single block, whose one
        projection feeds attention and, activated, the MLP (`into_gemm` as for `gelu_tanh`)."""
        if backend.numpy_kernels():
            return tuple(cpu_linear.linear(x, self, gelu_from=at, gelu_into_gemm=into_gemm))
        head, tail = mx.split(self(x), [at], axis=-1)
        return head, gelu_tanh(tail)

    def _mlx_product(self, x: mx.array) -> mx.array:
        """x W^T + b on MLX's kernels."""
        self.to_affine()  # once, for a GGUF layer loaded for the CPU kernels
        if self.bits is None:
            y = x @ self.weight.astype(x.dtype).T
        else:
            # Scales kept in fp32 (GGUF, -q of an fp32 checkpoint) would promote the activations
            # and the whole residual stream after this layer: computed in the activations' dtype.
            y = mx.quantized_matmul(
                x,
                self.weight,
                self.scales.astype(x.dtype),
                self.biases.astype(x.dtype),
                transpose=True,
                group_size=self.group_size,
                bits=self.bits,
            )
        if "bias" in self:
            y = y + self.bias.astype(y.dtype)
        return y


def _indices(ranges: list[tuple[int, int]]) -> mx.array:
    return mx.concatenate([mx.arange(start, stop) for start, stop in ranges])


def _take(array: mx.array, index: mx.array, axis: int) -> mx.array:
    """A row-major copy of the slices `index` along `axis` (`mx.take` along the last axis may give a
    column-major result, which the CPU kernels' zero-copy NumPy views cannot reinterpret)."""
    return mx.contiguous(mx.take(array, index, axis=axis))
