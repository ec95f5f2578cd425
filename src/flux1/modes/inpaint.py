"""Inpainting with schnell or dev (diffusers' FluxInpaintPipeline): img2img, and after every step the
latents outside the mask (black = keep) are replaced by the image's latents noised to the next sigma."""

from dataclasses import replace

import mlx.core as mx

from flux1 import latents
from flux1.modes import img2img
from flux1.modes.images import fit, to_mask

KINDS = ("schnell", "dev")
INPUTS = frozenset({"image", "mask"})
DEFAULT_STRENGTH = img2img.DEFAULT_STRENGTH
output_size = img2img.output_size


def latent_mask(mask, height: int, width: int) -> mx.array:
    """[1, N, 64]: the binarized mask sampled at each latent pixel's top-left image pixel (diffusers'
    nearest interpolation), the same for all 16 channels, packed as the latents."""
    values = mx.array(to_mask(fit(mask, height, width))[::8, ::8])
    return latents.pack(mx.broadcast_to(values, (1, latents.LATENT_CHANNELS, *values.shape)))


def prepare(flux, inputs, config, steps: int):
    conditioning = img2img.prepare(flux, inputs, config, steps)
    return replace(conditioning, blend_mask=latent_mask(inputs.mask.image, config.height, config.width))
