"""Tensor parallelism: the transformer's large linear layers split across the ranks of a group.

In each block the layers that widen the stream are split by output rows (column-parallel: the fused
qkv by heads, the MLP input and single-block linear1 by heads and hidden units) and the layers that
narrow it back by input columns (row-parallel: attention proj, MLP output, single-block linear2),
followed by one `all_sum`; the modulations are split by rows and their outputs gathered. Attention
then runs on each rank's own heads. The embedders, `txt_in`, `img_in` and the final layer (under
0.2% of the weights) stay whole on every rank.

Order of loading: weights are read lazily, quantized (-q) and given their LoRAs as in a single
process, then each layer is cut to this rank's shard and evaluated one layer at a time, so a rank
holds one whole layer at most (transiently), never the whole transformer.
"""

import mlx.core as mx
import mlx.nn as nn

from flux1.configs import MLP_RATIO
from flux1.nn.linear import Linear

exchanged_bytes = 0  # payload of every all_sum / all_gather of the model so far, this rank


def _count(array: mx.array) -> None:
    global exchanged_bytes
    exchanged_bytes += array.nbytes


class RowParallel(nn.Module):
    """A layer holding some input columns: the ranks' partial outputs summed, then the bias once."""

    def __init__(self, layer: Linear, group: mx.distributed.Group):
        super().__init__()
        self.layer = layer
        if "bias" in layer:
            self.bias = layer.bias
            del layer["bias"]
        self._group = group

    def __call__(self, x: mx.array) -> mx.array:
        partial = self.layer(x)
        _count(partial)
        y = mx.distributed.all_sum(partial, group=self._group)
        return y + self.bias.astype(y.dtype) if "bias" in self else y


class GatheredRows(nn.Module):
    """A layer holding a contiguous block of output rows: the ranks' blocks gathered in rank order."""

    def __init__(self, layer: Linear, group: mx.distributed.Group):
        super().__init__()
        self.layer = layer
        self._group = group

    def __call__(self, x: mx.array) -> mx.array:
        part = self.layer(x)  # [batch, rows / n]
        _count(part)
        blocks = mx.distributed.all_gather(part, group=self._group)  # [n * batch, rows / n]
        n = self._group.size()
        return blocks.reshape(n, *part.shape).transpose(1, 0, 2).reshape(part.shape[0], -1)


def _part(total: int, rank: int, size: int) -> tuple[int, int]:
    return rank * total // size, (rank + 1) * total // size


def shard_transformer(model: nn.Module, group: mx.distributed.Group) -> None:
    """Cut `model` (a FluxTransformer, weights lazy) to this rank's shard, evaluating layer by layer."""
    rank, size = group.rank(), group.size()
    heads, head_dim = model.config["num_attention_heads"], model.config["attention_head_dim"]
    dim = heads * head_dim
    hidden = int(dim * MLP_RATIO)
    if heads % size or hidden % size:
        raise ValueError(
            f"--tensor-parallel over {size} ranks: the transformer's {heads} heads and {hidden} hidden "
            f"units must both divide by {size}"
        )
    a0, a1 = _part(heads, rank, size)
    a0, a1 = a0 * head_dim, a1 * head_dim  # this rank's attention columns (its heads)
    m0, m1 = _part(hidden, rank, size)  # its MLP hidden units
    qkv = [(a0, a1), (dim + a0, dim + a1), (2 * dim + a0, 2 * dim + a1)]

    def evaluated(layer: Linear) -> Linear:
        mx.eval(layer.parameters(), [vars(adapter) for adapter in layer.adapters])
        return layer

    def rows(layer: Linear, ranges) -> Linear:
        layer.keep_rows(ranges)
        return evaluated(layer)

    def columns(layer: Linear, ranges) -> RowParallel:
        layer.keep_columns(ranges)
        return RowParallel(evaluated(layer), group)

    def modulation(mod) -> None:
        mod.lin = GatheredRows(rows(mod.lin, [_part(mod.lin.output_dims, rank, size)]), group)

    for block in model.double_blocks:
        for attn, mlp, mod in (
            (block.img_attn, block.img_mlp, block.img_mod),
            (block.txt_attn, block.txt_mlp, block.txt_mod),
        ):
            modulation(mod)
            rows(attn.qkv, qkv)
            attn.num_heads = heads // size
            attn.proj = columns(attn.proj, [(a0, a1)])
            rows(mlp[0], [(m0, m1)])
            mlp[2] = columns(mlp[2], [(m0, m1)])
    for block in model.single_blocks:
        modulation(block.modulation)
        rows(block.linear1, [*qkv, (3 * dim + m0, 3 * dim + m1)])
        block.linear2 = columns(block.linear2, [(a0, a1), (dim + m0, dim + m1)])
        block.dim, block.num_heads = dim // size, heads // size
