"""The process group and the few exchanges the commands need besides the model's own."""

import mlx.core as mx
import numpy as np


def world() -> mx.distributed.Group:
    """The group `mlx.launch` started this process in; of size 1 outside it."""
    return mx.distributed.init()


def share(items: list, group: mx.distributed.Group) -> list:
    """This rank's items of a work list: rank r of n takes items r, r + n, r + 2n, ..."""
    return items[group.rank() :: group.size()]


def gather(values: np.ndarray, group: mx.distributed.Group) -> np.ndarray:
    """[ranks, ...]: every rank's `values` (same shape on all ranks), on every rank."""
    gathered = mx.distributed.all_gather(mx.array(values), group=group)
    return np.array(gathered).reshape(group.size(), *values.shape)


def broadcast_text(text: str | None, group: mx.distributed.Group) -> str:
    """Rank 0's `text` on every rank (the other ranks pass None)."""
    data = np.frombuffer((text or "").encode(), np.uint8) if group.rank() == 0 else np.zeros(0, np.uint8)
    length = int(gather(np.array([data.size], np.int64), group)[0, 0])
    padded = np.zeros(length, np.uint8)
    padded[: data.size] = data
    return bytes(gather(padded, group)[0]).decode()


def failed_ranks(failed: bool, group: mx.distributed.Group) -> list[int]:
    """The ranks that say they failed (every rank must call this, once, at the same point)."""
    flags = gather(np.array([int(failed)], np.int32), group)[:, 0]
    return [int(rank) for rank in np.flatnonzero(flags)]
