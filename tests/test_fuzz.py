"""Fuzzing (Hypothesis, bounded): mutated safetensors headers, index files, GGUF headers, configs and
generation records either load or are refused with flux1's own error (a ValueError naming the
file), never another exception."""

import json
import os
import struct

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flux1.cli.generate import main
from flux1.configs import check_config
from flux1.fixtures.presets import configs
from flux1.model_files import resolve
from flux1.models.transformer import FluxTransformer
from flux1.weights.safetensors_io import WeightFileError, read_file, read_folder

# 25 examples a test in CI (under a minute in all); FLUX1_FUZZ=deep runs 500.
settings.register_profile("ci", max_examples=25)
settings.register_profile("deep", max_examples=500)
settings.load_profile(os.environ.get("FLUX1_FUZZ", "ci"))
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def safetensors_bytes(tmp_path_factory) -> bytes:
    file = tmp_path_factory.mktemp("fuzz") / "a.safetensors"
    mx.save_safetensors(str(file), {"w": mx.ones((3, 4)), "b": mx.arange(5).astype(mx.float16)})
    return file.read_bytes()


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    mutable = bytearray(data)
    for position, value in edits:
        mutable[position % len(mutable)] = value
    return bytes(mutable[:cut] if cut is not None else mutable)


@FUZZ
@given(
    edits=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
    cut=st.none() | st.integers(0, 300),
)
def test_mutated_safetensors(tmp_path, safetensors_bytes, edits, cut):
    file = tmp_path / "m.safetensors"
    file.write_bytes(_mutate(safetensors_bytes, edits, cut))
    try:
        tensors = read_file(file)
        mx.eval(list(tensors.arrays.values()))
    except WeightFileError as e:
        assert str(e).startswith(str(file))


@FUZZ
@given(index=JSON)
def test_arbitrary_index_files(tmp_path, safetensors_bytes, index):
    folder = tmp_path / "component"
    folder.mkdir(exist_ok=True)
    (folder / "model-1.safetensors").write_bytes(safetensors_bytes)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    try:
        read_folder(folder, "model")
    except WeightFileError as e:
        assert str(folder) in str(e)


@FUZZ
@given(weight_map=st.dictionaries(st.sampled_from(["w", "b", "x"]), st.text(max_size=30), max_size=3))
def test_index_weight_maps(tmp_path, safetensors_bytes, weight_map):
    folder = tmp_path / "component"
    folder.mkdir(exist_ok=True)
    (folder / "model-1.safetensors").write_bytes(safetensors_bytes)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    try:
        read_folder(folder, "model")
    except WeightFileError as e:
        assert str(folder) in str(e)


@pytest.fixture(scope="module")
def gguf_bytes(tiny_schnell, tmp_path_factory) -> bytes:
    from flux1.fixtures.gguf import write_gguf

    file = tmp_path_factory.mktemp("fuzz-gguf") / "t.gguf"
    write_gguf(tiny_schnell / "transformer", file, "Q8_0")
    return file.read_bytes()


@FUZZ
@given(
    edits=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.none() | st.integers(0, 5000),
)
def test_mutated_gguf_headers(tmp_path, tiny_schnell, gguf_bytes, edits, cut):
    file = tmp_path / "m.gguf"
    file.write_bytes(_mutate(gguf_bytes, edits, cut))
    try:
        resolve(path=tiny_schnell, gguf=file)
    except ValueError as e:
        assert str(file) in str(e)


TRANSFORMER = configs("tiny", "schnell")["transformer"]


@FUZZ
@given(key=st.sampled_from(sorted(TRANSFORMER) + ["axes_dims_rope"]), value=JSON)
def test_transformer_configs(key, value):
    config = {**TRANSFORMER, key: value}
    try:
        check_config("transformer", config, "config.json")
    except ValueError as e:
        assert str(e).startswith("config.json: ")
        return
    FluxTransformer(config)  # what passes the check builds (bounded by the FLUX.1 family)


@FUZZ
@given(
    record=st.fixed_dictionaries(
        {},
        optional={
            key: JSON
            for key in ("prompt", "seed", "steps", "height", "width", "guidance", "quantize", "group_size")
            + ("max_sequence_length", "loras", "latents", "precision", "base_model", "model", "gguf")
        },
    )
)
def test_generation_records(tmp_path, capsys, record):
    file = tmp_path / "record.json"
    file.write_text(json.dumps({"model": str(tmp_path / "no-such-model"), **record}))
    # Every value is checked before any model is looked up; the run then ends at the missing model.
    assert main(["-C", str(file), "--output", str(tmp_path / "o.png")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "o.png").exists()


def test_record_with_a_png_that_is_not_one(tmp_path, capsys):
    file = tmp_path / "r.png"
    file.write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + np.random.default_rng(0).bytes(40))
    assert main(["-C", str(file), "--output", str(tmp_path / "o.png")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --config-from-metadata {file}: ")
