"""Batched generation (`--batch-size N`, `Flux1.generate_images`): N images at a time go through the
text encoders (each distinct prompt of the batch once) and the transformer as one batch; the VAE
decodes them one at a time (its activations, the largest of a generation, do not grow with N).

Each image is the one-at-a-time image of its seed and prompt: the same noise, the same encodings
(padded to the same length, no attention mask), the same sigmas; only the GEMMs see N times the rows,
and a BLAS may block and sum a larger matrix in another order (fp32 rounding, about 1e-7 relative).
Each image gets its own record; its `generation_seconds` is its share (1/N) of the batch's time, and
all images of a batch share the batch's `Timings`."""

import logging
from collections.abc import Callable

import mlx.core as mx

from flux1 import latents
from flux1.generation import Config, ModeInputs
from flux1.pipeline import Flux1, GeneratedImage, Step, to_pixels

log = logging.getLogger("flux1")


def batch_size_for(batch_size, images: int) -> int:
    """`batch_size` checked (a whole number >= 1), and clamped, with a warning, to the images asked."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size {batch_size!r}: expected a whole number >= 1")
    if batch_size > images:
        log.warning("--batch-size %d: only %d images asked; batches of %d", batch_size, images, images)
        return images
    return batch_size


def generate_images(
    flux: Flux1,
    seeds: list[int],
    prompts: str | list[str],
    config: Config,
    batch_size: int = 1,
    noise: mx.array | None = None,
    progress: bool = True,
    on_step: Callable[[int, Step], None] | None = None,
    inputs: ModeInputs | None = None,
) -> list[GeneratedImage]:
    """An image for every (prompt, seed), prompt-major; `noise` [1, 16, H/8, W/8] replaces every
    seed's (as `generate_image(latents=...)`); `inputs` the mode's, shared by every image."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    items = [(prompt, seed) for prompt in prompts for seed in seeds]
    if not items:
        raise ValueError("generate_images: no image asked (give at least one seed and one prompt)")
    for seed in seeds:
        latents.check_seed(seed)
    size = batch_size_for(batch_size, len(items))
    images: list[GeneratedImage] = []
    for first in range(0, len(items), size):
        shifted = None if on_step is None else (lambda n, step, first=first: on_step(first + n, step))
        images += generate_batch(flux, items[first : first + size], config, noise, progress, shifted, inputs)
    return images


def generate_batch(
    flux: Flux1,
    items: list[tuple[str, int]],
    config: Config,
    noise: mx.array | None = None,
    progress: bool = True,
    on_step: Callable[[int, Step], None] | None = None,
    inputs: ModeInputs | None = None,
) -> list[GeneratedImage]:
    """One batch: the image of each (prompt, seed), in the mode `inputs` select; `on_step(n, step)`
    sees image n's part of each step (its latents and velocity)."""
    pictures, records, timings = flux.generate_arrays(items, config, noise, progress, on_step, inputs)
    return [GeneratedImage(to_pixels(picture), record, timings) for picture, record in zip(pictures, records)]
