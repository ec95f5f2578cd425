"""What one image is made with (`Config`), and the checks every input passes once, before any model
is loaded: ranges, finiteness, types, each error naming the flag and what was expected."""

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flux1.configs import DEFAULT_STEPS, GUIDANCE, MAX_SEQUENCE_LENGTH, VAE
from flux1.modes.images import InputImage, open_input

MAX_STEPS = 1000
MAX_SIDE = 8192  # pixels; what fits in memory is checked apart (and FLUX.1 is trained up to 2 MP)


def _check_integer(flag: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{flag} {value!r}: expected a whole number")
    if not low <= value <= high:
        raise ValueError(f"{flag} {value}: expected {low} to {high}")


def check_size(height, width) -> None:
    """Sizes must be multiples of 16 (8x VAE, 2x2 packing); refused with the nearest valid values
    rather than rounded silently."""
    for flag, value in (("--height", height), ("--width", width)):
        _check_integer(flag, value, -(2**63), 2**63)
        if value < 16 or value % 16 or value > MAX_SIDE:
            low, high = min(MAX_SIDE, max(16, value // 16 * 16)), min(MAX_SIDE, max(16, -(-value // 16) * 16))
            nearest = f"{low}" if low == high else f"{low} or {high}"
            raise ValueError(
                f"{flag} {value}: must be a multiple of 16 from 16 to {MAX_SIDE} (nearest: {nearest})"
            )


@dataclass
class Config:
    """What one image is made with; every value is checked when the Config is made."""

    num_inference_steps: int | None = None  # 4 for schnell, 25 for dev
    height: int = 1024
    width: int = 1024
    # None: the kind's default (3.5 dev, 30 Fill and Canny, 2.5 Kontext, 10 Depth); not schnell
    guidance: float | None = None
    max_sequence_length: int | None = None  # T5 tokens: 256 for schnell, 512 for dev
    vae_tiling: bool = False  # decode in overlapping tiles (`flux1.vae_tiles`)

    def __post_init__(self):
        check_size(self.height, self.width)
        if not isinstance(self.vae_tiling, bool):
            raise ValueError(f"--vae-tiling {self.vae_tiling!r}: expected true or false")
        if self.num_inference_steps is not None:
            _check_integer("--steps", self.num_inference_steps, 1, MAX_STEPS)
        if self.max_sequence_length is not None:
            _check_integer(
                "--max-sequence-length", self.max_sequence_length, 1, max(MAX_SEQUENCE_LENGTH.values())
            )
        if self.guidance is not None:
            _check_number("--guidance", self.guidance, 0.0, math.inf)

    def steps_for(self, base_model: str) -> int:
        return self.num_inference_steps or DEFAULT_STEPS[base_model]

    def max_length_for(self, base_model: str) -> int:
        return self.max_sequence_length or MAX_SEQUENCE_LENGTH[base_model]

    def guidance_for(self, base_model: str) -> float | None:
        """The guidance the transformer gets (None for schnell, which has no guidance input)."""
        default = GUIDANCE[base_model]
        return None if default is None else self.guidance if self.guidance is not None else default


def _check_number(flag: str, value, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating):
        raise ValueError(f"{flag} {value!r}: expected a number")
    if not (math.isfinite(value) and low <= value <= high):
        bound = f">= {low:g}" if high == math.inf else f"from {low:g} to {high:g}"
        raise ValueError(f"{flag} {value}: expected a finite number {bound}")


@dataclass
class ModeInputs:
    """What a generation starts from besides the prompt and the noise; images and masks are paths or
    PIL images, read (and checked) when the ModeInputs is made, before any model loads."""

    negative_prompt: str | None = None
    true_cfg_scale: float = 1.0  # above 1 with a negative prompt: true classifier-free guidance
    image: str | Path | InputImage | object | None = None
    mask: str | Path | InputImage | object | None = None  # white = repaint
    image_strength: float | None = None  # how much of the image is kept; None: the mode's default
    canny: bool = False  # the control image is the image's Canny edges (FLUX.1 Canny)

    def __post_init__(self):
        _check_number("--true-cfg-scale", self.true_cfg_scale, 0.0, math.inf)
        if self.image_strength is not None:
            _check_number("--image-strength", self.image_strength, 0.0, 1.0)
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise ValueError(f"--negative-prompt {self.negative_prompt!r}: expected text")
        if self.mask is not None and self.image is None:
            raise ValueError("--mask-path needs --image-path (the image to repaint)")
        if not isinstance(self.canny, bool):
            raise ValueError(f"--canny {self.canny!r}: expected true or false")
        if self.canny and self.image is None:
            raise ValueError("--canny needs --image-path (the image whose edges guide FLUX.1 Canny)")
        if self.image is not None and not isinstance(self.image, InputImage):
            self.image = open_input(self.image, "--image-path", "RGB")
        if self.mask is not None and not isinstance(self.mask, InputImage):
            self.mask = open_input(self.mask, "--mask-path", "L")
        if self.mask is not None and self.mask.size != self.image.size:
            raise ValueError(
                f"--mask-path {self.mask.path or 'mask'}: {self.mask.size[1]}x{self.mask.size[0]} pixels, "
                f"but the image is {self.image.size[1]}x{self.image.size[0]}: the mask must cover the "
                "image pixel for pixel (both are then fitted to the output size alike)"
            )

    def strength(self, default: float) -> float:
        return default if self.image_strength is None else float(self.image_strength)


def check_lora_options(paths: list[str], scales: list[float]) -> None:
    if len(scales) != len(paths):
        raise ValueError(f"--lora-scales has {len(scales)} values for {len(paths)} --lora-paths")
    for scale in scales:
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
            raise ValueError(f"--lora-scales {scale!r}: expected a finite number")
    for path in paths:
        if not Path(path).is_file():
            raise ValueError(f"--lora-paths {path}: file not found")


def activation_bytes(
    height: int, width: int, text_tokens: int, batch: int = 1, vae_tiling: bool = False
) -> dict[str, int]:
    """Peak activation memory per phase, at the real model's widths (an upper bound for smaller
    fixtures): the transformer's widest intermediates over all tokens plus one head's attention scores
    (the CPU kernels compute attention a head at a time), for `batch` rows at once; the VAE decoder's
    full-resolution 128-channel feature maps plus its mid-block attention over the latent pixels, for
    one image (it decodes a batch one at a time; in tiles, one tile's)."""
    tokens = height * width // 256 + text_tokens
    transformer = batch * 4 * (tokens * (3 * 3072 + 12288) * 3 + tokens * tokens)
    if vae_tiling:
        height, width = min(height, VAE["sample_size"]), min(width, VAE["sample_size"])
    latent_pixels = height * width // 64
    vae = 4 * (height * width * 128 * 4 + latent_pixels * latent_pixels)
    return {"transformer": transformer, "VAE decoder": vae}


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(config: "Config", text_tokens: int, batch: int = 1) -> None:
    """Refuse a request whose activations alone exceed this machine's memory, with the estimate;
    `text_tokens` counts every token beside the output's image tokens, `batch` the transformer's rows."""
    total = physical_memory()
    if total is None:
        return
    needs = activation_bytes(config.height, config.width, text_tokens, batch, config.vae_tiling)
    phase, largest = max(needs.items(), key=lambda item: item[1])
    if largest > total:
        tiles = " (--vae-tiling decodes it a tile at a time)" if phase == "VAE decoder" else ""
        rows = f" for {batch} rows at once" if batch > 1 and phase == "transformer" else ""
        raise ValueError(
            f"--height {config.height} --width {config.width}: the {phase} needs about "
            f"{largest / 1e9:.1f} GB of activations{rows}, more than this machine's {total / 1e9:.1f} GB{tiles}"
        )
