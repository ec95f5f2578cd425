"""Gradient checkpointing per transformer block: only each block's inputs are kept for the backward
pass, its activations are recomputed (MLX's `mx.checkpoint`).

`mx.checkpoint` differentiates with respect to its arguments, so each block's adapters are passed in
as arguments and put back into the block inside (what `mlx.nn.utils.checkpoint` does for a module's
own parameters; a `Linear`'s adapters are not among those)."""

import contextlib

import mlx.core as mx
import mlx.nn as nn

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

        object.__setattr__(self, "run", mx.checkpoint(run))

    def __call__(self, *args):
        return self.run([a.parameters() for a in self.trained], *args)


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
