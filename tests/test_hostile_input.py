"""Careless and hostile input: each class of defect refused with flux1's own message, exit code 2,
nothing written or lost, and nothing outside the model folder read."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from tests import lora_files
from tests.test_cli import REPO_ROOT, SMALL, _run

from flux1.cli.generate import main
from flux1.configs import ConfigError, check_config
from flux1.fixtures.presets import configs
from flux1.generation import Config
from flux1.loaders.transformer import load_transformer
from flux1.metadata import read_record
from flux1.pipeline import Flux1
from flux1.weights.safetensors_io import WeightFileError


def _refused(capsys, argv: list[str], message: str, folder: Path) -> None:
    before = sorted(p.name for p in folder.iterdir())
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing written


@pytest.fixture
def copy_of(tiny_schnell, tmp_path):
    """A private copy of the tiny model, to be damaged."""

    def make() -> Path:
        target = tmp_path / "model"
        shutil.copytree(tiny_schnell, target, ignore=shutil.ignore_patterns("*.gguf", "flux1-*", "ae.*"))
        return target

    return make


# 1. Paths escape the model folder
@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors"])
def test_index_cannot_name_a_file_outside_its_folder(copy_of, tmp_path, monkeypatch, shard):
    from flux1.weights import safetensors_io

    model = copy_of()
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"secret contents that must never be read")
    index_file = model / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = shard
    index_file.write_text(json.dumps(index))
    opened = []
    read_header = safetensors_io.read_header
    monkeypatch.setattr(
        safetensors_io, "read_header", lambda path: opened.append(Path(path)) or read_header(path)
    )
    with pytest.raises(WeightFileError) as refused:
        load_transformer(model / "transformer")
    assert (
        str(refused.value)
        == f"{index_file}: names '{shard}', which is not a file inside {model / 'transformer'}"
    )
    assert opened == []  # refused before any shard was opened


def test_a_file_that_is_not_safetensors_is_named_not_quoted(copy_of):
    model = copy_of()
    shard = next((model / "transformer").glob("*-00001-of-*.safetensors"))
    shard.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n" * 4)
    with pytest.raises(WeightFileError) as refused:
        load_transformer(model / "transformer")
    message = str(refused.value)
    assert message == f"{shard}: not a safetensors file (no valid header length; 128 bytes)"
    assert "root" not in message.replace(str(shard), "")


# 2. Zero and non-finite values
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--height", "0"], "--height 0: must be a multiple of 16 from 16 to 8192 (nearest: 16)"),
        (["--max-sequence-length", "0"], "--max-sequence-length 0: expected 1 to 512"),
        (["--max-sequence-length", "100000"], "--max-sequence-length 100000: expected 1 to 512"),
        (["--guidance", "nan"], "--guidance nan: expected a finite number >= 0"),
        (["--guidance", "inf"], "--guidance inf: expected a finite number >= 0"),
        (["--seed", "-5"], "--seed -5: expected 0 to 2**64 - 1"),
        (["--steps", "100000"], "--steps 100000: expected 1 to 1000"),
    ],
)
def test_numbers_out_of_range_are_refused_before_loading(tiny_schnell, tmp_path, capsys, args, message):
    argv = ["--path", str(tiny_schnell), "--prompt", "x", "--output", str(tmp_path / "o.png"), *args]
    _refused(capsys, argv, message, tmp_path)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_inference_steps": 0}, "--steps 0: expected 1 to 1000"),
        ({"height": "512"}, "--height '512': expected a whole number"),
        ({"width": 1.5}, "--width 1.5: expected a whole number"),
        ({"guidance": float("nan")}, "--guidance nan: expected a finite number >= 0"),
        ({"max_sequence_length": True}, "--max-sequence-length True: expected a whole number"),
    ],
)
def test_config_checks_every_value_when_made(fields, message):
    with pytest.raises(ValueError) as refused:
        Config(**fields)
    assert str(refused.value) == message


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (np.full((1, 16, 4, 6), np.nan, np.float32), "expected finite floating-point values (float32)"),
        (np.zeros((1, 16, 4, 6), np.int64), "expected finite floating-point values (int64)"),
    ],
)
def test_latents_must_be_finite_floats(tiny_schnell, tmp_path, capsys, values, message):
    file = tmp_path / "noise.npy"
    np.save(file, values)
    argv = ["--path", str(tiny_schnell), "--prompt", "x", "--latents", str(file), *SMALL]
    _refused(capsys, [*argv, "--output", str(tmp_path / "o.png")], f"--latents {file}: {message}", tmp_path)


def test_npz_renamed_npy_is_refused(tiny_schnell, tmp_path, capsys):
    file = tmp_path / "noise.npy"
    with open(file, "wb") as f:
        np.savez(f, a=np.zeros((1, 16, 4, 6), np.float32))
    argv = ["--path", str(tiny_schnell), "--prompt", "x", "--latents", str(file), *SMALL]
    message = f"--latents {file}: an .npz archive, expected one .npy array"
    _refused(capsys, [*argv, "--output", str(tmp_path / "o.png")], message, tmp_path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_lora_with_non_finite_values_is_refused(tiny_schnell, tmp_path, bad):
    file = tmp_path / "bad.safetensors"
    lora_files.write(file, "peft")
    tensors = mx.load(str(file))
    name = sorted(tensors)[0]
    tensors[name] = mx.full(tensors[name].shape, bad)
    mx.save_safetensors(str(file), tensors)
    with pytest.raises(ValueError, match=rf"bad.safetensors: tensor '{name}' holds NaN or infinite values"):
        Flux1.from_path(tiny_schnell, lora_paths=[file])
    with pytest.raises(ValueError, match=r"--lora-scales nan: expected a finite number"):
        lora_files.write(file, "peft")
        Flux1.from_path(tiny_schnell, lora_paths=[file], lora_scales=[float("nan")])


# 3. Nothing unbounded
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_layers": 100000}, "'num_layers' is 100000, expected a whole number from 1 to 19"),
        ({"num_attention_heads": 0}, "'num_attention_heads' is 0, expected a whole number from 1 to 24"),
        (
            {"num_attention_heads": 1e9},
            "'num_attention_heads' is 1000000000.0, expected a whole number from 1 to 24",
        ),
        ({"attention_head_dim": "32"}, "'attention_head_dim' is 32, expected a whole number from 1 to 128"),
        ({"axes_dims_rope": [4, 14, 16]}, "'axes_dims_rope' [4, 14, 16] must sum to attention_head_dim 32"),
    ],
)
def test_transformer_config_is_bounded_before_building(copy_of, change, message):
    model = copy_of()
    config_file = model / "transformer" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **change}))
    start = time.perf_counter()
    with pytest.raises(ConfigError) as refused:
        Flux1.from_path(model)
    assert str(refused.value) == f"{config_file}: {message}"
    assert time.perf_counter() - start < 5


def test_every_component_config_is_checked_before_any_network_runs(copy_of):
    for component, change in (
        ("text_encoder", {"num_hidden_layers": -1}),
        ("text_encoder_2", {"d_model": 10**9}),
        ("vae", {"block_out_channels": [16, 32, 32, 10**6]}),
    ):
        model = copy_of()
        file = model / component / "config.json"
        file.write_text(json.dumps({**json.loads(file.read_text()), **change}))
        with pytest.raises(ConfigError, match=f"^{file}: "):
            Flux1.from_path(model)
        shutil.rmtree(model)
    model = copy_of()
    (model / "scheduler" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(WeightFileError, match=r"scheduler_config.json: invalid JSON"):
        Flux1.from_path(model)


def test_a_size_that_cannot_fit_is_refused_with_the_estimate(tiny_schnell, tmp_path, capsys):
    argv = ["--path", str(tiny_schnell), "--prompt", "x", "--height", "8192", "--width", "8192"]
    assert main([*argv, "--output", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert "--height 8192 --width 8192: the VAE decoder needs about 4535.5 GB of activations" in err


def test_the_transformers_estimate_counts_every_row_of_a_batch(tiny_schnell, tmp_path, capsys, monkeypatch):
    """With 4 GB, one 1024x1024 image fits (the decoder's 3.2 GB is the most); 4 rows at once through the
    transformer (5.1 GB) do not, nor 2 with a negative prompt (each step runs both prompts' rows)."""
    from flux1 import generation

    monkeypatch.setattr(generation, "physical_memory", lambda: 4 * 10**9)
    generation.check_fits(generation.Config(), 512)
    argv = ["--path", str(tiny_schnell), "--prompt", "x", "--output", str(tmp_path / "o.png")]
    for extra in (
        ["--seed", "1", "2", "3", "4", "--batch-size", "4"],
        ["--seed", "1", "2", "--batch-size", "2", "--negative-prompt", "blur", "--true-cfg-scale", "3"],
    ):
        assert main([*argv, *extra]) == 2
        assert capsys.readouterr().err.strip() == (
            "error: --height 1024 --width 1024: the transformer needs about 5.1 GB of activations for 4 rows "
            "at once, more than this machine's 4.0 GB"
        )
    assert list(tmp_path.iterdir()) == []


def test_vae_tiling_bounds_the_decoders_estimate_to_a_tiles(tiny_schnell, tmp_path, capsys, monkeypatch):
    """With 16 GB, 2048x2048 fits the transformer (5.5 GB) but not a whole decode (25.8 GB): refused,
    pointing at --vae-tiling; tiled, the decoder's estimate is a 1024-pixel tile's (3.2 GB)."""
    from flux1 import generation

    monkeypatch.setattr(generation, "physical_memory", lambda: 16 * 10**9)
    sizes = ["--height", "2048", "--width", "2048"]
    needs = generation.activation_bytes(2048, 2048, 512, vae_tiling=True)
    assert (round(needs["transformer"] / 1e9, 1), round(needs["VAE decoder"] / 1e9, 1)) == (5.5, 3.2)
    argv = ["--path", str(tiny_schnell), "--prompt", "x", *sizes, "--output", str(tmp_path / "o.png")]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --height 2048 --width 2048: the VAE decoder needs about 25.8 GB of activations, more than "
        "this machine's 16.0 GB (--vae-tiling decodes it a tile at a time)"
    )
    generation.check_fits(generation.Config(height=2048, width=2048, vae_tiling=True), 512)
    assert list(tmp_path.iterdir()) == []


def test_check_config_rejects_wrong_types():
    config = configs("tiny", "schnell")["vae"]
    with pytest.raises(ConfigError, match=r"vae.json: 'scaling_factor' is nan, expected a finite number"):
        check_config("vae", {**config, "scaling_factor": float("nan")}, "vae.json")


# 4. -C reproduces, or says what it cannot
def test_record_reproduces_loras_latents_and_relative_paths(tiny_schnell, tmp_path):
    lora = tmp_path / "style.safetensors"
    lora_files.write(lora, "kohya", seed=1)
    noise = tmp_path / "noise.npy"
    np.save(noise, np.random.default_rng(0).standard_normal((1, 16, 4, 6)).astype(np.float32))
    shutil.copytree(tiny_schnell, tmp_path / "m", ignore=shutil.ignore_patterns("*.gguf", "flux1-*", "ae.*"))
    args = ["--path", "m", "--prompt", "fox", "--lora-paths", str(lora), "--latents", str(noise), *SMALL]
    first = _run(*args, "--output", "a.png", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    record = read_record(tmp_path / "a.png")
    assert record["model"] == str(tmp_path / "m") and record["latents"]["path"] == str(noise)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    again = _run("-C", str(tmp_path / "a.png"), "--output", "b.png", cwd=elsewhere)
    assert again.returncode == 0, again.stderr
    a, b = (np.array(Image_open(p)) for p in (tmp_path / "a.png", elsewhere / "b.png"))
    assert np.array_equal(a, b)
    assert read_record(elsewhere / "b.png")["loras"][0]["sha256"] == record["loras"][0]["sha256"]
    lora_files.write(lora, "kohya", seed=2)  # the LoRA changes: -C refuses rather than draw another image
    changed = _run("-C", str(tmp_path / "a.png"), "--output", "c.png", cwd=elsewhere)
    assert changed.returncode == 2
    assert f"LoRA {lora} changed since the image was made (sha256 differs)" in changed.stderr
    assert not (elsewhere / "c.png").exists()


def Image_open(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


@pytest.mark.parametrize("spelling", [["--step", "1"], ["--steps=1"]])
def test_explicit_flag_wins_over_the_record_in_any_spelling(tiny_schnell, tmp_path, spelling):
    record = {"prompt": "fox", "model": str(tiny_schnell), "seed": 3, "steps": 3, "height": 32, "width": 48}
    (tmp_path / "r.json").write_text(json.dumps(record))
    assert main(["-C", str(tmp_path / "r.json"), *spelling, "--output", str(tmp_path / "o.png")]) == 0
    assert read_record(tmp_path / "o.png")["steps"] == 1


def test_quantize_short_form_wins_over_the_record(tiny_schnell, tmp_path):
    record = {"prompt": "fox", "model": str(tiny_schnell), "seed": 3, "steps": 1, "height": 32, "width": 48}
    (tmp_path / "r.json").write_text(json.dumps({**record, "quantize": 8, "group_size": 32}))
    assert main(["-C", str(tmp_path / "r.json"), "-q4", "--output", str(tmp_path / "o.png")]) == 0
    written = read_record(tmp_path / "o.png")
    assert (written["quantize"], written["group_size"]) == (4, 32)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"height": "tall"}, "-C {record}: 'height' is \"tall\", expected a whole number"),
        (
            {"loras": [{"path": 3}]},
            "-C {record}: 'loras' is {\"path\": 3}, expected a file entry with a path and a sha256",
        ),
        ({"guidance": -1}, "--guidance -1: expected a finite number >= 0"),
        ({"seed": -1}, "--seed -1: expected 0 to 2**64 - 1"),
        ({"steps": 0}, "--steps 0: expected 1 to 1000"),
    ],
)
def test_records_with_wrong_values_are_refused(tiny_schnell, tmp_path, capsys, record, message):
    base = {"prompt": "fox", "model": str(tiny_schnell), "seed": 3, "steps": 1, "height": 32, "width": 48}
    (tmp_path / "r.json").write_text(json.dumps({**base, **record}))
    message = message.replace("{record}", str(tmp_path / "r.json"))
    _refused(capsys, ["-C", str(tmp_path / "r.json"), "--output", str(tmp_path / "o.png")], message, tmp_path)


# 5. Output never lost or surprising
@pytest.mark.parametrize("name", ["rec.json", "x.jpg", "noext"])
def test_output_must_be_a_png_name(tiny_schnell, tmp_path, capsys, name):
    argv = [
        "--path",
        str(tiny_schnell),
        "--prompt",
        "x",
        *SMALL,
        "--metadata",
        "--output",
        str(tmp_path / name),
    ]
    message = f"--output {tmp_path / name}: flux1 writes PNG images; give a name ending in .png"
    _refused(capsys, argv, message, tmp_path)


def test_output_folder_sidecar_and_permissions(tiny_schnell, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "image.json").write_text("{}")  # someone's sidecar: its name is taken with --metadata
    old = os.umask(0o022)
    try:
        argv = ["--path", str(tiny_schnell), "--prompt", "x", *SMALL, "--seed", "1", "--metadata"]
        assert main([*argv, "--output", f"{folder}/"]) == 0
    finally:
        os.umask(old)
    assert (folder / "image.json").read_text() == "{}"
    assert sorted(p.name for p in folder.iterdir()) == ["image.json", "image_1.json", "image_1.png"]
    assert (folder / "image_1.png").stat().st_mode & 0o777 == 0o644


def test_killed_save_leaves_nothing_that_loads_and_is_cleaned(tiny_schnell, tmp_path):
    out = tmp_path / "saved"
    process = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "save.py"), "--source", str(tiny_schnell), "--path", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while (
        not list(tmp_path.glob(".saved.partial-*")) and process.poll() is None and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert not out.exists()
    partials = list(tmp_path.glob(".saved.partial-*"))
    assert partials  # killed mid-save: the hidden folder is left, and holds no model_index.json
    assert not (partials[0] / "model_index.json").exists()
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "save.py"), "--source", str(tiny_schnell), "--path", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert not list(tmp_path.glob(".saved.partial-*"))  # the next save cleaned the abandoned one
    assert out.stat().st_mode & 0o777 == 0o777 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# 6. LoRA reports that do not lie
@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({}, "holds no tensors, so it changes nothing"),
        (
            {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": np.ones((4, 64), np.float32)},
            "'lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight': a down matrix without its up matrix changes nothing",
        ),
        (
            {
                "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": np.ones((0, 64), np.float32),
                "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": np.ones((64, 0), np.float32),
            },
            "'lora_unet_double_blocks_0_img_attn_proj.lora_down.weight': rank 0 (down [0, 64]) changes nothing",
        ),
    ],
)
def test_a_lora_that_changes_nothing_is_an_error(tiny_schnell, tmp_path, tensors, message):
    from safetensors.numpy import save_file

    file = tmp_path / "lora.safetensors"
    save_file(tensors, str(file))
    with pytest.raises(ValueError) as refused:
        flux = Flux1.from_path(tiny_schnell, lora_paths=[file])
        flux.load("transformer")
    assert str(refused.value) == f"{file}: {message}"


# 7. No tracebacks
def test_long_output_name_is_one_line(tiny_schnell, tmp_path):
    result = _run(
        "--path", str(tiny_schnell), "--prompt", "x", *SMALL, "--output", str(tmp_path / ("a" * 300 + ".png"))
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.startswith("error: ")


def test_ctrl_c_exits_130_with_one_line(tiny_schnell, tmp_path):
    process = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "main.py"), "--path", str(tiny_schnell), "--prompt", "x"]
        + ["--height", "512", "--width", "512", "--steps", "1000", "--output", str(tmp_path / "o.png")],
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(8)  # loading done, denoising under way (1000 steps take far longer)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130
    assert err.strip().splitlines()[-1] == "interrupted: nothing was written"
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
