"""What one click of Generate asks for, checked before it is queued: the page's values -> a `Request`
(prompt, seeds, a validated `flux1.generation.Config`, the model choice), or a ValueError worded for
the page. A generation mode (negative prompt, init image, ...) is one more field here and one more
component in `page.py`."""

import random
from dataclasses import dataclass
from pathlib import Path

from flux1.generation import Config, check_lora_options
from flux1.latents import check_seed
from flux1.quantize import BITS

MAX_BATCH = 16
NO_QUANTIZATION = "none"
QUANTIZATIONS = [NO_QUANTIZATION] + [str(b) for b in sorted(BITS, reverse=True)]
PAGE_WORDS = {"--height": "Height", "--width": "Width", "--steps": "Steps", "--guidance": "Guidance"}


@dataclass(frozen=True)
class Source:
    """One model the page offers, as main.py's --model/--path/--gguf/--base-model would give it."""

    label: str
    model: str | None = None
    path: str | None = None
    gguf: str | None = None
    base_model: str | None = None


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


def page_message(error: Exception) -> str:
    """A flux1 error message with the page's names for the flags it starts with."""
    text = str(error)
    for flag, label in PAGE_WORDS.items():
        if text.startswith(flag + " "):
            return label + text[len(flag) :]
    return text


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
            guidance=float(guidance),
        )
    except ValueError as e:
        raise ValueError(page_message(e)) from None
    chosen = tuple((str(Path(p)), float(s)) for p, s in loras.items() if s)
    check_lora_options([p for p, _ in chosen], [s for _, s in chosen])
    bits = None if quantize == NO_QUANTIZATION else int(quantize)
    return Request(prompt, seeds(seed, batch), config, ModelChoice(sources[model], bits, chosen))


def _whole(value):
    """Page numbers arrive as floats; a whole float becomes an int, anything else stays for Config to refuse."""
    return int(value) if isinstance(value, float) and value.is_integer() else value
