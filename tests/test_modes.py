"""Each generation mode equals its diffusers pipeline on the same tiny weights, the same injected noise
and the VAE posterior's mean: true CFG (FluxPipeline), img2img, inpainting, Fill, Kontext, and Canny
and Depth (FluxControlPipeline)."""

import importlib
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image
from tests.conftest import relative_error
from tests.hub_cache import hub_cache

from flux1 import Config, Flux1, latents
from flux1.configs import REPOS
from flux1.fixtures.build import build_checkpoint
from flux1.generation import ModeInputs

# fp32 on both sides; differences are summation order only (measured errors in the README table).
LATENT_TOLERANCE = 1e-4
PIXEL_TOLERANCE = 1 / 255
HEIGHT, WIDTH = 48, 80  # non-square: 3 x 5 image tokens
PROMPT = "A cat holding a sign that says hello world"
SEED = 11


@pytest.fixture(scope="module")
def tiny_fill(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("tiny-fill"), "tiny", "fill", "float32", seed=2, bfl=True)


@pytest.fixture(scope="module")
def tiny_control(tmp_path_factory):
    """Canny's and Depth's transformer (128 input channels); which of the two, --base-model says."""
    return build_checkpoint(
        tmp_path_factory.mktemp("tiny-control"), "tiny", "canny", "float32", seed=4, bfl=True
    )


@pytest.fixture(scope="module")
def tiny_kontext(tmp_path_factory):
    return build_checkpoint(
        tmp_path_factory.mktemp("tiny-kontext"), "tiny", "kontext", "float32", seed=3, bfl=True
    )


def picture(seed: int) -> Image.Image:
    """A smooth random RGB image (noise would make every mode look alike to a random VAE)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (HEIGHT // 8, WIDTH // 8, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((WIDTH, HEIGHT), Image.Resampling.BILINEAR)


def right_half_mask() -> Image.Image:
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[:, WIDTH // 2 :] = 255
    return Image.fromarray(mask)


@contextmanager
def injected(module_name: str, noise: mx.array):
    """diffusers' pipeline module with our noise for randn_tensor and the posterior's mean for the VAE
    (where its pipelines sample one, through retrieve_latents or the distribution itself)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    module = importlib.import_module(f"diffusers.pipelines.flux.{module_name}")

    def randn(shape, **_):
        assert tuple(shape) == tuple(noise.shape)
        return torch.from_numpy(np.array(noise))

    with (
        mock.patch.object(module, "randn_tensor", randn),
        mock.patch.object(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode()),
    ):
        yield


def reference(pipeline: str, module_name: str, checkpoint, noise: mx.array, tiling=False, **call) -> tuple:
    """(final packed latents, float image) of a diffusers pipeline (its VAE in tiles with `tiling`)."""
    import diffusers

    pipe = getattr(diffusers, pipeline).from_pretrained(checkpoint, dtype=torch.float32)
    if tiling:
        pipe.vae.enable_tiling()
    seen = {}

    def keep(_pipe, _i, _t, tensors):
        seen["latents"] = tensors["latents"].numpy().copy()
        return tensors

    with injected(module_name, noise):
        image = pipe(
            prompt=PROMPT, height=HEIGHT, width=WIDTH, output_type="np", callback_on_step_end=keep, **call
        ).images[0]
    return seen["latents"], image


def ours(checkpoint, noise: mx.array, config: Config, inputs: ModeInputs, kind: str | None = None) -> tuple:
    """(final packed latents, float image, record) of flux1."""
    seen = {}
    flux = Flux1.from_path(checkpoint, kind, precision="fp32")  # fp32 GEMMs, as the reference computes
    image, record, _ = flux.generate_array(
        SEED, PROMPT, config, noise, False, lambda step: seen.update(latents=np.array(step.latents)), inputs
    )
    return seen["latents"], image, record


def assert_equal(mine: tuple, theirs: tuple) -> None:
    """Within the tolerances; the measured errors printed (`pytest -rP` shows them: the README's table)."""
    latents_error = relative_error(mine[0], theirs[0])
    assert mine[1].shape == theirs[1].shape == (HEIGHT, WIDTH, 3)
    pixels_error = np.abs(mine[1] - theirs[1]).max()
    print(f"final latents' relative error {latents_error:.1e}, largest pixel difference {pixels_error:.1e}")
    assert latents_error < LATENT_TOLERANCE
    assert pixels_error < PIXEL_TOLERANCE


def assert_moved(mine: tuple, other: tuple) -> None:
    """The mode's input changed the result: latents by 10x the parity tolerance."""
    assert relative_error(mine[0], other[0]) > 10 * LATENT_TOLERANCE


def test_true_cfg_equals_flux_pipeline(tiny_checkpoint):
    config = Config(num_inference_steps=3, height=HEIGHT, width=WIDTH, guidance=4.0)
    noise = latents.noise(SEED, HEIGHT, WIDTH)
    inputs = ModeInputs(negative_prompt="blurry, low quality", true_cfg_scale=4.0)
    mine = ours(tiny_checkpoint, noise, config, inputs)
    theirs = reference(
        "FluxPipeline",
        "pipeline_flux",
        tiny_checkpoint,
        noise,
        num_inference_steps=3,
        guidance_scale=4.0,
        negative_prompt="blurry, low quality",
        true_cfg_scale=4.0,
        max_sequence_length=mine[2]["max_sequence_length"],
    )
    assert_equal(mine, theirs)
    assert_moved(mine, ours(tiny_checkpoint, noise, config, ModeInputs()))


@pytest.mark.parametrize("tiling", [False, True])
def test_img2img_equals_flux_img2img_pipeline(tiny_checkpoint, tiling):
    # 4 steps at S = 0.5: both start at step 2 (diffusers: int(4 - 4 * 0.5)). Tiled: 80 pixels are
    # wider than the tiny VAE's 64-pixel tiles, so the image is encoded and decoded in tiles on both sides.
    config = Config(num_inference_steps=4, height=HEIGHT, width=WIDTH, guidance=4.0, vae_tiling=tiling)
    noise = latents.noise(SEED, HEIGHT, WIDTH)
    mine = ours(tiny_checkpoint, noise, config, ModeInputs(image=picture(0), image_strength=0.5))
    theirs = reference(
        "FluxImg2ImgPipeline",
        "pipeline_flux_img2img",
        tiny_checkpoint,
        noise,
        tiling,
        image=picture(0),
        strength=0.5,
        num_inference_steps=4,
        guidance_scale=4.0,
        max_sequence_length=mine[2]["max_sequence_length"],
    )
    assert_equal(mine, theirs)
    assert mine[2]["image_strength"] == 0.5 and len(mine[2]["image_sha256"]) == 64
    assert_moved(mine, ours(tiny_checkpoint, noise, config, ModeInputs(image=picture(1), image_strength=0.5)))


def test_inpainting_equals_flux_inpaint_pipeline(tiny_checkpoint):
    config = Config(num_inference_steps=4, height=HEIGHT, width=WIDTH, guidance=4.0)
    noise = latents.noise(SEED, HEIGHT, WIDTH)
    inputs = ModeInputs(image=picture(0), mask=right_half_mask(), image_strength=0.25)
    mine = ours(tiny_checkpoint, noise, config, inputs)
    theirs = reference(
        "FluxInpaintPipeline",
        "pipeline_flux_inpaint",
        tiny_checkpoint,
        noise,
        image=picture(0),
        mask_image=right_half_mask(),
        strength=0.75,
        num_inference_steps=4,
        guidance_scale=4.0,
        max_sequence_length=mine[2]["max_sequence_length"],
    )
    assert_equal(mine, theirs)
    img2img = ours(tiny_checkpoint, noise, config, ModeInputs(image=picture(0), image_strength=0.25))
    assert_moved(mine, img2img)


def test_fill_equals_flux_fill_pipeline(tiny_fill):
    # Guidance 4, not Fill's 30: the guidance embedding takes sin/cos of up to 30 * 1000 * freq, where
    # one float32 ulp of the argument is ~2e-3 rad, so at 30 both sides' rounding alone gives 1e-4 to
    # 2e-4 (measured); at 4 the mode's own arithmetic is what is compared.
    config = Config(num_inference_steps=3, height=HEIGHT, width=WIDTH, guidance=4.0)
    noise = latents.noise(SEED, HEIGHT, WIDTH)
    mine = ours(tiny_fill, noise, config, ModeInputs(image=picture(0), mask=right_half_mask()))
    theirs = reference(
        "FluxFillPipeline",
        "pipeline_flux_fill",
        tiny_fill,
        noise,
        image=picture(0),
        mask_image=right_half_mask(),
        num_inference_steps=3,
        guidance_scale=4.0,
        max_sequence_length=mine[2]["max_sequence_length"],
    )
    assert_equal(mine, theirs)
    assert_moved(mine, ours(tiny_fill, noise, config, ModeInputs(image=picture(1), mask=right_half_mask())))


def test_kontext_equals_flux_kontext_pipeline(tiny_kontext):
    """The square reference is taken at Kontext's 1024x1024 (diffusers' default _auto_resize: 4096
    reference tokens beside the 15 of the 48x80 output), whatever the output's size."""
    config = Config(num_inference_steps=3, height=HEIGHT, width=WIDTH)  # guidance: Kontext's 2.5
    noise = latents.noise(SEED, HEIGHT, WIDTH)
    square = [picture(seed).resize((WIDTH, WIDTH)) for seed in (0, 1)]
    mine = ours(tiny_kontext, noise, config, ModeInputs(image=square[0]))
    assert mine[2]["guidance"] == 2.5
    theirs = reference(
        "FluxKontextPipeline",
        "pipeline_flux_kontext",
        tiny_kontext,
        noise,
        image=square[0],
        num_inference_steps=3,
        guidance_scale=2.5,
        max_area=HEIGHT * WIDTH,  # keeps HEIGHT x WIDTH
        max_sequence_length=mine[2]["max_sequence_length"],
    )
    assert_equal(mine, theirs)
    assert_moved(mine, ours(tiny_kontext, noise, config, ModeInputs(image=square[1])))


def test_kontexts_reference_tokens_count_in_the_memory_check(tiny_kontext, monkeypatch):
    """A 768x768 output alone needs 1.55 GB (the decoder's); beside a square reference's 4096 tokens the
    transformer needs 1.97 GB: refused with 1.8 GB, before any work."""
    from flux1 import generation

    monkeypatch.setattr(generation, "physical_memory", lambda: 18 * 10**8)
    flux = Flux1.from_path(tiny_kontext)
    config = Config(num_inference_steps=1, height=768, width=768)
    generation.check_fits(config, 512)
    with pytest.raises(ValueError, match=r"the transformer needs about 2.0 GB of activations, more than"):
        flux.generate_image(0, PROMPT, config, progress=False, image=picture(0).resize((64, 64)))
    assert flux._models == {}


@pytest.mark.parametrize("kind", ["canny", "depth"])
def test_control_equals_flux_control_pipeline(tiny_control, kind):
    # Guidance 4 for the reason Fill's test gives; the kinds' defaults (30, 10) are the next test's.
    config = Config(num_inference_steps=3, height=HEIGHT, width=WIDTH, guidance=4.0)
    noise = latents.noise(SEED, HEIGHT, WIDTH)
    mine = ours(tiny_control, noise, config, ModeInputs(image=picture(0)), kind)
    assert mine[2]["base_model"] == kind
    theirs = reference(
        "FluxControlPipeline",
        "pipeline_flux_control",
        tiny_control,
        noise,
        control_image=picture(0),
        num_inference_steps=3,
        guidance_scale=4.0,
        max_sequence_length=mine[2]["max_sequence_length"],
    )
    assert_equal(mine, theirs)
    assert_moved(mine, ours(tiny_control, noise, config, ModeInputs(image=picture(1)), kind))


@pytest.mark.parametrize("kind, steps, guidance", [("canny", 50, 30.0), ("depth", 30, 10.0)])
def test_canny_and_depth_take_their_model_cards_defaults(tiny_control, kind, steps, guidance):
    flux = Flux1.from_path(tiny_control, kind)
    assert Config().steps_for(flux.files.base_model) == steps
    config = Config(num_inference_steps=1, height=16, width=16)
    image = flux.generate_image(0, PROMPT, config, progress=False, image=picture(0))
    assert (image.record["base_model"], image.record["guidance"]) == (kind, guidance)


def test_canny_takes_the_images_edges_as_its_control_image(tiny_control, tmp_path):
    """`--canny`: the control image is the Canny edges of the image fitted to the output size (BFL's
    order: resize, then edges); the record keeps it and `-C` draws the same image again."""
    from flux1.cli.generate import main
    from flux1.metadata import read_record
    from flux1.modes.canny_edges import edges
    from flux1.modes.images import fit

    photo = picture(0).resize((2 * WIDTH, 2 * HEIGHT))
    config = Config(num_inference_steps=2, height=HEIGHT, width=WIDTH, guidance=4.0)
    noise = latents.noise(SEED, HEIGHT, WIDTH)
    mine = ours(tiny_control, noise, config, ModeInputs(image=photo, canny=True), "canny")
    edge_map = edges(fit(photo, HEIGHT, WIDTH)).convert("RGB")
    assert np.array_equal(mine[0], ours(tiny_control, noise, config, ModeInputs(image=edge_map), "canny")[0])
    assert_moved(mine, ours(tiny_control, noise, config, ModeInputs(image=photo), "canny"))
    assert mine[2]["canny"] is True

    photo.save(tmp_path / "photo.png")
    flags = ["--path", str(tiny_control), "--base-model", "canny", "--prompt", PROMPT, "--seed", "3"]
    flags += ["--steps", "2", "--height", str(HEIGHT), "--width", str(WIDTH)]
    flags += ["--image-path", str(tmp_path / "photo.png"), "--canny"]
    assert main([*flags, "--output", str(tmp_path / "a.png")]) == 0
    assert read_record(tmp_path / "a.png")["canny"] is True
    assert main(["-C", str(tmp_path / "a.png"), "--output", str(tmp_path / "b.png")]) == 0
    again = [np.asarray(Image.open(tmp_path / name)) for name in ("a.png", "b.png")]
    assert np.array_equal(*again)
    assert read_record(tmp_path / "b.png")["canny"] is True


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An image, its mask, a mask of another size, a file that is no image."""
    folder = tmp_path_factory.mktemp("inputs")
    picture(0).save(folder / "image.png")
    right_half_mask().save(folder / "mask.png")
    Image.new("L", (WIDTH // 2, HEIGHT)).save(folder / "small_mask.png")
    (folder / "notes.png").write_text("not an image")
    return folder


BAD_INPUT = [
    (["--image-path", "{f}/missing.png"], "--image-path {f}/missing.png: file not found"),
    (["--image-path", "{f}/notes.png"], "--image-path {f}/notes.png: not an image that Pillow can read"),
    (
        ["--image-path", "{f}/image.png", "--mask-path", "{f}/small_mask.png"],
        "--mask-path {f}/small_mask.png: 40x48 pixels, but the image is 80x48",
    ),
    (["--mask-path", "{f}/mask.png"], "--mask-path needs --image-path"),
    (["--image-path", "{f}/image.png", "--image-strength", "1.5"], "--image-strength 1.5: expected a finite"),
    (["--true-cfg-scale", "nan"], "--true-cfg-scale nan: expected a finite number >= 0"),
    (["--canny"], "--canny needs --image-path (the image whose edges guide FLUX.1 Canny)"),
    (
        ["--image-path", "{f}/image.png", "--canny"],
        "--canny: FLUX.1-schnell does not take Canny edges (FLUX.1-canny does)",
    ),
]


@pytest.mark.parametrize("args, message", BAD_INPUT)
def test_bad_mode_input_is_refused_before_any_work(tiny_schnell, files, tmp_path, capsys, args, message):
    from flux1.cli.generate import main

    argv = ["--path", str(tiny_schnell), "--prompt", "x", "--output", str(tmp_path / "out.png")]
    assert main(argv + [a.format(f=files) for a in args]) == 2
    assert message.format(f=files) in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kind, args, message",
    [
        (
            "fill",
            ["--image-path", "{f}/image.png"],
            "FLUX.1-fill takes --image-path and --mask-path; given --image-path",
        ),
        ("kontext", [], "FLUX.1-kontext takes --image-path; given no image"),
        (
            "kontext",
            ["--image-path", "{f}/image.png", "--mask-path", "{f}/mask.png"],
            "FLUX.1-kontext takes --image-path; given --image-path and --mask-path",
        ),
        (
            "kontext",
            ["--image-path", "{f}/image.png", "--image-strength", "0.5"],
            "--image-strength: FLUX.1-kontext with --image-path does not use it",
        ),
        ("control", ["--base-model", "depth"], "FLUX.1-depth takes --image-path; given no image"),
        (
            "control",
            ["--base-model", "canny", "--image-path", "{f}/image.png", "--mask-path", "{f}/mask.png"],
            "FLUX.1-canny takes --image-path; given --image-path and --mask-path",
        ),
        (
            "control",
            ["--base-model", "canny", "--image-path", "{f}/image.png", "--image-strength", "0.5"],
            "--image-strength: FLUX.1-canny with --image-path does not use it",
        ),
        (
            "control",
            ["--base-model", "depth", "--image-path", "{f}/image.png", "--canny"],
            "--canny: FLUX.1-depth does not take Canny edges (FLUX.1-canny does)",
        ),
        (
            "control",
            ["--image-path", "{f}/image.png"],
            "transformer: a FLUX.1 Canny or Depth transformer (in_channels 128; the two have the same "
            "shapes): say which with --base-model canny or --base-model depth",
        ),
    ],
)
def test_a_kind_refuses_inputs_it_cannot_use(request, files, tmp_path, capsys, kind, args, message):
    from flux1.cli.generate import main

    checkpoint = request.getfixturevalue(f"tiny_{kind}")
    argv = ["--path", str(checkpoint), "--prompt", "x", "--output", str(tmp_path / "out.png")]
    assert main(argv + [a.format(f=files) for a in args]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_unused_negative_prompt_and_long_negative_prompt_warn(tiny_schnell, caplog):
    flux = Flux1.from_path(tiny_schnell)
    config = Config(num_inference_steps=1, height=16, width=16)
    flux.generate_image(0, PROMPT, config, progress=False, negative_prompt="blurry")
    assert any("--negative-prompt is unused" in r.message for r in caplog.records)
    flux.generate_image(
        0, PROMPT, config, progress=False, negative_prompt="golden light " * 60, true_cfg_scale=2
    )
    assert any("the negative prompt has" in r.message and "CLIP" in r.message for r in caplog.records)


def test_kinds_from_the_files(tiny_fill, tiny_kontext, tiny_control, tmp_path):
    """Fill and Kontext from their files; Canny and Depth have the same shapes and pipeline class, so
    --base-model, the hub repo named, or a save.py folder's record says which."""
    from flux1.model_files import ModelFilesError, resolve
    from flux1.saving import save_model

    assert resolve(path=tiny_fill).base_model == "fill"
    assert resolve(path=tiny_kontext).base_model == "kontext"
    with pytest.raises(ModelFilesError, match="--base-model dev, but .* is a FLUX.1-kontext transformer"):
        resolve(path=tiny_kontext, base_model="dev")
    with pytest.raises(
        ModelFilesError, match="--base-model dev, but .* is a FLUX.1 Canny or Depth transformer"
    ):
        resolve(path=tiny_control, base_model="dev")
    assert resolve(path=tiny_control, base_model="depth").base_model == "depth"
    with mock.patch("flux1.model_files.download", {REPOS["depth"]: tiny_control}.get):  # the hub's copy
        assert resolve(model=REPOS["depth"]).base_model == "depth"
        assert resolve(model="depth").base_model == "depth"
    saved = save_model(Flux1.from_path(tiny_control, "depth"), tmp_path / "saved")
    assert resolve(path=saved).base_model == "depth"


def test_kontext_size_is_its_preferred_resolution_nearest_the_image():
    from flux1.modes import kontext
    from flux1.modes.images import open_input

    assert kontext.output_size(open_input(Image.new("RGB", (1600, 900)), "--image-path", "RGB")) == (
        752,
        1392,
    )
    assert kontext.output_size(open_input(Image.new("RGB", (500, 500)), "--image-path", "RGB")) == (
        1024,
        1024,
    )


@pytest.fixture(scope="module")
def model_options(tiny_schnell, tiny_fill, tiny_kontext, tiny_control, tmp_path_factory):
    """A quantized base with a LoRA under --low-ram, and GGUF transformers (schnell, Fill, Kontext,
    Canny)."""
    from tests import lora_files

    from flux1.fixtures.gguf import write_gguf

    folder = tmp_path_factory.mktemp("mode-options")
    lora = folder / "style.safetensors"
    lora_files.write(lora, "kohya", seed=5)
    sources = {"schnell": tiny_schnell, "fill": tiny_fill, "kontext": tiny_kontext, "canny": tiny_control}
    for name, source in sources.items():
        write_gguf(source / "transformer", folder / f"{name}-Q8_0.gguf", "Q8_0")
    return {
        # the LoRA is made for schnell's 64 input channels; Fill's img_in takes 384 and Canny's 128,
        # so they go without
        "-q 4 + LoRA + low RAM": lambda name: dict(
            quantize=4, group_size=32, lora_paths=[] if name in ("fill", "canny") else [lora], low_ram=True
        ),
        "GGUF Q8_0": lambda name: dict(gguf=folder / f"{name}-Q8_0.gguf"),
    }


@pytest.mark.parametrize("option", ["-q 4 + LoRA + low RAM", "GGUF Q8_0"])
@pytest.mark.parametrize("mode", ["true CFG", "img2img", "inpainting", "Fill", "Kontext", "Canny"])
def test_every_mode_runs_on_quantized_lora_low_ram_and_gguf_models(
    tiny_schnell, tiny_fill, tiny_kontext, tiny_control, model_options, option, mode
):
    """Each mode goes through the same loop whatever holds the weights: the image is the mode's (it
    differs from the same model's text-to-image), the record says what made it. A Kontext GGUF has
    dev's shapes: the folder's kind tells it apart, no --base-model needed; Canny's folder and GGUF
    have Depth's shapes too, so --base-model names it."""
    from flux1.model_files import resolve

    kind = mode.lower() if mode in ("Fill", "Kontext", "Canny") else "schnell"
    options = model_options[option](kind)
    gguf = options.pop("gguf", None)
    sources = {"fill": tiny_fill, "kontext": tiny_kontext, "schnell": tiny_schnell, "canny": tiny_control}
    files = resolve(path=sources[kind], gguf=gguf, base_model="canny" if kind == "canny" else None)
    assert files.base_model == kind
    flux = Flux1(files, precision="fp32", **options)
    inputs = {
        "true CFG": dict(negative_prompt="blurry", true_cfg_scale=4.0),
        "img2img": dict(image=picture(1), image_strength=0.5),
        "inpainting": dict(image=picture(1), mask=right_half_mask()),
        "Fill": dict(image=picture(1), mask=right_half_mask()),
        "Kontext": dict(image=picture(1)),
        "Canny": dict(image=picture(1)),
    }[mode]
    config = Config(num_inference_steps=4, height=HEIGHT, width=WIDTH)
    result = flux.generate_image(SEED, PROMPT, config, progress=False, **inputs)
    assert np.isfinite(result.pixels).all() and result.pixels.shape == (HEIGHT, WIDTH, 3)
    if kind == "schnell":
        plain = flux.generate_image(SEED, PROMPT, config, progress=False)
        assert np.abs(plain.pixels.astype(int) - result.pixels.astype(int)).max() > 8
    record = result.record
    assert record["quantize"] == ("gguf" if gguf else 4)
    assert [lora["name"] for lora in record["loras"]] == [p.name for p in options.get("lora_paths", [])]
    assert (record["negative_prompt"] is not None) == (mode == "true CFG")


@pytest.mark.parametrize("kind", ["fill", "kontext", "canny"])
def test_bfl_single_file_draws_what_the_diffusers_folder_draws(request, kind, tmp_path):
    """`--path flux1-<kind>.safetensors` (BFL names; text encoders and VAE from the kind's hub repo, here
    an offline cache of the same fixture) makes the folder's image, pixel for pixel; Kontext's file has
    dev's architecture and Canny's Depth's, so they need --base-model. (The file is moved away from the fixture's
    `ae.safetensors`: a BFL VAE file's config is read from its shapes with the real VAE's 32 norm
    groups, which the tiny VAE does not have.)"""
    folder = request.getfixturevalue("tiny_control" if kind == "canny" else f"tiny_{kind}")
    (tmp_path / "bfl").mkdir()
    bfl_file = tmp_path / "bfl" / f"flux1-{kind}.safetensors"
    bfl_file.symlink_to(folder / bfl_file.name)
    home = hub_cache(folder, tmp_path / "home", REPOS[kind])
    picture(0).save(tmp_path / "image.png")
    flags = ["--prompt", PROMPT, "--seed", str(SEED), "--steps", "2", "--height", str(HEIGHT)]
    flags += ["--width", str(WIDTH), "--image-path", str(tmp_path / "image.png")]
    if kind == "fill":
        right_half_mask().save(tmp_path / "mask.png")
        flags += ["--mask-path", str(tmp_path / "mask.png")]
    folder_flags = ["--base-model", kind] if kind == "canny" else []  # its folder looks like Depth's
    file_flags = ["--base-model", kind] if kind in ("kontext", "canny") else []
    pixels = []
    for source in ([str(folder), *folder_flags], [str(bfl_file), *file_flags]):
        out = tmp_path / f"{len(pixels)}.png"
        env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
        main = Path(__file__).resolve().parents[1] / "main.py"
        run = subprocess.run(
            [sys.executable, str(main), "--path", *source, *flags, "--output", str(out)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr
        pixels.append(np.asarray(Image.open(out)))
    assert np.array_equal(*pixels)


@pytest.mark.parametrize("mode", ["1", "P", "RGB", "RGBA", "I;16"])
def test_a_mask_in_any_pillow_mode_is_read_as_its_grayscale(mode, tmp_path):
    """What the mask means (white = repaint) does not depend on how the file stores it."""
    picture(0).save(tmp_path / "image.png")
    gray = right_half_mask()
    gray.convert(mode).save(tmp_path / "mask.png")
    read = ModeInputs(image=tmp_path / "image.png", mask=tmp_path / "mask.png").mask
    assert read.image.mode == "L" and np.array_equal(np.asarray(read.image), np.asarray(gray))


def test_a_mask_that_cannot_become_grayscale_is_refused_by_name(tmp_path):
    picture(0).save(tmp_path / "image.png")
    Image.new("LAB", (WIDTH, HEIGHT)).save(tmp_path / "mask.tif")
    with pytest.raises(ValueError) as refused:
        ModeInputs(image=tmp_path / "image.png", mask=tmp_path / "mask.tif")
    assert str(refused.value) == (
        f"--mask-path {tmp_path / 'mask.tif'}: cannot be converted to grayscale "
        "(conversion from LAB to RGB not supported)"
    )
