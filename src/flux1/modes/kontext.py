"""FLUX.1 Kontext (diffusers' FluxKontextPipeline): the reference image's latent tokens follow the
image tokens, with position ids (1, row, col); the velocity of the image tokens alone is used. The
reference is taken at Kontext's training resolution nearest its aspect ratio, whatever the output's
size (as BFL's reference and diffusers' default `_auto_resize`)."""

from flux1 import latents
from flux1.configs import PREFERRED_KONTEXT_RESOLUTIONS
from flux1.modes.conditioning import Conditioning, encode_pixels
from flux1.modes.images import fit, to_pixels

KINDS = ("kontext",)
INPUTS = frozenset({"image"})
DEFAULT_STRENGTH = None  # the reference conditions every step; it is never the start


def output_size(image) -> tuple[int, int]:
    """(height, width): the training resolution of Kontext nearest the image's aspect ratio."""
    height, width = image.size
    _, w, h = min((abs(width / height - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return h, w


def prepare(flux, inputs, config, steps: int) -> Conditioning:
    height, width = output_size(inputs.image)
    pixels = to_pixels(fit(inputs.image.image, height, width))
    ids = latents.image_ids(height, width)
    ids[..., 0] = 1
    return Conditioning(tokens=encode_pixels(flux, pixels, config), token_ids=ids)
