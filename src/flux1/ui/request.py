"""What one click of Generate asks for, checked before it is queued: the page's values -> a `Request`
(prompt, seeds, a validated `flux1.generation.Config`, the `ModeInputs` read from the uploads, the model
choice), or a ValueError worded for the page; `keep_inputs` copies the input images into the output
folder, where the records of the images made from them point."""

import hashlib
import io
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from flux1 import modes
from flux1.batch import batch_size_for
from flux1.generation import Config, ModeInputs, check_lora_options
from flux1.latents import check_seed
from flux1.modes.images import InputImage, open_input
from flux1.quantize import BITS

MAX_BATCH = 16
NO_QUANTIZATION = "none"
QUANTIZATIONS = [NO_QUANTIZATION] + [str(b) for b in sorted(BITS, reverse=True)]
PAGE_WORDS = {
    "--batch-size": "Batch size",
    "--height": "Height",
    "--width": "Width",
    "--steps": "Steps",
    "--guidance": "Guidance",
    "--negative-prompt": "Negative prompt",
    "--true-cfg-scale": "True CFG scale",
    "--image-strength": "Image strength",
    "--image-path": "Input image",
    "--mask-path": "Mask",
}


@dataclass(frozen=True)
class Source:
    """One model the page offers, as main.py's --model/--path/--gguf/--base-model would give it."""

    label: str
    model: str | None = None
    path: str | None = None
    gguf: str | None = None
    base_model: str | None = None
    # schnell, dev, fill, kontext, canny or depth; None: known once loaded (a hub repo id)
    kind: str | None = None


@dataclass(frozen=True)
class ModelChoice:
    """What the loaded model is made of; a different choice reloads it."""

    source: Source
    quantize: int | None
    loras: tuple[tuple[str, float], ...]  # (path, scale)


@dataclass(frozen=True)
class Request:
    prompt: str
    seeds: tuple[int, ...]
    config: Config
    model: ModelChoice
    inputs: ModeInputs
    batch_size: int = 1  # images at a time through the text encoders and the transformer


def page_message(error: Exception, uploads: tuple[str, ...] = ()) -> str:
    """A flux1 error message with the page's names for its flags and uploads named as they were."""
    text = str(error)
    for flag, label in PAGE_WORDS.items():
        text = re.sub(rf"(?<![\w-]){flag}(?![\w-])", label, text)
    for upload in uploads:
        text = text.replace(upload, Path(upload).name)
    return text


def modes_line(kind: str | None) -> str:
    """What a model kind takes, in the page's words."""
    if kind is None:
        return "The model's kind (and so what it takes) is known once it is loaded."
    accepted = [
        " and ".join(PAGE_WORDS[modes.FLAGS[name]].lower() for name in modes.FLAGS if name in mode.INPUTS)
        or "the prompt alone"
        for mode in modes.MODES
        if kind in mode.KINDS
    ]
    return f"FLUX.1-{kind} takes {' or '.join(accepted)}; a negative prompt with a true CFG scale above 1."


def takes(kind: str | None, name: str) -> bool:
    """Whether a model kind uses the input `name` ("image", "mask", "strength" or "canny"); unknown: all."""
    if name == "canny":
        return kind is None or kind in modes.CANNY_KINDS
    found = [mode for mode in modes.MODES if kind is None or kind in mode.KINDS]
    if name == "strength":
        return any(mode.DEFAULT_STRENGTH is not None and "image" in mode.INPUTS for mode in found)
    return any(name in mode.INPUTS for mode in found)


def input_size(kind: str | None, image: str) -> tuple[int, int]:
    """(height, width) that main.py gives an input image without --height/--width, for this kind."""
    mode = next(m for m in modes.MODES if (kind is None or kind in m.KINDS) and "image" in m.INPUTS)
    return mode.output_size(open_input(image, "--image-path", "RGB"))


def default_strength(kind: str | None) -> float:
    """The image strength the kind's modes start from when not given (0 where none takes one)."""
    found = [m.DEFAULT_STRENGTH for m in modes.MODES if kind is None or kind in m.KINDS]
    return next((s for s in found if s is not None), 0.0)


def drawn_mask(editor: dict | None) -> Image.Image | None:
    """White where anything was drawn on the editor's layers (black elsewhere); None if nothing was."""
    layers = (editor or {}).get("layers") or []
    drawn = [np.asarray(layer)[..., 3] > 0 for layer in layers if np.asarray(layer).ndim == 3]
    if not any(layer.any() for layer in drawn):
        return None
    return Image.fromarray(np.logical_or.reduce(drawn).astype(np.uint8) * 255, "L")


def mode_inputs(
    kind, negative_prompt, true_cfg_scale, image, image_strength, mask, editor, canny=False
) -> ModeInputs:
    """The uploads read and checked (before anything is queued), and the mode the kind has for them."""
    drawn = drawn_mask(editor)
    if drawn is not None and mask is not None:
        raise ValueError("Mask: upload one or draw one on the image, not both")
    inputs = ModeInputs(
        negative_prompt=negative_prompt or None,
        true_cfg_scale=1.0 if true_cfg_scale is None else float(true_cfg_scale),
        image=image,
        mask=mask if drawn is None else drawn,
        # the page always shows a strength: it is given only where an image is and the kind takes one
        image_strength=float(image_strength) if image and takes(kind, "strength") else None,
        canny=bool(canny) and takes(kind, "canny"),
    )
    if kind is not None:
        modes.select(kind, inputs)
    return inputs


def keep_inputs(inputs: ModeInputs, folder: Path) -> ModeInputs:
    """The input image and mask copied into `folder` as `input-<image|mask>-<sha256 head><suffix>` (an
    upload's own bytes; a drawn mask as PNG), so the records point at files beside the images."""
    kept = {}
    for name in ("image", "mask"):
        given: InputImage | None = getattr(inputs, name)
        if given is None:
            continue
        if given.path is None:
            buffer = io.BytesIO()
            given.image.save(buffer, "PNG")
            data, suffix = buffer.getvalue(), ".png"
        else:
            data, suffix = Path(given.path).read_bytes(), Path(given.path).suffix.lower()
            suffix = suffix if re.fullmatch(r"\.[a-z0-9]{1,5}", suffix) else ""
        digest = hashlib.sha256(data).hexdigest()
        path = folder / f"input-{name}-{digest[:16]}{suffix}"
        if not path.is_file():
            path.write_bytes(data)
        kept[name] = InputImage(given.image, str(path), digest)
    return replace(inputs, **kept)


def seeds(seed: int | float | None, batch: int | float) -> tuple[int, ...]:
    """`batch` seeds from `seed` on (seed, seed + 1, ...); a negative or empty seed draws a random one."""
    if batch is None or int(batch) != batch or not 1 <= batch <= MAX_BATCH:
        raise ValueError(f"Batch count {batch}: expected 1 to {MAX_BATCH}")
    if seed is None or seed < 0:
        seed = random.randrange(2**31)
    if int(seed) != seed:
        raise ValueError(f"Seed {seed}: expected a whole number")
    first = int(seed)
    check_seed(first + int(batch) - 1)
    return tuple(range(first, first + int(batch)))


def build(
    sources: dict[str, Source],
    prompt: str,
    model: str,
    quantize: str,
    width,
    height,
    steps,
    guidance,
    seed,
    batch,
    loras: dict[str, float],
    negative_prompt: str | None = None,
    true_cfg_scale: float | None = 1.0,
    image: str | None = None,
    image_strength: float | None = None,
    mask: str | None = None,
    editor: dict | None = None,
    canny: bool = False,
    vae_tiling: bool = False,
    batch_size=1,
) -> Request:
    """The page's values -> a Request; raises ValueError with a message for the page."""
    if not prompt or not prompt.strip():
        raise ValueError("Prompt: write what to draw")
    if model not in sources:
        raise ValueError(f"Model '{model}': expected one of {', '.join(sources)}")
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"Quantization '{quantize}': expected one of {', '.join(QUANTIZATIONS)}")
    try:
        config = Config(
            num_inference_steps=None if not steps else _whole(steps),
            height=_whole(height),
            width=_whole(width),
            guidance=float(guidance) if guidance else None,
            vae_tiling=bool(vae_tiling),
        )
        inputs = mode_inputs(
            sources[model].kind, negative_prompt, true_cfg_scale, image, image_strength, mask, editor, canny
        )
    except ValueError as e:
        raise ValueError(page_message(e, tuple(u for u in (image, mask) if u))) from None
    chosen = tuple((str(Path(p)), float(s)) for p, s in loras.items() if s)
    check_lora_options([p for p, _ in chosen], [s for _, s in chosen])
    bits = None if quantize == NO_QUANTIZATION else int(quantize)
    made = seeds(seed, batch)
    try:
        size = batch_size_for(_whole(batch_size), len(made))
    except ValueError as e:
        raise ValueError(page_message(e)) from None
    return Request(prompt, made, config, ModelChoice(sources[model], bits, chosen), inputs, size)


def _whole(value):
    """Page numbers arrive as floats; a whole float becomes an int, anything else stays for Config to refuse."""
    return int(value) if isinstance(value, float) and value.is_integer() else value
