"""save.py and quantized models: saved twins are exact, saving is atomic, bad input is refused."""

import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from flux1 import Config, Flux1
from flux1.cli import save as save_cli
from flux1.cli.generate import main as generate_main
from flux1.loaders.transformer import load_transformer
from flux1.model_files import ModelFilesError
from flux1.quantize import quantize_linears
from flux1.weights import saved

CONFIG = Config(num_inference_steps=2, height=32, width=48)


@pytest.fixture(scope="module")
def saved_q4(tiny_schnell, tmp_path_factory):
    out = tmp_path_factory.mktemp("saves") / "schnell-q4"
    assert (
        save_cli.main(["--source", str(tiny_schnell), "--path", str(out), "-q", "4", "--group-size", "32"])
        == 0
    )
    return out


def test_saved_twin_gives_bit_identical_images(tiny_schnell, saved_q4):
    runtime = Flux1.from_path(tiny_schnell, quantize=4, group_size=32).generate_image(
        3, "a fox", CONFIG, progress=False
    )
    reloaded = Flux1.from_path(saved_q4).generate_image(3, "a fox", CONFIG, progress=False)
    assert np.array_equal(runtime.pixels, reloaded.pixels)
    assert runtime.record["quantize"] == reloaded.record["quantize"] == 4
    dense = Flux1.from_path(tiny_schnell).generate_image(3, "a fox", CONFIG, progress=False)
    assert not np.array_equal(dense.pixels, runtime.pixels)  # quantization did something


def test_saved_folder_is_self_describing(saved_q4):
    layers = saved.saved_quantization(saved_q4 / "transformer")
    assert layers["double_blocks.0.img_attn.qkv"] == [4, 32] and saved.bits_of(layers) == 4
    assert saved.saved_quantization(saved_q4 / "vae") == {}
    model = load_transformer(saved_q4 / "transformer")
    assert model.double_blocks[0].img_attn.qkv.bits == 4
    assert model.double_blocks[0].img_attn.qkv.weight.dtype == mx.uint32


def test_quantizing_while_loading_equals_quantizing_after_loading(tiny_schnell):
    streamed = load_transformer(tiny_schnell / "transformer")  # lazy: each layer read, quantized, freed
    quantize_linears(streamed, 4, 32)
    eager = load_transformer(tiny_schnell / "transformer")
    mx.eval(eager.parameters())  # the whole dense model in memory first
    quantize_linears(eager, 4, 32)
    ours, theirs = dict(tree_flatten(streamed.parameters())), dict(tree_flatten(eager.parameters()))
    assert ours.keys() == theirs.keys()
    assert all(np.array_equal(np.array(ours[k]), np.array(theirs[k])) for k in ours)


def test_other_quantization_than_saved_is_refused(saved_q4, capsys):
    assert generate_main(["--path", str(saved_q4), "--prompt", "x", "-q", "8"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: -q 8: ")
        and "was saved with 4-bit quantization; drop -q to use it as saved" in err
    )


def test_unsupported_bits_are_refused(tiny_schnell, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        save_cli.main(["--source", str(tiny_schnell), "--path", str(tmp_path / "o"), "-q", "7"])
    assert exit_info.value.code == 2
    assert "argument --quantize/-q: invalid choice: 7 (choose from 3, 4, 5, 6, 8)" in capsys.readouterr().err


def test_existing_non_empty_output_is_refused(tiny_schnell, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert save_cli.main(["--source", str(tiny_schnell), "--path", str(tmp_path / "out")]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"error: --path {tmp_path / 'out'}: exists and is not an empty folder"
    )
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_interrupted_save_leaves_nothing_that_loads(tiny_schnell, tmp_path, monkeypatch):
    calls = []

    def failing_save(model, folder):
        calls.append(folder.name)
        if folder.name == "transformer":
            raise OSError("disk full")
        original(model, folder)

    original = saved.save_component
    monkeypatch.setattr(saved, "save_component", failing_save)
    assert save_cli.main(["--source", str(tiny_schnell), "--path", str(tmp_path / "out")]) == 2
    assert calls[-1] == "transformer"
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its hidden partial twin


def test_half_written_folder_is_refused(saved_q4, tmp_path):
    partial = shutil.copytree(saved_q4, tmp_path / "partial")
    (partial / "model_index.json").unlink()
    with pytest.raises(ModelFilesError, match="no model_index.json, so not a complete model folder"):
        Flux1.from_path(partial)
