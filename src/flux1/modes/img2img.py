"""Image to image (diffusers' FluxImg2ImgPipeline with strength = 1 - S): the schedule starts at step
int(steps * S) from the image's latents noised to that step's sigma."""

from flux1.modes.conditioning import Conditioning, encode_pixels
from flux1.modes.images import fit, floor_size, to_pixels

KINDS = ("schnell", "dev")
INPUTS = frozenset({"image"})
DEFAULT_STRENGTH = 0.4  # how much of the image is kept (mflux's --image-strength)


def output_size(image) -> tuple[int, int]:
    return floor_size(image)


def start_step(steps: int, strength: float) -> int:
    return int(steps * strength)


def prepare(flux, inputs, config, steps: int) -> Conditioning:
    pixels = to_pixels(fit(inputs.image.image, config.height, config.width))
    return Conditioning(
        start_step=start_step(steps, inputs.strength(DEFAULT_STRENGTH)),
        image_latents=encode_pixels(flux, pixels, config),
    )
