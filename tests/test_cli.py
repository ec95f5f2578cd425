"""main.py as users run it: a real run on the tiny fixture, -C reproduction, the hub path offline,
and every bad input with its message."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import piexif
import piexif.helper
import pytest
from PIL import Image
from tests.hub_cache import hub_cache

from flux1.cli.generate import main
from flux1.metadata import read_record

REPO_ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--height", "32", "--width", "48", "--steps", "2"]


def _run(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "main.py"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=300,
    )


def test_generate_then_reproduce_from_metadata(tiny_dev, tmp_path):
    out = tmp_path / "fox.png"
    result = _run(
        "--path",
        str(tiny_dev),
        "--prompt",
        "a red fox",
        "--seed",
        "42",
        "--guidance",
        "5.0",
        *SMALL,
        "--output",
        str(out),
        "--metadata",
    )
    assert result.returncode == 0, result.stderr
    assert "encode" in result.stdout and "denoise" in result.stdout and "decode" in result.stdout
    record = read_record(out)
    assert {
        k: record[k] for k in ("prompt", "seed", "steps", "guidance", "height", "width", "base_model")
    } == {
        "prompt": "a red fox",
        "seed": 42,
        "steps": 2,
        "guidance": 5.0,
        "height": 32,
        "width": 48,
        "base_model": "dev",
    }
    assert json.loads((tmp_path / "fox.json").read_text()) == record
    with Image.open(out) as image:
        assert image.size == (48, 32)
        assert image.text["parameters"].startswith("a red fox\nSteps: 2, Sampler: Euler (flow matching), ")
        assert "Seed: 42" in image.text["parameters"]
        exif = piexif.load(image.info["exif"])
    assert json.loads(piexif.helper.UserComment.load(exif["Exif"][piexif.ExifIFD.UserComment])) == record

    again = _run("-C", str(out), "--output", str(tmp_path / "again.png"))
    assert again.returncode == 0, again.stderr
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "again.png")))


def test_existing_file_is_never_overwritten_and_seeds_name_files(tiny_schnell, tmp_path):
    (tmp_path / "image.png").write_bytes(b"keep me")
    assert (
        main(
            [
                "--path",
                str(tiny_schnell),
                "--prompt",
                "x",
                *SMALL,
                "--output",
                str(tmp_path / "image.png"),
                "--seed",
                "1",
            ]
        )
        == 0
    )
    assert (tmp_path / "image.png").read_bytes() == b"keep me" and (tmp_path / "image_1.png").is_file()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\n")
    assert (
        main(
            [
                "--path",
                str(tiny_schnell),
                "--prompt-file",
                str(prompts),
                *SMALL,
                "--seed",
                "3",
                "4",
                "--output",
                str(tmp_path / "pair.png"),
            ]
        )
        == 0
    )
    names = sorted(p.name for p in tmp_path.glob("pair*"))
    assert names == ["pair_1_seed_3.png", "pair_1_seed_4.png", "pair_2_seed_3.png", "pair_2_seed_4.png"]
    assert read_record(tmp_path / "pair_2_seed_4.png")["prompt"] == "a dog"


def test_vae_tiling_is_recorded_and_rerun_by_c(tiny_schnell, tmp_path):
    """96x160 pixels are 2 x 3 of the tiny VAE's 64-pixel tiles: the tiled image differs from the whole
    decode (each tile's group norms), the record says so, and -C decodes in tiles again."""
    flags = ["--path", str(tiny_schnell), "--prompt", "x", "--seed", "2", "--steps", "2"]
    flags += ["--height", "96", "--width", "160"]
    assert main([*flags, "--vae-tiling", "--output", str(tmp_path / "tiled.png")]) == 0
    assert main([*flags, "--output", str(tmp_path / "whole.png")]) == 0
    assert main(["-C", str(tmp_path / "tiled.png"), "--output", str(tmp_path / "again.png")]) == 0
    tiled, whole, again = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("tiled", "whole", "again"))
    assert np.abs(tiled.astype(int) - whole.astype(int)).max() > 8
    assert np.array_equal(tiled, again)
    assert read_record(tmp_path / "again.png")["vae_tiling"] is True
    assert read_record(tmp_path / "whole.png")["vae_tiling"] is None


def test_hub_alias_loads_from_the_cache_offline(tiny_schnell, tmp_path):
    hub_cache(tiny_schnell, tmp_path)
    out = tmp_path / "hub.png"
    result = _run(
        "--model",
        "schnell",
        "--prompt",
        "x",
        "--seed",
        "1",
        *SMALL,
        "--output",
        str(out),
        env={"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert read_record(out)["model"] == "schnell"
    missing = _run(
        "--model", "dev", "--prompt", "x", *SMALL, env={"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    )
    assert missing.returncode == 2
    assert (
        "black-forest-labs/FLUX.1-dev is not in the Hugging Face cache and cannot be downloaded"
        in missing.stderr
    )


def _bad(tiny, tmp_path, *args) -> str:
    return ["--path", str(tiny), "--prompt", "x", "--output", str(tmp_path / "o.png"), *args]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--height", "1000"],
            "--height 1000: must be a multiple of 16 from 16 to 8192 (nearest: 992 or 1008)",
        ),
        (["--width", "8"], "--width 8: must be a multiple of 16 from 16 to 8192 (nearest: 16)"),
        (["--steps", "0"], "--steps 0: expected 1 to 1000"),
        (
            ["--lora-paths", "a.safetensors", "--lora-scales", "1.0", "0.5"],
            "--lora-scales has 2 values for 1 --lora-paths",
        ),
    ],
)
def test_bad_input_is_refused_with_its_message(tiny_schnell, tmp_path, capsys, args, message):
    assert main(_bad(tiny_schnell, tmp_path, *args)) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
    assert list(tmp_path.iterdir()) == []


def test_more_bad_input(tiny_schnell, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    cases = [
        (
            ["--path", str(tiny_schnell), "--prompt-file", str(empty)],
            f"--prompt-file {empty}: no prompts (one per line expected)",
        ),
        (
            ["--model", "turbo", "--prompt", "x"],
            "unknown --model 'turbo': expected schnell, dev, fill, kontext, canny, depth (or a Hugging Face repo id)",
        ),
        (
            _bad(tiny_schnell, tmp_path / "missing"),
            f"--output {tmp_path / 'missing' / 'o.png'}: folder {tmp_path / 'missing'} does not exist",
        ),
    ]
    latents = tmp_path / "noise.npy"
    np.save(latents, np.zeros((1, 16, 4, 4), np.float32))
    cases.append(
        (
            _bad(tiny_schnell, tmp_path, "--height", "32", "--width", "48", "--latents", str(latents)),
            f"--latents {latents}: shape (1, 16, 4, 4), expected (1, 16, 4, 6) for 48x32 (1, 16, H/8, W/8)",
        )
    )
    for args, message in cases:
        assert main(args) == 2
        assert capsys.readouterr().err.strip() == f"error: {message}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "noise.npy"]


def test_unwritable_output_is_refused_before_any_work(tiny_schnell, unwritable_folder, capsys):
    locked = unwritable_folder
    assert main(_bad(tiny_schnell, locked, *SMALL)) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"error: --output {locked / 'o.png'}: cannot write in {locked} (Permission denied)"
    )
