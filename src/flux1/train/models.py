"""The one place the trainer reaches into the generation pipeline: loading and releasing networks,
encoding prompts and drawing validation images with a `Flux1`."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from flux1.configs import CLIP_LENGTH, DEFAULT_STEPS
from flux1.generation import Config
from flux1.model_files import resolve
from flux1.pipeline import Flux1


def open_base(options) -> Flux1:
    """--model / --path / --gguf / --base-model / -q as main.py takes them (a saved folder works too).
    LoRAs of the training run are put on by the trainer, so the pipeline itself applies none."""
    if options.path:
        files = resolve(path=options.path, base_model=options.base_model or options.model, gguf=options.gguf)
    else:
        files = resolve(model=options.model, base_model=options.base_model, gguf=options.gguf)
    return Flux1(files, quantize=options.quantize, group_size=options.group_size)


def load(flux: Flux1, name: str) -> nn.Module:
    """clip, t5, transformer or vae: loaded (and quantized) on first use, then kept until released."""
    return flux.load(name)


def release(flux: Flux1, name: str) -> None:
    flux.release(name)


def encode(flux: Flux1, prompt: str, max_length: int) -> tuple[mx.array, mx.array]:
    """(T5 hidden states [1, L, D], CLIP pooled [1, P]) in fp32."""
    hidden, pooled = flux.encode_prompt(prompt, max_length)
    return hidden.astype(mx.float32), pooled.astype(mx.float32)


def clip_ids(flux: Flux1, prompt: str) -> mx.array:
    """int32 [1, 77]: the prompt's CLIP tokens, as the pipeline tokenizes them (for a CLIP that trains,
    whose pooled output cannot be cached)."""
    return mx.array(flux.tokenizer("clip", CLIP_LENGTH)(prompt).ids)


def draw(flux: Flux1, noise, hidden, pooled, size: int, guidance: float, steps: int | None) -> np.ndarray:
    """uint8 [H, W, 3]: the image the pipeline makes of these embeddings and initial noise, with
    whatever adapters the loaded transformer holds."""
    config = Config(num_inference_steps=steps, height=size, width=size, guidance=guidance)
    steps = steps or DEFAULT_STEPS[flux.files.base_model]
    packed = flux.denoise(noise, hidden, pooled, config, steps, progress=False)
    return (flux.decode(packed, config) * 255).round().astype(np.uint8)
