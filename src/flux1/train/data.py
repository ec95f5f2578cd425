"""The training images: each with its caption, cut to an aspect-ratio bucket of about the resolution's area.

A folder holds images with a same-name `.txt` caption each, or a `metadata.jsonl` with one
`{"file_name": ..., "text": ...}` line per image (the Hugging Face imagefolder layout)."""

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_KEYS = ("text", "caption", "prompt")


class DataError(ValueError):
    """A data folder that cannot be trained on; names the file and what was expected."""


@dataclass(frozen=True)
class Example:
    image: Path
    caption: str


def check_resolution(resolution: int) -> None:
    if resolution < 16 or resolution % 16:
        low, high = max(16, resolution // 16 * 16), max(16, -(-resolution // 16) * 16)
        nearest = f"{low}" if low == high else f"{low} or {high}"
        raise DataError(f"--resolution {resolution}: must be a positive multiple of 16 (nearest: {nearest})")


def find_examples(folder: Path) -> list[Example]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--data {folder}: not a folder")
    listing = folder / "metadata.jsonl"
    examples = _from_metadata(listing) if listing.is_file() else _from_captions(folder)
    if not examples:
        raise DataError(
            f"--data {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) with captions "
            "(a same-name .txt each, or a metadata.jsonl)"
        )
    return examples


def _from_captions(folder: Path) -> list[Example]:
    examples = []
    for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        caption = image.with_suffix(".txt")
        if not caption.is_file():
            raise DataError(f"{image}: no caption (expected {caption.name} beside it, or a metadata.jsonl)")
        examples.append(Example(image, caption.read_text(encoding="utf-8").strip()))
    return examples


def _from_metadata(listing: Path) -> list[Example]:
    examples = []
    for number, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{listing}, line {number}: invalid JSON ({e})") from None
        caption = next((entry[k] for k in CAPTION_KEYS if isinstance(entry.get(k), str)), None)
        if "file_name" not in entry or caption is None:
            raise DataError(
                f'{listing}, line {number}: expected a "file_name" and a caption ({", ".join(CAPTION_KEYS)})'
            )
        image = listing.parent / entry["file_name"]
        if not image.is_file():
            raise DataError(f"{listing}, line {number}: {image} does not exist")
        examples.append(Example(image, caption.strip()))
    return examples


def bucket(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(width, height), multiples of 16 of about resolution^2 pixels with the image's aspect ratio."""
    aspect = width / height
    bucket_width = max(16, round(resolution * math.sqrt(aspect) / 16) * 16)
    bucket_height = max(16, round(resolution / math.sqrt(aspect) / 16) * 16)
    return bucket_width, bucket_height


def load_pixels(image: Path, resolution: int) -> np.ndarray:
    """float32 [H, W, 3] in [-1, 1] (as diffusers' trainer normalizes), resized to cover its bucket
    and center-cropped."""
    try:
        with Image.open(image) as opened:
            rgb = opened.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{image}: cannot be read as an image ({e})") from None
    width, height = bucket(*rgb.size, resolution)
    factor = max(width / rgb.width, height / rgb.height)
    resized = rgb.resize(
        (max(width, round(rgb.width * factor)), max(height, round(rgb.height * factor))), Image.BICUBIC
    )
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    cropped = resized.crop((left, top, left + width, top + height))
    return np.asarray(cropped, np.float32) / 127.5 - 1.0


def data_hash(examples: list[Example]) -> str:
    """SHA-256 over every image's bytes and caption, in order: names the data a LoRA was trained on."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(hashlib.sha256(example.image.read_bytes()).digest())
        digest.update(example.caption.encode())
    return digest.hexdigest()
