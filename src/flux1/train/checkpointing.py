"""Gradient checkpointing per transformer block: only each block's inputs are kept for the backward
pass, its activations are recomputed (MLX's `mx.checkpoint`).

The checkpoint differentiates with respect to its arguments, so each block's adapters are passed in
as arguments and put back into the block inside (what `mlx.nn.utils.checkpoint` does for a module's
own parameters; a `Linear`'s adapters are not among those).

On the CPU kernels a block's arrays are computed as it runs (NumPy needs their values), and MLX keeps
every array computed while it differentiates alive to the end of the backward pass: `mx.checkpoint`
would then save nothing (the 12B model ran out of 24 GB). There a block runs on copies of its inputs that carry no graph, and its
backward pass recomputes it the same way, one block at a time (`_recomputed`)."""

import contextlib

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from flux1 import backend
from flux1.nn.numpy_cpu import as_numpy
from flux1.train.adapters import TrainedAdapters


class _Checkpointed(nn.Module):
    def __init__(self, block: nn.Module, adapters: list):
        super().__init__()
        self.block = block
        object.__setattr__(self, "trained", adapters)

        def run(params, *args):
            for adapter, p in zip(adapters, params):
                adapter.update(p)
            return block(*args)

        checkpointed = _recomputed(run) if backend.cpu_kernels_in_training() else mx.checkpoint(run)
        object.__setattr__(self, "run", checkpointed)

    def modulations(self, vec: mx.array):
        """The block's own (outside the checkpoint: small, and computed ahead of the block)."""
        return self.block.modulations(vec)

    def __call__(self, *args):
        return self.run([a.parameters() for a in self.trained], *args)


def _recomputed(run):
    """`mx.checkpoint(run)` for a block on the CPU kernels: forward and recomputation on detached
    copies, gradients handed back as detached copies."""

    def backward(primals, cotangents, outputs):
        keys, values = zip(*tree_flatten(_detached(primals)))

        def of_leaves(*leaves):
            return _as_list(run(*tree_unflatten(list(zip(keys, leaves)))))

        _, gradients = mx.vjp(of_leaves, list(values), _as_list(cotangents))
        return tuple(tree_unflatten(list(zip(keys, _detached(gradients)))))

    forward = mx.custom_function(lambda *inputs: _detached(run(*_detached(inputs))))
    forward.vjp(backward)
    return forward


def _detached(tree):
    """The arrays of `tree` as new arrays of the same values, with no graph behind them."""

    def copy(a):
        values = mx.array(as_numpy(a))  # bf16 through its bits
        return values.view(a.dtype) if a.dtype == mx.bfloat16 else values

    return tree_map(copy, tree, is_leaf=lambda x: isinstance(x, mx.array))


def _as_list(outputs) -> list:
    return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]


@contextlib.contextmanager
def checkpointed_blocks(transformer: nn.Module, trained: TrainedAdapters):
    """Inside the block, the transformer's blocks are checkpointed; restored after."""
    originals = {name: list(getattr(transformer, name)) for name in ("double_blocks", "single_blocks")}
    try:
        for name, blocks in originals.items():
            setattr(
                transformer,
                name,
                [_Checkpointed(b, trained.of_block(f"{name}.{i}")) for i, b in enumerate(blocks)],
            )
        yield
    finally:
        for name, blocks in originals.items():
            setattr(transformer, name, blocks)
