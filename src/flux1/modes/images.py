"""Input images and masks: read once (so a bad file fails before any model loads), fitted to the
output size, and handed to the VAE as diffusers' VaeImageProcessor does (Lanczos, [-1, 1])."""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image, UnidentifiedImageError


@dataclass(frozen=True)
class InputImage:
    image: Image.Image  # RGB, or L for a mask
    path: str | None  # None for an image given in memory
    sha256: str  # of the file, or of the pixels of an in-memory image

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return self.image.height, self.image.width


def open_input(value, flag: str, mode: str) -> InputImage:
    """A path or a PIL image, converted to `mode` ("RGB" for images, "L" for masks)."""
    if isinstance(value, Image.Image):
        image, path = value, None
        digest = hashlib.sha256(np.asarray(value.convert(mode)).tobytes()).hexdigest()
    else:
        path = str(value)
        file = Path(value).expanduser()
        if not file.is_file():
            raise ValueError(f"{flag} {path}: file not found")
        try:
            with Image.open(file) as opened:
                image = opened.copy()
                image.load()
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{flag} {path}: not an image that Pillow can read ({e})") from None
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
    try:
        converted = image.convert(mode)
    except (ValueError, OSError) as e:
        what = "grayscale" if mode == "L" else "RGB"
        raise ValueError(f"{flag} {path or 'image'}: cannot be converted to {what} ({e})") from None
    return InputImage(converted, path, digest)


def floor_size(image: InputImage) -> tuple[int, int]:
    """The image's (height, width), each rounded down to a multiple of 16 (at least 16)."""
    return tuple(max(16, side // 16 * 16) for side in image.size)


def fit(image: Image.Image, height: int, width: int) -> Image.Image:
    """Cropped to the target's aspect ratio around the centre, then resized with Lanczos (as
    diffusers); an image of the target size is returned unchanged."""
    if (image.height, image.width) == (height, width):
        return image
    scale = max(height / image.height, width / image.width)
    crop_h, crop_w = round(height / scale), round(width / scale)
    top, left = (image.height - crop_h) // 2, (image.width - crop_w) // 2
    box = (left, top, left + crop_w, top + crop_h)
    return image.resize((width, height), Image.Resampling.LANCZOS, box=box)


def to_pixels(image: Image.Image) -> mx.array:
    """RGB image -> [1, H, W, 3] float32 in [-1, 1]."""
    return mx.array(np.asarray(image, np.float32)[None] / 255.0 * 2 - 1)


def to_mask(image: Image.Image) -> np.ndarray:
    """Grayscale mask -> [H, W] float32 of 0 (keep) and 1 (repaint), binarized at half as diffusers."""
    return (np.asarray(image, np.float32) / 255.0 >= 0.5).astype(np.float32)
