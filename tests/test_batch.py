"""Batched generation: every image of a batch is its one-at-a-time image (CPU fp32: within one 8-bit
level; measured 0), with its own record and today's names; bad batch sizes are refused or clamped."""

import numpy as np
import pytest
from PIL import Image
from tests import lora_files

from flux1 import Config, Flux1, latents
from flux1.cli.generate import main
from flux1.metadata import read_record

CONFIG = Config(num_inference_steps=2, height=32, width=48)
VARYING = ("generation_seconds", "created")  # timing and clock: the only record values allowed to differ


def _same_images(batched, single) -> None:
    assert len(batched) == len(single)
    for one, other in zip(batched, single):
        # fp32 GEMMs over N times the rows may sum in another order: 1e-6 on the float image, so at
        # most one 8-bit level where a value sits on a rounding edge.
        assert np.abs(one.pixels.astype(int) - other.pixels.astype(int)).max() <= 1
        drop = lambda record: {k: v for k, v in record.items() if k not in VARYING}  # noqa: E731
        assert drop(one.record) == drop(other.record)


@pytest.mark.parametrize("variant", ["plain", "lora", "low-ram"])
def test_batches_equal_one_at_a_time(tiny_schnell, tmp_path, variant):
    options = {"precision": "fp32", "low_ram": variant == "low-ram"}
    if variant == "lora":
        options |= {"lora_paths": [str(tmp_path / "style.safetensors")], "lora_scales": [0.7]}
        lora_files.write(tmp_path / "style.safetensors", "kohya")
    flux = Flux1.from_path(tiny_schnell, **options)
    prompts, seeds = ["a red fox", "a lighthouse at dusk"], [3, 4, 5]
    single = [flux.generate_image(s, p, CONFIG, progress=False) for p in prompts for s in seeds]
    steps = []
    batched = flux.generate_images(
        seeds, prompts, CONFIG, batch_size=4, progress=False, on_step=lambda n, s: steps.append((n, s))
    )
    _same_images(batched, single)
    assert [(r.record["prompt"], r.record["seed"]) for r in batched] == [
        (p, s) for p in prompts for s in seeds
    ]
    # a batch of 4, then of 2: each image sees its own part of each of its 2 steps
    assert [(n, s.index) for n, s in steps] == [(n, i) for i in (1, 2) for n in range(4)] + [
        (n, i) for i in (1, 2) for n in (4, 5)
    ]
    assert all(s.latents.shape == (1, 6, 64) for _, s in steps)


@pytest.mark.parametrize("mode", ["true CFG", "img2img", "inpainting"])
def test_batches_equal_one_at_a_time_in_every_mode(tiny_dev, tmp_path, mode):
    """A mode's inputs are shared by the batch: the negative prompt's velocity for each image, the
    input image's latents and mask broadcast over the batch's noises."""
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 48, 3), np.uint8)).save(
        tmp_path / "in.png"
    )
    mask = np.zeros((32, 48), np.uint8)
    mask[:, 24:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    inputs = {
        "true CFG": {"negative_prompt": "blurry", "true_cfg_scale": 3.0},
        "img2img": {"image": tmp_path / "in.png", "image_strength": 0.5},
        "inpainting": {"image": tmp_path / "in.png", "mask": tmp_path / "mask.png"},
    }[mode]
    flux = Flux1.from_path(tiny_dev, precision="fp32")
    config = Config(num_inference_steps=4, height=32, width=48)
    single = [flux.generate_image(s, "a fox", config, progress=False, **inputs) for s in (1, 2, 3)]
    batched = flux.generate_images([1, 2, 3], "a fox", config, batch_size=3, progress=False, **inputs)
    _same_images(batched, single)
    plain = flux.generate_image(1, "a fox", config, progress=False)
    assert np.abs(plain.pixels.astype(int) - batched[0].pixels.astype(int)).max() > 8  # the mode acts


def test_injected_noise_is_every_images_noise(tiny_dev):
    flux = Flux1.from_path(tiny_dev, precision="fp32")
    noise = latents.noise(9, 32, 48) * 0.5
    single = [flux.generate_image(s, "a fox", CONFIG, latents=noise, progress=False) for s in (1, 2)]
    batched = flux.generate_images([1, 2], "a fox", CONFIG, batch_size=2, latents=noise, progress=False)
    _same_images(batched, single)
    assert np.array_equal(batched[0].pixels, batched[1].pixels)


def test_cli_batches_name_and_record_as_today(tiny_schnell, tmp_path, capsys):
    common = ["--path", str(tiny_schnell), "--prompt", "a fox", "--height", "32", "--width", "48"]
    common += ["--steps", "2", "--seed", "3", "4", "5", "-q", "8", "--precision", "fp32"]
    assert main([*common, "--output", str(tmp_path / "one" / "x.png")]) == 2  # folder missing: refused
    capsys.readouterr()
    for name, extra in (("one", []), ("two", ["--batch-size", "2"])):
        (tmp_path / name).mkdir()
        assert main([*common, *extra, "--output", str(tmp_path / name / "x.png")]) == 0
    out = capsys.readouterr().out
    saved = [line for line in out.splitlines() if line.startswith("saved")]
    assert ["batch of 2: " in line for line in saved] == [False] * 3 + [True, True, False]  # 2 + 1
    names = ["x_seed_3.png", "x_seed_4.png", "x_seed_5.png"]
    for folder in ("one", "two"):
        assert sorted(p.name for p in (tmp_path / folder).iterdir()) == names
    for name in names:
        one, two = tmp_path / "one" / name, tmp_path / "two" / name
        assert np.abs(np.asarray(Image.open(one), int) - np.asarray(Image.open(two), int)).max() <= 1
        assert read_record(one)["seed"] == read_record(two)["seed"] == int(name[7])


def test_bad_batch_sizes(tiny_schnell, tmp_path, capsys, caplog):
    common = ["--path", str(tiny_schnell), "--prompt", "x", "--height", "32", "--width", "48", "--steps", "1"]
    assert main([*common, "--batch-size", "0", "--output", str(tmp_path / "o.png")]) == 2
    assert capsys.readouterr().err.strip() == "error: --batch-size 0: expected a whole number >= 1"
    assert list(tmp_path.iterdir()) == []
    assert main([*common, "--seed", "1", "2", "--batch-size", "8", "--output", str(tmp_path / "o.png")]) == 0
    assert "--batch-size 8: only 2 images asked; batches of 2" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o_seed_1.png", "o_seed_2.png"]
    with pytest.raises(ValueError, match="no image asked"):
        Flux1.from_path(tiny_schnell).generate_images([], "x", CONFIG)
