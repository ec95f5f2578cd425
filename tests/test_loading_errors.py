"""Damaged or mismatched weight files give errors that name the file and the tensor."""

import json
import shutil

import mlx.core as mx
import pytest

from flux1.fixtures import transformer as transformer_fixture
from flux1.fixtures.presets import configs
from flux1.loaders.transformer import load_transformer
from flux1.weights.safetensors_io import WeightFileError


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pristine") / "transformer"
    transformer_fixture.write(folder, configs("tiny", "schnell")["transformer"], "float32", seed=0)
    return folder


@pytest.fixture
def folder(pristine, tmp_path):
    return shutil.copytree(pristine, tmp_path / "transformer")


def _shard(folder, k: int = 1):
    return folder / f"diffusion_pytorch_model-0000{k}-of-00003.safetensors"


def test_missing_folder(tmp_path):
    with pytest.raises(WeightFileError, match=f"{tmp_path / 'nothing'}: file not found"):
        load_transformer(tmp_path / "nothing")


def test_shard_named_in_index_is_missing(folder):
    _shard(folder, 2).unlink()
    with pytest.raises(
        WeightFileError,
        match="names shard diffusion_pytorch_model-00002-of-00003.safetensors, which is missing",
    ):
        load_transformer(folder)


def test_truncated_file(folder):
    shard = _shard(folder, 3)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(
        WeightFileError,
        match=r"00003-of-00003.safetensors: truncated: tensor '[^']+' ends at byte \d+, file has \d+",
    ):
        load_transformer(folder)


def test_corrupt_header(folder):
    shard = _shard(folder, 1)
    data = bytearray(shard.read_bytes())
    data[8:20] = b"not json at "
    shard.write_bytes(bytes(data))
    with pytest.raises(
        WeightFileError,
        match=r"00001-of-00003.safetensors: not a safetensors file \(its header is not JSON\)",
    ):
        load_transformer(folder)


def test_not_a_safetensors_file(tmp_path):
    (tmp_path / "flux1-schnell.safetensors").write_bytes(b"abc")
    with pytest.raises(
        WeightFileError, match="flux1-schnell.safetensors: not a safetensors file \\(3 bytes, no header\\)"
    ):
        load_transformer(tmp_path / "flux1-schnell.safetensors")


def test_shape_disagrees_with_config(folder):
    config = json.loads((folder / "config.json").read_text())
    config["joint_attention_dim"] = 52
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        WeightFileError,
        match=r"safetensors: tensor 'context_embedder.weight' has shape \[64, 48\], "
        r"but the transformer \(.*\) config expects \[64, 52\] for 'txt_in.weight'",
    ):
        load_transformer(folder)


def test_keys_that_belong_to_no_layer(tmp_path, pristine):
    tensors = dict(mx.load(str(_shard(pristine, 1))))
    tensors["transformer_blocks.0.attn.to_q.lora_A.weight"] = mx.zeros((4, 64))
    file = tmp_path / "flux1-schnell.safetensors"
    for k in (2, 3):
        tensors.update(mx.load(str(_shard(pristine, k))))
    mx.save_safetensors(str(file), tensors)
    with pytest.raises(
        WeightFileError,
        match=r"tensors that belong to no layer: .*flux1-schnell.safetensors: tensor "
        r"'transformer_blocks.0.attn.to_q.lora_A.weight'",
    ):
        load_transformer(file, configs("tiny", "schnell")["transformer"])


def test_missing_tensor(folder):
    index_file = folder / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    del index["weight_map"]["proj_out.bias"]
    index_file.write_text(json.dumps(index))
    tensors = dict(mx.load(str(folder / index["weight_map"]["proj_out.weight"])))
    del tensors["proj_out.bias"]
    mx.save_safetensors(str(folder / index["weight_map"]["proj_out.weight"]), tensors)
    with pytest.raises(WeightFileError, match="missing tensors: final_layer.linear.bias"):
        load_transformer(folder)


def test_folder_missing_a_component(tiny_schnell, tmp_path):
    from flux1.model_files import ModelFilesError, resolve

    partial = shutil.copytree(
        tiny_schnell, tmp_path / "model", ignore=shutil.ignore_patterns("text_encoder_2")
    )
    with pytest.raises(
        ModelFilesError,
        match=r"model: missing component folder\(s\) text_encoder_2/ \(expected the diffusers layout",
    ):
        resolve(path=partial)
