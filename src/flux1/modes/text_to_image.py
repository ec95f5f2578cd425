"""Text to image: noise and a prompt, nothing more."""

from flux1.modes.conditioning import Conditioning

KINDS = ("schnell", "dev")
INPUTS = frozenset()
DEFAULT_STRENGTH = None  # no input image


def output_size(image) -> None:
    return None


def prepare(flux, inputs, config, steps: int) -> Conditioning:
    return Conditioning()
