"""--stepwise-image-output-dir: a preview of each step's predicted clean latents and a strip of them;
the VAE preview of the last step is the final image; bad folders are refused before any work."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flux1.cli.generate import main
from flux1.sheet import LINE_HEIGHT

SMALL = ["--height", "32", "--width", "48", "--steps", "3", "--seed", "5"]
LABEL_HEIGHT = 6 + 2 * LINE_HEIGHT  # two title lines under each tile
STEPS = ["step_01_of_03.png", "step_02_of_03.png", "step_03_of_03.png"]


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def _generate(tiny, tmp_path, *args) -> int:
    return main(["--path", str(tiny), "--prompt", "a fox", "--output", str(tmp_path / "out.png"), *args])


def test_vae_previews_end_with_the_final_image(tiny_schnell, tmp_path, capsys):
    steps = tmp_path / "steps"
    assert _generate(tiny_schnell, tmp_path, *SMALL, "--stepwise-image-output-dir", str(steps)) == 0
    assert sorted(p.name for p in steps.iterdir()) == ["composite.png", *STEPS]
    for name in STEPS:
        assert _pixels(steps / name).shape == (32, 48, 3)
    # At the last step sigma_next = 0: x0 = x - 0 * v is the final latents, decoded by the same VAE.
    assert np.array_equal(_pixels(steps / STEPS[-1]), _pixels(tmp_path / "out.png"))
    assert not np.array_equal(_pixels(steps / STEPS[0]), _pixels(tmp_path / "out.png"))
    strip = _pixels(steps / "composite.png")
    cell = strip.shape[1] // 3
    assert strip.shape[0] == 32 + LABEL_HEIGHT and strip.shape[1] == 3 * cell and cell >= 48
    left = (cell - 48) // 2
    assert np.array_equal(strip[:32, 2 * cell + left : 2 * cell + left + 48], _pixels(steps / STEPS[-1]))
    assert f"step previews (vae) in {steps}, strip composite.png" in capsys.readouterr().out


def test_latent_previews_of_a_batch_one_folder_per_image(tiny_schnell, tmp_path):
    steps = tmp_path / "steps"
    args = [*SMALL[:-2], "--seed", "5", "6", "--batch-size", "2"]
    args += ["--stepwise-image-output-dir", str(steps), "--preview", "latent"]
    assert _generate(tiny_schnell, tmp_path, *args) == 0
    assert sorted(p.name for p in steps.iterdir()) == ["out_seed_5", "out_seed_6"]
    for folder in steps.iterdir():
        assert sorted(p.name for p in folder.iterdir()) == ["composite.png", *STEPS]
        assert _pixels(folder / STEPS[0]).shape == (4, 6, 3)
        assert _pixels(folder / "composite.png").shape[0] == 32 + LABEL_HEIGHT  # scaled up 8x
    assert not np.array_equal(
        _pixels(steps / "out_seed_5" / STEPS[-1]), _pixels(steps / "out_seed_6" / STEPS[-1])
    )


def test_bad_preview_folders_are_refused_before_any_work(tiny_schnell, unwritable_folder, tmp_path, capsys):
    locked = unwritable_folder
    full = tmp_path / "full"
    full.mkdir()
    (full / "step_01_of_04.png").write_bytes(b"keep me")
    out = tmp_path / "out"
    out.mkdir()
    cases = [
        (
            ["--stepwise-image-output-dir", str(locked / "steps")],
            f"--stepwise-image-output-dir {locked / 'steps'}: cannot write in {locked} (Permission denied)",
        ),
        (
            ["--stepwise-image-output-dir", str(full)],
            f"--stepwise-image-output-dir {full}: not empty (step images are never overwritten); "
            "give a new or empty folder",
        ),
        (
            ["--stepwise-image-output-dir", str(tmp_path / "no" / "steps")],
            f"--stepwise-image-output-dir {tmp_path / 'no' / 'steps'}: folder {tmp_path / 'no'} does not exist",
        ),
        (["--preview", "latent"], "--preview latent: needs --stepwise-image-output-dir"),
    ]
    for args, message in cases:
        assert _generate(tiny_schnell, out, *SMALL, *args) == 2
        assert capsys.readouterr().err.strip() == f"error: {message}"
    assert list(out.iterdir()) == [] and [p.name for p in full.iterdir()] == ["step_01_of_04.png"]
    with pytest.raises(SystemExit):
        main(["--preview", "fast"])
