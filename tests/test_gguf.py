"""GGUF transformers: every supported type is decoded from its bytes to exactly gguf-py's values; the
CPU kernels hold the file's blocks (exact for every type), MLX's kernels the MLX affine form (exact
for the 32-value types, within the documented re-quantization error for Q6_K, Q3_K and Q2_K); both
compute what the reference transformer computes with those values."""

import gguf
import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from gguf import GGMLQuantizationType as T
from tests.conftest import relative_error
from tests.test_transformer import _inputs, _ours, reference_velocity

from flux1 import backend
from flux1.convert.transformer_diffusers import to_diffusers
from flux1.fixtures.gguf import K_QUANTS, random_k_blocks, write_gguf
from flux1.fixtures.presets import configs
from flux1.gguf.affine import REQUANTIZED, mlx_form, pack_codes, to_mlx_affine
from flux1.gguf.blocks import LAYOUTS, Q4_K_PAIRED, SUPPORTED, block_size, decode, to_cpu_form
from flux1.gguf.expand import expanded
from flux1.loaders.gguf import load_transformer_gguf
from flux1.nn.cpu_expansion import expanded_weight
from flux1.nn.linear import Linear, LowRankAdapter
from flux1.weights.safetensors_io import WeightFileError

FILE_TYPES = [t for t in LAYOUTS if t in SUPPORTED]  # the quantized types of files
TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K", "F16", "BF16"]
# Re-quantization error bounds of the K-types without an exact MLX form (measured ~5e-3 and ~1e-2).
REQUANTIZATION_BOUND = {T.Q6_K: 1e-2, T.Q3_K: 3e-2, T.Q2_K: 3e-2}
# Byte offsets of each type's f16 scales inside a block.
F16_SCALES = {T.Q8_0: (0,), T.Q4_0: (0,), T.Q5_0: (0,), T.Q4_1: (0, 2), T.Q5_1: (0, 2)} | {
    qtype: offsets for qtype, (offsets, _) in K_QUANTS.items()
}


def random_blocks(qtype: T, count: int, seed: int = 0) -> np.ndarray:
    """Random bytes with finite f16 scales of every kind: zero, subnormal, negative, 1e-6 to 1e2."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (count, block_size(qtype)[1]), dtype=np.uint8)
    for offset in F16_SCALES[qtype]:
        d = rng.standard_normal(count) * rng.choice([1e-6, 1e-3, 1.0, 100.0], count)
        d[:8], d[8:16] = 0.0, 6e-8 * rng.integers(1, 100, 8)  # zero and f16 subnormals
        blocks[:, offset : offset + 2] = d.astype(np.float16).view(np.uint8).reshape(count, 2)
    return blocks


def held_for_cpu(rows: np.ndarray, qtype: T) -> tuple[np.ndarray, T | str]:
    """(a copy of rows as the CPU kernels hold them, its type)."""
    held = rows.copy()
    return held, to_cpu_form(held, qtype)


@pytest.mark.parametrize("qtype", FILE_TYPES, ids=lambda t: t.name)
def test_blocks_decode_to_gguf_values_bit_for_bit(qtype):
    """The file's blocks and the form the CPU kernels hold them in (Q4_K's re-laid) alike."""
    blocks = random_blocks(qtype, 3000)
    codes, scales, offsets = decode(blocks, qtype)
    assert codes.dtype == np.uint8 and codes.max() < 2 ** LAYOUTS[qtype].bits
    assert scales.shape == offsets.shape == (3000, block_size(qtype)[0] // LAYOUTS[qtype].group)
    rows = blocks.reshape(60, -1)  # 50 blocks a row
    expected = gguf.quants.dequantize(rows, qtype)
    assert np.array_equal(expanded(rows, qtype, expected.shape[1]), expected)
    held, held_type = held_for_cpu(rows, qtype)
    assert held.shape == rows.shape and block_size(held_type) == block_size(qtype)
    assert np.array_equal(expanded(held, held_type, expected.shape[1]), expected)


def test_q4_k_is_held_with_its_codes_packed_as_mlx_packs_4_bit_codes():
    blocks = random_blocks(T.Q4_K, 600)
    held, held_type = held_for_cpu(blocks.reshape(20, -1), T.Q4_K)
    codes = decode(blocks, T.Q4_K)[0]
    assert held_type == Q4_K_PAIRED and held.dtype == np.uint8
    held = held.reshape(600, 144)
    assert np.array_equal(held[:, :16], blocks[:, :16])  # d, dmin and the sub-block scales as they are
    assert np.array_equal(held[:, 16:].view(np.uint32), pack_codes(codes, 4))


def test_a_q4_k_layer_is_re_laid_in_place_at_its_first_expansion():
    rows = random_blocks(T.Q4_K, 600).reshape(20, -1)
    layer = Linear(30 * 256, 20, bias=False)
    layer.set_gguf(mx.array(rows)[:, ::-1][:, ::-1], T.Q4_K)  # not contiguous: copied first
    before = layer.dense_weight()
    assert layer.gguf_type == T.Q4_K  # dense_weight reads the blocks as they are
    expanded_weight(layer)
    assert layer.gguf_type == Q4_K_PAIRED and np.array_equal(
        np.array(layer.weight), held_for_cpu(rows, T.Q4_K)[0]
    )
    assert np.array_equal(np.array(layer.dense_weight()), np.array(before))
    expanded_weight(layer)  # once only
    assert np.array_equal(np.array(layer.weight), held_for_cpu(rows, T.Q4_K)[0])


def test_re_laying_refuses_blocks_it_cannot_write_in_place():
    rows = random_blocks(T.Q4_K, 60).reshape(6, -1)
    rows.flags.writeable = False
    with pytest.raises(
        ValueError, match="^Q4_K blocks are re-laid in place: they must be writable, C-contiguous rows$"
    ):
        to_cpu_form(rows, T.Q4_K)
    assert to_cpu_form(rows, T.Q8_0) == T.Q8_0  # nothing to re-lay


@pytest.mark.parametrize("qtype", [t for t in FILE_TYPES if t not in REQUANTIZED], ids=lambda t: t.name)
def test_mlx_affine_form_is_exact_for_32_value_groups(qtype):
    rows = random_blocks(qtype, 2000).reshape(40, -1)
    expected = gguf.quants.dequantize(rows, qtype)
    for blocks, form in ((rows, qtype), held_for_cpu(rows, qtype)):  # the file's, the CPU kernels'
        codes, scales, biases, bits, group = to_mlx_affine(blocks, form, expected.shape[1])
        assert (bits, group) == (LAYOUTS[qtype].bits, 32) and scales.dtype == mx.float32
        values = mx.dequantize(codes, scales, biases, group_size=group, bits=bits)
        assert np.array_equal(np.array(values), expected)


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


@pytest.mark.parametrize("compute", ["auto", "mlx"])
@pytest.mark.parametrize("qtype", TYPES)
def test_loaded_weights_equal_gguf_dequantize(gguf_files, qtype, compute):
    """CPU kernels: the file's blocks, every type exact. MLX's kernels: MLX affine, exact but for the
    re-quantized types."""
    with backend.use(compute):
        model = load_transformer_gguf(gguf_files[qtype])
        ours = _loaded_values(model)
    quantized_layers = 0
    for tensor in gguf.GGUFReader(gguf_files[qtype]).tensors:
        if not tensor.name.endswith(".weight") or tensor.name not in ours:
            continue
        expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(ours[tensor.name].shape)
        if compute == "mlx" and tensor.tensor_type in REQUANTIZED:
            assert relative_error(ours[tensor.name], expected) < REQUANTIZATION_BOUND[tensor.tensor_type]
        else:
            assert np.array_equal(ours[tensor.name], expected), tensor.name
        quantized_layers += tensor.tensor_type in LAYOUTS
    assert quantized_layers > 0 or qtype in ("F16", "BF16")
    if T[qtype] in LAYOUTS:
        layer = model.double_blocks[0].img_mlp[2]
        if compute == "auto":  # the file's bytes, as they are
            tensor = next(
                t
                for t in gguf.GGUFReader(gguf_files[qtype]).tensors
                if t.name == "double_blocks.0.img_mlp.2.weight"
            )
            assert layer.gguf_type == T[qtype] and layer.weight.nbytes == tensor.n_bytes
        else:
            assert (layer.bits, layer.group_size) == mlx_form(T[qtype]) and layer.gguf_type is None


@pytest.mark.parametrize(
    "qtype, compute",
    [(t, "auto") for t in ("Q8_0", "Q4_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K")]
    + [("Q4_K", "mlx"), ("Q5_1", "mlx")],
)
def test_output_equals_reference_with_dequantized_weights(gguf_files, qtype, compute):
    """fp32 both sides on the very same values: bound 1e-4 as for the dense transformer."""
    with backend.use(compute):
        model = load_transformer_gguf(gguf_files[qtype])
        config = configs("tiny", "schnell")["transformer"]
        canonical = {name: a.astype(mx.float32) for name, a in _all_parameters(model).items()}
        ours = _ours(model, _inputs(False))
    state = {k: torch.from_numpy(np.array(v)) for k, v in to_diffusers(canonical, 64).items()}
    reference = FluxTransformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    reference.load_state_dict(state, strict=True)  # raises on any missing or unexpected key
    x = _inputs(False)
    expected = reference_velocity(reference, x)
    assert relative_error(ours, expected) < 1e-4


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


def test_quantized_tensor_that_is_not_a_weight_is_refused(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "bias.gguf"), "flux")
    raw = gguf.quants.quantize(np.ones((1, 64), np.float32), T.Q8_0)
    writer.add_tensor("img_in.bias", raw.reshape(-1), raw_dtype=T.Q8_0)
    (
        writer.write_header_to_file(),
        writer.write_kv_data_to_file(),
        writer.write_tensors_to_file(),
        writer.close(),
    )
    with pytest.raises(
        WeightFileError,
        match=r"bias.gguf: tensor 'img_in.bias' \(Q8_0\): quantized tensor of shape \[64\]; only 2-D weights can be",
    ):
        load_transformer_gguf(tmp_path / "bias.gguf")


@pytest.fixture(scope="module")
def q4_k_rows():
    """A 48 x 512 Q4_K weight (2 blocks a row) as raw rows, and its values."""
    raw = random_k_blocks(48, 512, T.Q4_K, 0.05, np.random.default_rng(1))
    return raw, gguf.quants.dequantize(raw, T.Q4_K)


def _gguf_linear(raw: np.ndarray) -> Linear:
    layer = Linear(512, 48)
    layer.bias = mx.array(np.random.default_rng(2).standard_normal(48, np.float32))
    layer.set_gguf(mx.array(raw), T.Q4_K)
    return layer


@pytest.mark.parametrize("compute", ["auto", "mlx"])
def test_linear_holding_gguf_blocks(q4_k_rows, compute):
    """y = x W^T + b on both compute paths; the CPU path re-lays Q4_K's codes, the MLX path converts
    the blocks to MLX affine, once."""
    raw, weight = q4_k_rows
    layer = _gguf_linear(raw)
    assert (layer.output_dims, layer.input_dims, layer.is_quantized) == (48, 512, True)
    x = np.random.default_rng(3).standard_normal((2, 5, 512), np.float32)
    with backend.use(compute):
        y = np.array(layer(mx.array(x)))
    expected = x @ weight.T.astype(np.float64) + np.array(layer.bias)
    assert relative_error(y, expected) < 1e-6
    assert np.array_equal(np.array(layer.dense_weight()), weight)
    assert layer.gguf_type == (Q4_K_PAIRED if compute == "auto" else None)


def test_gguf_linear_with_adapters_merges_into_its_mlx_form(q4_k_rows):
    raw, weight = q4_k_rows
    rng = np.random.default_rng(4)
    down, up = rng.standard_normal((4, 512), np.float32), rng.standard_normal((48, 4), np.float32)
    layer = _gguf_linear(raw)
    adapter = LowRankAdapter(mx.array(down), mx.array(up), 0.01)
    layer.add_adapter(adapter)
    x = rng.standard_normal((7, 512), np.float32)
    expected = x @ (weight + 0.01 * up @ down).T + np.array(layer.bias)
    assert relative_error(np.array(layer(mx.array(x))), expected) < 1e-6  # exact base, adapter beside it
    layer.merge_adapters()
    assert (layer.bits, layer.group_size, layer.gguf_type, layer.adapters) == (4, 32, None, [])
    requantized = mx.quantize(mx.array(weight) + adapter.delta(), group_size=32, bits=4)
    assert np.array_equal(
        np.array(layer.dense_weight()), np.array(mx.dequantize(*requantized, group_size=32, bits=4))
    )


def test_gguf_linear_made_dense_holds_its_values_in_fp32(q4_k_rows):
    raw, weight = q4_k_rows
    layer = _gguf_linear(raw)
    layer.set_dense(layer.dense_weight())
    assert (layer.is_quantized, layer.weight.dtype, layer.input_dims) == (False, mx.float32, 512)
    assert np.array_equal(np.array(layer.weight), weight)
