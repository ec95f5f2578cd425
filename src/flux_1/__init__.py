"""A thin compatibility package: the import paths of mflux's README (`flux_1.config.config.Config`,
`flux_1.flux.Flux1`), so the snippet its users paste first runs unchanged on flux1.

Nothing lives here but re-exports: the documented names are flux1's own (`from flux1 import Config,
Flux1`), and `Flux1.from_alias(alias=..., quantize=..., lora_paths=..., lora_scales=...)` and
`GeneratedImage.save(path=..., export_json_metadata=...)` are flux1's methods under mflux's spelling."""

import flux1  # noqa: F401  (first: loads the BLAS before anything imports mlx)
