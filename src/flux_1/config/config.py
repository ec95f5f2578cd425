"""mflux's `flux_1.config.config.Config`: flux1's `Config` (same fields: num_inference_steps, height,
width, guidance)."""

from flux1.generation import Config

__all__ = ["Config"]
