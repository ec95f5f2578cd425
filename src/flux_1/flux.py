"""mflux's `flux_1.flux.Flux1`: flux1's `Flux1` (with `from_alias`)."""

from flux1.pipeline import Flux1

__all__ = ["Flux1"]
