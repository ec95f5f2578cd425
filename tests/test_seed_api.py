"""The seed README's Python snippet (mflux's), pasted as its users paste it, runs unchanged on flux1:
a subprocess, the model from a Hugging Face cache under the real repo id, offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tests import lora_files
from tests.hub_cache import hub_cache

from flux1.metadata import read_record

SRC = Path(__file__).resolve().parent.parent / "src"

# Verbatim from the seed README (001), indentation and comments included.
SNIPPET = """\
import sys

sys.path.append("/path/to/mflux/src")

from flux_1.config.config import Config
from flux_1.flux import Flux1

# Load the model
flux = Flux1.from_alias(alias="schnell")  # "schnell" or "dev"

# Generate an image
image = flux.generate_image(
   seed=2,
   prompt="Luxury food photograph",
   config=Config(
      num_inference_steps=2,  # "schnell" works well with 2-4 steps, "dev" works well with 20-25 steps
      height=1024,
      width=1024,
   )
)

image.save(path="image.png")
"""


def _python(code: str, home: Path, cwd: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH: this checkout's flux1 before any installed copy (the snippet appends its path last).
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SRC)}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


def test_the_seed_snippet_runs_verbatim(tiny_schnell, tmp_path):
    home = hub_cache(tiny_schnell, tmp_path / "home")
    work = tmp_path / "work"
    work.mkdir()
    # The one change: the placeholder path becomes this checkout's src (the 1024x1024 size stays).
    result = _python(SNIPPET.replace("/path/to/mflux/src", str(SRC)), home, work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in work.iterdir()) == ["image.png"]
    record = read_record(work / "image.png")
    assert {k: record[k] for k in ("model", "seed", "prompt", "steps", "height", "width")} == {
        "model": "schnell",
        "seed": 2,
        "prompt": "Luxury food photograph",
        "steps": 2,
        "height": 1024,
        "width": 1024,
    }
    with Image.open(work / "image.png") as image:
        assert image.size == (1024, 1024)


def test_mflux_keywords_give_flux1s_image(tiny_schnell, tmp_path):
    """from_alias(quantize=, lora_paths=, lora_scales=) and save(export_json_metadata=True) mean what
    flux1's own names mean: the same pixels and record as from_name(...) + save(export_json=True)."""
    home = hub_cache(tiny_schnell, tmp_path / "home")
    lora = tmp_path / "style.safetensors"
    lora_files.write(lora, "kohya")
    common = "from flux1 import Config\nconfig = Config(num_inference_steps=1, height=32, width=48)\n"
    mflux = (
        "from flux_1.flux import Flux1\n"
        + common
        + f"flux = Flux1.from_alias(alias='schnell', quantize=8, lora_paths=[{str(lora)!r}], lora_scales=[0.5])\n"
        + "flux.generate_image(seed=3, prompt='a fox', config=config).save(path='m.png', export_json_metadata=True)\n"
    )
    ours = (
        "from flux1 import Flux1\n"
        + common
        + f"flux = Flux1.from_name('schnell', quantize=8, lora_paths=[{str(lora)!r}], lora_scales=[0.5])\n"
        + "flux.generate_image(3, 'a fox', config).save('f.png', export_json=True)\n"
    )
    for code in (mflux, ours):
        result = _python(code, home, tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "m.png")), np.asarray(Image.open(tmp_path / "f.png"))
    )
    record = json.loads((tmp_path / "m.json").read_text())
    assert record == read_record(tmp_path / "m.png")
    assert (record["quantize"], record["group_size"]) == (8, 64)
    assert [(lora["name"], lora["scale"]) for lora in record["loras"]] == [("style.safetensors", 0.5)]
