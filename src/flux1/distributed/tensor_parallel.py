"""Tensor parallelism: the transformer's large linear layers split across the ranks of a group.

In each block the layers that widen the stream are split by output rows (column-parallel: the fused
qkv by heads, the MLP input and single-block linear1 by heads and hidden units) and the layers that
narrow it back by input columns (row-parallel: attention proj, MLP output, single-block linear2),
followed by one `all_sum`; the modulations are split by rows and their outputs gathered. Attention
then runs on each rank's own heads. The embedders, `txt_in`, `img_in` and the final layer (under
0.2% of the weights) stay whole on every rank.

Order of loading: weights are opened lazily (GGUF: the cut layers' parts read, at their place in
lazy zeros), quantized (-q) and given their LoRAs as in a single process, then each layer is cut to
this rank's shard, its part read alone from disk (`shard_source.py`) and evaluated one layer at a
time: a rank reads its shard only and never holds the whole transformer.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

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


@dataclass(frozen=True)
class Cut:
    """What a rank keeps of one linear layer: output rows (axis 0, a column-parallel shard) or input
    columns (axis 1, a row-parallel shard), in `ranges`; `gathered`: rows whose outputs are gathered."""

    axis: int
    ranges: tuple[tuple[int, int], ...]
    gathered: bool = False


def cuts(config: dict, group: mx.distributed.Group) -> dict[str, Cut]:
    """{layer path: its cut on this rank} for a FluxTransformer of `config`: the one plan the
    readers (which read only these parts from disk) and `shard_transformer` follow."""
    rank, size = group.rank(), group.size()
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
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
    qkv = ((a0, a1), (dim + a0, dim + a1), (2 * dim + a0, 2 * dim + a1))
    plan = {}
    for i in range(config["num_layers"]):
        prefix = f"double_blocks.{i}."
        for stream in ("img", "txt"):
            plan[f"{prefix}{stream}_mod.lin"] = Cut(0, (_part(6 * dim, rank, size),), True)
            plan[f"{prefix}{stream}_attn.qkv"] = Cut(0, qkv)
            plan[f"{prefix}{stream}_attn.proj"] = Cut(1, ((a0, a1),))
            plan[f"{prefix}{stream}_mlp.0"] = Cut(0, ((m0, m1),))
            plan[f"{prefix}{stream}_mlp.2"] = Cut(1, ((m0, m1),))
    for i in range(config["num_single_layers"]):
        prefix = f"single_blocks.{i}."
        plan[f"{prefix}modulation.lin"] = Cut(0, (_part(3 * dim, rank, size),), True)
        plan[f"{prefix}linear1"] = Cut(0, (*qkv, (3 * dim + m0, 3 * dim + m1)))
        plan[f"{prefix}linear2"] = Cut(1, ((a0, a1), (dim + m0, dim + m1)))
    return plan


def shard_transformer(model: nn.Module, group: mx.distributed.Group, source=None) -> None:
    """Cut `model` (a FluxTransformer, weights lazy) to this rank's shard, evaluating layer by layer.
    `source` (a `ShardSource`) replaces each cut weight by the same part read alone from disk."""
    size = group.size()
    layers = dict(model.named_modules())
    wrapped = []
    for path, cut in cuts(model.config, group).items():
        layer = layers[path]
        as_read = source is not None and source.as_read(path, layer)
        (layer.keep_rows if cut.axis == 0 else layer.keep_columns)(list(cut.ranges))
        if as_read:
            source.fill(path, layer, cut)
        mx.eval(layer.parameters(), [vars(adapter) for adapter in layer.adapters])
        if cut.axis == 1:
            wrapped.append((path, RowParallel(layer, group)))
        elif cut.gathered:
            wrapped.append((path, GatheredRows(layer, group)))
    model.update_modules(tree_unflatten(wrapped))
    heads, head_dim = model.config["num_attention_heads"], model.config["attention_head_dim"]
    for block in model.double_blocks:
        block.img_attn.num_heads = block.txt_attn.num_heads = heads // size
    for block in model.single_blocks:
        block.dim, block.num_heads = heads * head_dim // size, heads // size
