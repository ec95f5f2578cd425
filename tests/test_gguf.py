"""GGUF transformers: every supported type loads to exactly gguf-py's values (or, for the K-types
without an exact MLX form, within their documented re-quantization error), and computes what the
reference transformer computes with those values."""

import gguf
import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from gguf import GGMLQuantizationType as T
from tests.conftest import relative_error
from tests.test_transformer import _inputs, _ours

from flux1.convert.transformer_diffusers import to_diffusers
from flux1.fixtures.gguf import write_gguf
from flux1.fixtures.presets import configs
from flux1.gguf.blocks import EXACT, REQUANTIZED
from flux1.loaders.gguf import load_transformer_gguf
from flux1.nn.linear import Linear
from flux1.weights.safetensors_io import WeightFileError

TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K", "F16", "BF16"]
# Re-quantization error bounds of the K-types without an exact MLX form (measured ~5e-3 and ~1e-2).
REQUANTIZATION_BOUND = {T.Q6_K: 1e-2, T.Q3_K: 3e-2, T.Q2_K: 3e-2}


@pytest.fixture(scope="module")
def gguf_files(tiny_schnell, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    files = {}
    for qtype in TYPES:
        files[qtype] = folder / f"flux1-schnell-{qtype}.gguf"
        write_gguf(tiny_schnell / "transformer", files[qtype], qtype)
    return files


def _loaded_values(model) -> dict[str, np.ndarray]:
    values = {}
    for path, layer in model.named_modules():
        if isinstance(layer, Linear):
            values[f"{path}.weight"] = np.array(layer.dense_weight(mx.float32))
    return values


@pytest.mark.parametrize("qtype", TYPES)
def test_loaded_weights_equal_gguf_dequantize(gguf_files, qtype):
    model = load_transformer_gguf(gguf_files[qtype])
    ours = _loaded_values(model)
    quantized_layers = 0
    for tensor in gguf.GGUFReader(gguf_files[qtype]).tensors:
        if not tensor.name.endswith(".weight") or tensor.name not in ours:
            continue
        expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(ours[tensor.name].shape)
        if tensor.tensor_type in REQUANTIZED:
            assert relative_error(ours[tensor.name], expected) < REQUANTIZATION_BOUND[tensor.tensor_type]
        else:
            assert np.array_equal(ours[tensor.name], expected), tensor.name
        quantized_layers += tensor.tensor_type in EXACT or tensor.tensor_type in REQUANTIZED
    assert quantized_layers > 0 or qtype in ("F16", "BF16")
    if T[qtype] in EXACT:
        assert model.double_blocks[0].img_mlp[2].bits == EXACT[T[qtype]].bits  # kept quantized


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_1", "Q4_K", "Q5_K"])
def test_output_equals_reference_with_dequantized_weights(gguf_files, qtype):
    """fp32 both sides on the very same values: bound 1e-4 as for the dense transformer."""
    model = load_transformer_gguf(gguf_files[qtype])
    config = configs("tiny", "schnell")["transformer"]
    canonical = {name: a.astype(mx.float32) for name, a in _all_parameters(model).items()}
    state = {k: torch.from_numpy(np.array(v)) for k, v in to_diffusers(canonical, 64).items()}
    reference = FluxTransformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    reference.load_state_dict(state, strict=True)  # raises on any missing or unexpected key
    x = _inputs(False)
    t = {k: None if v is None else torch.from_numpy(v) for k, v in x.items()}
    with torch.no_grad():
        expected = reference(
            hidden_states=t["img"],
            encoder_hidden_states=t["txt"],
            pooled_projections=t["y"],
            timestep=t["timesteps"],
            img_ids=t["img_ids"],
            txt_ids=t["txt_ids"],
        ).sample.numpy()
    assert relative_error(_ours(model, x), expected) < 1e-4


def _all_parameters(model) -> dict[str, mx.array]:
    """Canonical dense parameters, quantized layers dequantized."""
    from mlx.utils import tree_flatten

    params = {n: p for n, p in tree_flatten(model.parameters()) if not n.endswith((".scales", ".biases"))}
    for path, layer in model.named_modules():
        if isinstance(layer, Linear):
            params[f"{path}.weight"] = layer.dense_weight(mx.float32)
    return params


def test_wrong_architecture(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    (
        writer.write_header_to_file(),
        writer.write_kv_data_to_file(),
        writer.write_tensors_to_file(),
        writer.close(),
    )
    with pytest.raises(WeightFileError, match="llama.gguf: general.architecture is 'llama', expected 'flux'"):
        load_transformer_gguf(tmp_path / "llama.gguf")


def test_truncated_file(gguf_files, tmp_path):
    data = gguf_files["Q4_0"].read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightFileError, match="cut.gguf: not a readable GGUF file, truncated or corrupt"):
        load_transformer_gguf(tmp_path / "cut.gguf")


def test_unsupported_type(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "flux")
    writer.add_tensor("img_in.weight", np.zeros((64, 64), np.float32).astype(np.float64))
    (
        writer.write_header_to_file(),
        writer.write_kv_data_to_file(),
        writer.write_tensors_to_file(),
        writer.close(),
    )
    with pytest.raises(
        WeightFileError, match=r"tensor 'img_in.weight' \(F64\): unsupported type; supported: Q8_0, Q4_0"
    ):
        load_transformer_gguf(tmp_path / "iq.gguf")


def test_missing_tensor(gguf_files, tmp_path):
    reader = gguf.GGUFReader(gguf_files["Q8_0"])
    writer = gguf.GGUFWriter(str(tmp_path / "partial.gguf"), "flux")
    for tensor in reader.tensors:
        if tensor.name != "final_layer.linear.bias":
            writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type)
    (
        writer.write_header_to_file(),
        writer.write_kv_data_to_file(),
        writer.write_tensors_to_file(),
        writer.close(),
    )
    with pytest.raises(WeightFileError, match="missing tensors: final_layer.linear.bias"):
        load_transformer_gguf(tmp_path / "partial.gguf")


def test_main_and_save_take_a_gguf_transformer(tiny_schnell, gguf_files, tmp_path):
    from flux1.cli.generate import main
    from flux1.cli.save import main as save_main
    from flux1.metadata import read_record

    common = ["--prompt", "a fox", "--height", "32", "--width", "48", "--steps", "2", "--seed", "1"]
    gguf_file = str(gguf_files["Q4_K"])
    assert (
        main(["--path", str(tiny_schnell), "--gguf", gguf_file, *common, "--output", str(tmp_path / "a.png")])
        == 0
    )
    assert read_record(tmp_path / "a.png")["gguf"] == gguf_file
    assert (
        save_main(["--source", str(tiny_schnell), "--gguf", gguf_file, "--path", str(tmp_path / "saved")])
        == 0
    )
    assert main(["--path", str(tmp_path / "saved"), *common, "--output", str(tmp_path / "b.png")]) == 0
    from PIL import Image

    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png"))
    )


def test_gguf_of_another_base_model_is_refused(tiny_schnell, tiny_dev, tmp_path):
    from flux1.model_files import ModelFilesError, resolve

    write_gguf(tiny_dev / "transformer", tmp_path / "dev.gguf", "Q8_0")
    with pytest.raises(ModelFilesError, match=r"dev.gguf is a FLUX.1-dev transformer"):
        resolve(path=tiny_schnell, gguf=tmp_path / "dev.gguf")
