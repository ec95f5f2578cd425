"""Put converted (canonically named) tensors into a module, strictly."""

import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from flux1.weights.safetensors_io import Tensors, WeightFileError


def _listing(names: list[str], tensors: Tensors | None = None, limit: int = 10) -> str:
    shown = [tensors.origin(n) if tensors else n for n in sorted(names)[:limit]]
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return "; ".join(shown) + more


def assign_weights(module: nn.Module, tensors: Tensors, component: str) -> None:
    """Load `tensors` into `module`: every parameter must be given, with its shape, and every
    tensor must belong to a parameter. Arrays stay lazy and keep their stored dtype."""
    expected = dict(tree_flatten(module.parameters()))
    unexpected = [n for n in tensors.names() if n not in expected]
    if unexpected:
        raise WeightFileError(
            f"{component}: tensors that belong to no layer: {_listing(unexpected, tensors)}"
        )
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise WeightFileError(f"{component}: missing tensors: {_listing(missing)}")
    for name, array in tensors.arrays.items():
        want = expected[name].shape
        if array.shape != want:
            raise WeightFileError(
                f"{tensors.origin(name)} has shape {list(array.shape)}, "
                f"but the {component} config expects {list(want)} for '{name}'"
            )
    module.update(tree_unflatten(list(tensors.arrays.items())))
