"""FLUX.1 Canny and Depth (diffusers' FluxControlPipeline): the transformer reads, beside each latent
patch, the latents of the control image at the same place: an edge map or a depth map, used as given,
or with `--canny` the Canny edges of the image (fitted to the output size first, as BFL's reference)."""

from flux1.modes import canny_edges, img2img
from flux1.modes.conditioning import Conditioning, encode_pixels
from flux1.modes.images import fit, to_pixels

KINDS = ("canny", "depth")
INPUTS = frozenset({"image"})
DEFAULT_STRENGTH = None  # the control image conditions every step; it is never the start
output_size = img2img.output_size


def prepare(flux, inputs, config, steps: int) -> Conditioning:
    image = fit(inputs.image.image, config.height, config.width)
    if inputs.canny:
        image = canny_edges.edges(image).convert("RGB")
    return Conditioning(channels=encode_pixels(flux, to_pixels(image), config))
