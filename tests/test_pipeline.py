"""End to end: the same files, prompt and initial noise give the image diffusers' FluxPipeline gives."""

import weakref

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from tests.conftest import relative_error

from flux1 import Config, Flux1, latents

# fp32 on both sides through CLIP, T5, 3 transformer steps and the VAE; differences are summation
# order only. Measured about 1e-6 (schnell) and 6e-6 (dev) relative on the float image.
TOLERANCE = 1e-4
HEIGHT, WIDTH = 48, 80  # non-square: 3 x 5 image tokens
PROMPT = "A cat holding a sign that says hello world"


@pytest.fixture(scope="module")
def reference_image(tiny_checkpoint):
    def run(config: Config, noise: mx.array, max_length: int) -> np.ndarray:
        pipe = FluxPipeline.from_pretrained(tiny_checkpoint, dtype=torch.float32)
        packed = torch.from_numpy(np.array(latents.pack(noise)))
        return pipe(
            PROMPT,
            height=config.height,
            width=config.width,
            num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance,
            latents=packed,
            output_type="np",
            max_sequence_length=max_length,
        ).images[0]

    return run


def test_image_equals_diffusers_pipeline(tiny_checkpoint, reference_image, compute_path):
    flux = Flux1.from_path(tiny_checkpoint, precision="fp32")  # fp32 GEMMs, as the reference computes
    config = Config(num_inference_steps=3, height=HEIGHT, width=WIDTH, guidance=4.0)
    noise = latents.noise(11, HEIGHT, WIDTH)
    ours, record, _ = flux.generate_array(11, PROMPT, config, noise, progress=False)
    expected = reference_image(config, noise, record["max_sequence_length"])
    assert ours.shape == expected.shape == (HEIGHT, WIDTH, 3)
    assert relative_error(ours, expected) < TOLERANCE


def test_low_ram_frees_each_network_when_it_releases_it(tiny_schnell, monkeypatch):
    """--low-ram's release must find no reference left to a network (a local of the method that ran
    it, the steps' modulations), or its memory is freed only later, into MLX's cache, and the next
    phase's peak holds it."""
    flux = Flux1.from_path(tiny_schnell, low_ram=True)
    release, alive = Flux1.release, {}

    def watched(self, *names):
        models = {name: weakref.ref(self._models[name]) for name in names if name in self._models}
        release(self, *names)
        alive.update({name: model() is not None for name, model in models.items()})

    monkeypatch.setattr(Flux1, "release", watched)
    flux.generate_image(5, PROMPT, Config(num_inference_steps=2, height=32, width=32), progress=False)
    assert alive == dict.fromkeys(("clip", "t5", "transformer", "vae"), False)


def test_same_seed_same_pixels_and_low_ram_changes_nothing(tiny_schnell):
    config = Config(num_inference_steps=2, height=32, width=32)
    first = Flux1.from_path(tiny_schnell).generate_image(5, PROMPT, config, progress=False)
    low_ram = Flux1.from_path(tiny_schnell, low_ram=True)
    second = low_ram.generate_image(5, PROMPT, config, progress=False)
    assert np.array_equal(first.pixels, second.pixels)
    assert low_ram._models == {}  # everything released after use
    other = Flux1.from_path(tiny_schnell).generate_image(6, PROMPT, config, progress=False)
    assert not np.array_equal(first.pixels, other.pixels)


def test_injected_latents_replace_the_seed(tiny_schnell):
    flux = Flux1.from_path(tiny_schnell)
    config = Config(num_inference_steps=1, height=32, width=32)
    noise = latents.noise(99, 32, 32)
    injected = flux.generate_image(1, PROMPT, config, latents=noise, progress=False)
    seeded = flux.generate_image(99, PROMPT, config, progress=False)
    assert np.array_equal(injected.pixels, seeded.pixels)


def test_truncated_prompt_is_reported(tiny_schnell, caplog):
    flux = Flux1.from_path(tiny_schnell)
    flux.generate_image(
        0, "golden light " * 60, Config(num_inference_steps=1, height=16, width=16), progress=False
    )
    assert any("CLIP tokens; only the first 77 are used" in r.message for r in caplog.records)
