"""A command's work list run by several ranks: data parallel (each rank its share) or tensor parallel
(every rank every item, rank 0 keeps the results)."""

import json
import math
import time
from collections.abc import Callable

import mlx.core as mx

from flux1.distributed.ranks import broadcast_text, failed_ranks, share


class RankFailed(ValueError):
    """Another rank failed: this one stops too, before starting its next item (a ValueError, so the
    commands report it as they report bad input: one line, exit code 2)."""


LOST_PEER = "connection to a peer was lost"  # MLX 0.32's ring backend


def run_work(
    make_work: Callable[[], list],
    do: Callable[..., None],
    group: mx.distributed.Group | None,
    tensor_parallel: bool = False,
) -> None:
    """Call `do(*item, keep)` for this rank's items of `make_work()` (JSON-able tuples; `keep` says
    whether this rank writes the result). With a group, the list is made on rank 0 only (output names
    are chosen there, so no two ranks race for a free name) and sent to the others; after each round
    the data-parallel ranks exchange whether one failed, so a failure stops all of them between images
    (a PNG is written whole or not at all) and every rank exits non-zero. Tensor-parallel ranks compute
    in lockstep: a failing rank just exits, and the others' next `all_sum` fails on the lost peer,
    which they report in one line (exit code 2)."""
    if group is None or group.size() == 1:
        for item in make_work():
            do(*item, True)
        return
    start = time.perf_counter()
    work = json.loads(broadcast_text(json.dumps(make_work()) if group.rank() == 0 else None, group))
    mine = work if tensor_parallel else share(work, group)
    rounds = len(work) if tensor_parallel else math.ceil(len(work) / group.size())
    keep = group.rank() == 0 or not tensor_parallel
    for index in range(rounds):
        if tensor_parallel:
            try:
                do(*mine[index], keep)
            except RuntimeError as e:  # MLX's ring backend, when a rank stopped mid-exchange
                if LOST_PEER not in str(e):
                    raise
                raise RankFailed(
                    "another rank stopped during a tensor-parallel step (its error is above); stopping"
                ) from None
            continue
        error = None
        try:
            if index < len(mine):
                do(*mine[index], keep)
        except Exception as e:  # told to the other ranks, then raised here
            error = e
        failed = failed_ranks(error is not None, group)
        if error is not None:
            raise error
        if failed:
            raise RankFailed(f"rank {', '.join(map(str, failed))} failed (its error is above); stopping")
    if group.rank() == 0:
        mode = "tensor parallel" if tensor_parallel else "data parallel"
        print(f"{len(work)} images on {group.size()} ranks ({mode}) in {time.perf_counter() - start:.1f}s")
