"""FLUX.1 Fill (diffusers' FluxFillPipeline): the transformer reads, beside each latent patch, the
latents of the image with the masked part grayed out and the 8x8 mask values of its 16x16 pixels."""

import mlx.core as mx

from flux1 import latents
from flux1.modes import img2img
from flux1.modes.conditioning import Conditioning, encode_pixels
from flux1.modes.images import fit, to_mask, to_pixels

KINDS = ("fill",)
INPUTS = frozenset({"image", "mask"})
DEFAULT_STRENGTH = 0.0  # the whole schedule, from noise (diffusers: strength 1)
output_size = img2img.output_size


def mask_channels(mask: mx.array) -> mx.array:
    """[H, W] mask -> [1, N, 256]: 64 channels of the pixels (dy, dx) of each 8x8 block, packed."""
    height, width = mask.shape
    blocks = mask.reshape(height // 8, 8, width // 8, 8).transpose(1, 3, 0, 2)
    return latents.pack(blocks.reshape(1, 64, height // 8, width // 8))


def prepare(flux, inputs, config, steps: int) -> Conditioning:
    pixels = to_pixels(fit(inputs.image.image, config.height, config.width))
    mask = mx.array(to_mask(fit(inputs.mask.image, config.height, config.width)))
    masked = encode_pixels(flux, pixels * (1 - mask[None, :, :, None]), config)
    strength = inputs.strength(DEFAULT_STRENGTH)
    return Conditioning(
        start_step=img2img.start_step(steps, strength),
        image_latents=encode_pixels(flux, pixels, config) if strength > 0 else None,
        channels=mx.concatenate([masked, mask_channels(mask)], axis=-1),
    )
