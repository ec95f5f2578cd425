"""Generation modes. Each is a module that turns its inputs into a `Conditioning` for the one
denoising loop (`Flux1.denoise`): KINDS (the model kinds it runs on), INPUTS (the images it takes),
DEFAULT_STRENGTH (None: it takes no --image-strength), output_size(image) and prepare(...). A new mode
is a new module listed in MODES."""

import logging
from dataclasses import replace
from types import ModuleType

from flux1.modes import control, fill, img2img, inpaint, kontext, text_to_image, true_cfg
from flux1.modes.conditioning import Conditioning

log = logging.getLogger("flux1")
MODES = (text_to_image, img2img, inpaint, fill, kontext, control)
CANNY_KINDS = ("canny",)  # the kinds whose control image --canny can make
FLAGS = {"image": "--image-path", "mask": "--mask-path"}


def _describe(inputs: frozenset) -> str:
    return " and ".join(FLAGS[name] for name in FLAGS if name in inputs) or "no image"


def select(kind: str, inputs) -> ModuleType:
    """The mode for a model kind and the inputs given; a clear error when the kind cannot use them."""
    given = frozenset(name for name in FLAGS if getattr(inputs, name) is not None)
    if inputs.canny and kind not in CANNY_KINDS:
        raise ValueError(f"--canny: FLUX.1-{kind} does not take Canny edges (FLUX.1-canny does)")
    for mode in MODES:
        if kind in mode.KINDS and given == mode.INPUTS:
            if inputs.image_strength is not None and mode.DEFAULT_STRENGTH is None:
                raise ValueError(f"--image-strength: FLUX.1-{kind} with {_describe(given)} does not use it")
            return mode
    accepted = " or ".join(_describe(mode.INPUTS) for mode in MODES if kind in mode.KINDS)
    raise ValueError(f"FLUX.1-{kind} takes {accepted}; given {_describe(given)}")


def added_tokens(kind: str, inputs) -> int:
    """Image tokens the mode of `inputs` puts beside the output's in the transformer (Kontext's
    reference), for the memory check."""
    if select(kind, inputs) is not kontext:
        return 0
    height, width = kontext.output_size(inputs.image)
    return height * width // 256


def prepare(flux, inputs, config, steps: int, max_length: int) -> Conditioning:
    """What the mode of `inputs` adds to the loop (images encoded, the negative prompt encoded)."""
    conditioning = select(flux.files.base_model, inputs).prepare(flux, inputs, config, steps)
    return true_cfg.add_negative(flux, conditioning, inputs, max_length)


def sized_for_image(config, kind: str, inputs, height: int | None, width: int | None):
    """The config with the size the input image gives where --height/--width are not set: its own,
    rounded down to multiples of 16 (Kontext: its training resolution nearest the image's shape)."""
    if inputs.image is None or (height is not None and width is not None):
        return config
    size = select(kind, inputs).output_size(inputs.image)
    height, width = height or size[0], width or size[1]
    log.info(
        "size %dx%d (width x height) from the input image's %dx%d", width, height, *inputs.image.size[::-1]
    )
    return replace(config, height=height, width=width)
