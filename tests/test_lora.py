"""LoRA files of each dialect change the transformer exactly as the independent math says: the
reference transformer with the expected change added to its diffusers weights gives the same output."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from tests import lora_files
from tests.conftest import relative_error
from tests.test_transformer import _inputs, _ours, reference_velocity

from flux1.loaders.transformer import load_transformer
from flux1.lora.apply import LoraError, apply_file
from flux1.quantize import quantize_linears

DIALECTS = [
    "peft",
    "peft-alpha-tensors",
    "kohya",
    "comfyui",
    "bfl-peft",
    "onetrainer",
    "loha",
    "comfyui-diff",
]
STRENGTH = 0.7
# fp32 on both sides, as the transformer parity test: 1e-4.
TOLERANCE = 1e-4


def _reference_output(folder, changes: dict[str, np.ndarray], strength: float) -> np.ndarray:
    reference = FluxTransformer2DModel.from_pretrained(folder)
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for layer, change in changes.items():
            params[f"{layer}.weight"] += strength * torch.from_numpy(change)
    return reference_velocity(reference, _inputs(False))


@pytest.mark.parametrize("dialect", DIALECTS)
def test_dialect_equals_reference_with_expected_change(tiny_schnell, tmp_path, dialect, compute_path):
    file = tmp_path / f"{dialect}.safetensors"
    changes = lora_files.write(file, dialect)
    model = load_transformer(tiny_schnell / "transformer")
    report = apply_file({"transformer": model}, file, STRENGTH)
    assert report.layers == len(lora_files.LAYOUT) and report.unmatched == []
    expected = _reference_output(tiny_schnell / "transformer", changes, STRENGTH)
    assert relative_error(_ours(model, _inputs(False)), expected) < TOLERANCE


def test_detected_dialects(tiny_schnell, tmp_path):
    names = {
        "peft": "diffusers",
        "kohya": "kohya",
        "comfyui": "ComfyUI",
        "bfl-peft": "BFL-PEFT",
        "onetrainer": "OneTrainer",
        "loha": "LyCORIS",
    }
    for dialect, name in names.items():
        lora_files.write(tmp_path / f"{dialect}.safetensors", dialect)
        model = load_transformer(tiny_schnell / "transformer")
        assert apply_file({"transformer": model}, tmp_path / f"{dialect}.safetensors", 1.0).dialect == name


def test_two_loras_add_and_scale_zero_changes_nothing(tiny_schnell, tmp_path):
    first = lora_files.write(tmp_path / "a.safetensors", "kohya", seed=1)
    second = lora_files.write(tmp_path / "b.safetensors", "peft", seed=2)
    model = load_transformer(tiny_schnell / "transformer")
    apply_file({"transformer": model}, tmp_path / "a.safetensors", 1.0)
    apply_file({"transformer": model}, tmp_path / "b.safetensors", 0.6)
    both = {k: first[k] + 0.6 * second[k] for k in first}
    expected = _reference_output(tiny_schnell / "transformer", both, 1.0)
    assert relative_error(_ours(model, _inputs(False)), expected) < TOLERANCE

    plain = load_transformer(tiny_schnell / "transformer")
    zero = load_transformer(tiny_schnell / "transformer")
    apply_file({"transformer": zero}, tmp_path / "a.safetensors", 0.0)
    assert np.array_equal(_ours(zero, _inputs(False)), _ours(plain, _inputs(False)))


def test_lora_survives_a_4_bit_base(tiny_schnell, tmp_path, compute_path):
    lora_files.write(tmp_path / "a.safetensors", "kohya", seed=3)
    x = _inputs(False)
    dense = load_transformer(tiny_schnell / "transformer")
    apply_file({"transformer": dense}, tmp_path / "a.safetensors", 1.0)
    quantized = load_transformer(tiny_schnell / "transformer")
    quantize_linears(quantized, 4, 32)
    without = _ours(quantized, x)
    apply_file({"transformer": quantized}, tmp_path / "a.safetensors", 1.0)
    assert quantized.double_blocks[0].img_attn.qkv.bits == 4  # the base stays quantized
    with_lora, reference = _ours(quantized, x), _ours(dense, x)
    # The LoRA's effect is kept whole: what is left is the 4-bit error of the base alone.
    assert relative_error(with_lora, reference) < 0.25 * relative_error(without, reference)


def test_unmatched_keys_are_listed_with_the_dialect(tiny_schnell, tmp_path):
    tensors = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": mx.zeros((4, 64)),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": mx.zeros((192, 4)),
        "lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight": mx.zeros((4, 64)),
        "some_other_tensor": mx.zeros((2,)),
    }
    mx.save_safetensors(str(tmp_path / "x.safetensors"), tensors)
    model = load_transformer(tiny_schnell / "transformer")
    with pytest.raises(
        LoraError,
        match=r"x.safetensors: 2 keys match no layer \(format detected: kohya\): "
        r"lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight, some_other_tensor",
    ):
        apply_file({"transformer": model}, tmp_path / "x.safetensors", 1.0)
    report = apply_file({"transformer": model}, tmp_path / "x.safetensors", 1.0, strict=False)
    assert report.layers == 1 and len(report.unmatched) == 2


def test_shape_mismatch_names_key_and_shapes(tiny_schnell, tmp_path):
    tensors = {
        "transformer.proj_out.lora_A.weight": mx.zeros((4, 3072)),
        "transformer.proj_out.lora_B.weight": mx.zeros((64, 4)),
    }
    mx.save_safetensors(str(tmp_path / "big.safetensors"), tensors)
    model = load_transformer(tiny_schnell / "transformer")
    with pytest.raises(
        LoraError,
        match=r"'transformer.proj_out.lora_A.weight': down \[4, 3072\] / up \[64, 4\] "
        r"do not fit layer 'final_layer.linear' of transformer \(\[out, in\] = \[64, 64\]\)",
    ):
        apply_file({"transformer": model}, tmp_path / "big.safetensors", 1.0)


def test_xlabs_processors(tiny_schnell, tmp_path):
    rng = np.random.default_rng(5)
    down, up = rng.standard_normal((4, 64), dtype=np.float32), rng.standard_normal((192, 4), dtype=np.float32)
    proj_down, proj_up = (
        rng.standard_normal((4, 320), dtype=np.float32),
        rng.standard_normal((64, 4), dtype=np.float32),
    )
    tensors = {
        "double_blocks.0.processor.qkv_lora2.down.weight": down,
        "double_blocks.0.processor.qkv_lora2.up.weight": up,
        "single_blocks.1.processor.qkv_lora.down.weight": down,
        "single_blocks.1.processor.qkv_lora.up.weight": up,
        "single_blocks.1.processor.proj_lora.down.weight": proj_down,
        "single_blocks.1.processor.proj_lora.up.weight": proj_up,
    }
    mx.save_safetensors(str(tmp_path / "xlabs.safetensors"), {k: mx.array(v) for k, v in tensors.items()})
    qkv = up @ down  # rows q, k, v of 64 each; no alpha in XLabs files
    changes = {
        "transformer_blocks.0.attn.add_q_proj": qkv[:64],
        "transformer_blocks.0.attn.add_k_proj": qkv[64:128],
        "transformer_blocks.0.attn.add_v_proj": qkv[128:],
        "single_transformer_blocks.1.attn.to_q": qkv[:64],
        "single_transformer_blocks.1.attn.to_k": qkv[64:128],
        "single_transformer_blocks.1.attn.to_v": qkv[128:],
        "single_transformer_blocks.1.proj_out": proj_up @ proj_down,
    }
    model = load_transformer(tiny_schnell / "transformer")
    assert apply_file({"transformer": model}, tmp_path / "xlabs.safetensors", 1.0).dialect == "XLabs"
    expected = _reference_output(tiny_schnell / "transformer", changes, 1.0)
    assert relative_error(_ours(model, _inputs(False)), expected) < TOLERANCE


def test_text_encoder_loras(tiny_schnell, tmp_path):
    """kohya CLIP (lora_te1_) and ComfyUI T5 keys change the text encoders as transformers computes it."""
    from transformers import CLIPTextModel, T5EncoderModel

    from flux1.loaders.text_encoders import load_clip, load_t5
    from flux1.tokenizers import PromptTokenizer

    rng = np.random.default_rng(6)
    clip_down, clip_up = (
        rng.standard_normal((4, 40), dtype=np.float32),
        rng.standard_normal((40, 4), dtype=np.float32),
    )
    t5_down, t5_up = (
        rng.standard_normal((4, 48), dtype=np.float32),
        rng.standard_normal((32, 4), dtype=np.float32),
    )
    tensors = {
        "lora_te1_text_model_encoder_layers_1_self_attn_q_proj.lora_down.weight": clip_down,
        "lora_te1_text_model_encoder_layers_1_self_attn_q_proj.lora_up.weight": clip_up,
        "lora_te1_text_model_encoder_layers_1_self_attn_q_proj.alpha": np.array(8.0, np.float32),
        "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.k.lora_down.weight": t5_down,
        "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.k.lora_up.weight": t5_up,
    }
    mx.save_safetensors(str(tmp_path / "te.safetensors"), {k: mx.array(v) for k, v in tensors.items()})
    clip, t5 = load_clip(tiny_schnell / "text_encoder"), load_t5(tiny_schnell / "text_encoder_2")
    report = apply_file({"clip": clip, "t5": t5}, tmp_path / "te.safetensors", 1.0)
    assert report.layers == 2 and report.dialect == "ComfyUI + kohya"

    clip_ids = PromptTokenizer(tiny_schnell / "tokenizer", "clip", 77)("a red fox").ids
    t5_ids = PromptTokenizer(tiny_schnell / "tokenizer_2", "t5", 32)("a red fox").ids
    ref_clip = CLIPTextModel.from_pretrained(tiny_schnell / "text_encoder", dtype=torch.float32)
    ref_t5 = T5EncoderModel.from_pretrained(tiny_schnell / "text_encoder_2", dtype=torch.float32)
    with torch.no_grad():
        ref_clip.encoder.layers[1].self_attn.q_proj.weight += torch.from_numpy(2.0 * clip_up @ clip_down)
        ref_t5.encoder.block[0].layer[0].SelfAttention.k.weight += torch.from_numpy(t5_up @ t5_down)
        clip_expected = ref_clip(torch.from_numpy(clip_ids).long()).pooler_output.numpy()
        t5_expected = ref_t5(torch.from_numpy(t5_ids).long()).last_hidden_state.numpy()
    assert relative_error(clip(mx.array(clip_ids)), clip_expected) < TOLERANCE
    assert relative_error(t5(mx.array(t5_ids)), t5_expected) < TOLERANCE


def test_cli_records_loras_and_save_bakes_them(tiny_schnell, tmp_path):
    from PIL import Image

    from flux1.cli.generate import main
    from flux1.cli.save import main as save_main
    from flux1.lora.apply import file_digest
    from flux1.metadata import read_record

    lora = tmp_path / "style.safetensors"
    lora_files.write(lora, "kohya", seed=4)
    # fp32 GEMMs: an adapter beside the weight and the weight merged agree to fp32 rounding only
    common = ["--prompt", "a fox", "--height", "32", "--width", "48", "--steps", "2", "--seed", "1"]
    common += ["--precision", "fp32"]
    assert (
        main(
            [
                "--path",
                str(tiny_schnell),
                *common,
                "--lora-paths",
                str(lora),
                "--lora-scales",
                "0.8",
                "--output",
                str(tmp_path / "a.png"),
            ]
        )
        == 0
    )
    assert read_record(tmp_path / "a.png")["loras"] == [
        {"name": "style.safetensors", "path": str(lora), "scale": 0.8, "sha256": file_digest(lora)}
    ]
    assert (
        save_main(
            [
                "--source",
                str(tiny_schnell),
                "--path",
                str(tmp_path / "baked"),
                "--lora-paths",
                str(lora),
                "--lora-scales",
                "0.8",
            ]
        )
        == 0
    )
    assert main(["--path", str(tmp_path / "baked"), *common, "--output", str(tmp_path / "b.png")]) == 0
    a, b = (np.asarray(Image.open(tmp_path / n), np.float64) for n in ("a.png", "b.png"))
    assert np.abs(a - b).max() <= 1  # merged vs adapter: the same sums in another order, then 8-bit rounding


def test_control_lora_is_refused(tiny_schnell, tmp_path):
    tensors = {
        "transformer.x_embedder.lora_A.weight": mx.zeros((4, 128)),
        "transformer.x_embedder.lora_B.weight": mx.zeros((64, 4)),
        "transformer.x_embedder.lora_B.bias": mx.zeros((64,)),
    }
    mx.save_safetensors(str(tmp_path / "canny.safetensors"), tensors)
    with pytest.raises(LoraError, match="a FLUX.1 control LoRA \\(Canny/Depth\\): it widens img_in to 128"):
        apply_file(
            {"transformer": load_transformer(tiny_schnell / "transformer")},
            tmp_path / "canny.safetensors",
            1.0,
        )


def _reference_with_weights(folder, weights: dict[str, np.ndarray]) -> np.ndarray:
    reference = FluxTransformer2DModel.from_pretrained(folder)
    current = {n: p.detach().numpy().copy() for n, p in reference.named_parameters()}
    return _reference_output(folder, {k: v - current[f"{k}.weight"] for k, v in weights.items()}, 1.0)


@pytest.mark.parametrize("style", ["peft", "lycoris"])
def test_dora(tiny_schnell, tmp_path, style):
    """W'' = m (W + s dW) / norm(W + s dW): per output row (PEFT) or per input column (LyCORIS)."""
    rng = np.random.default_rng(8)
    down, up = rng.standard_normal((4, 64), dtype=np.float32), rng.standard_normal((64, 4), dtype=np.float32)
    base = (
        FluxTransformer2DModel.from_pretrained(tiny_schnell / "transformer")
        .x_embedder.weight.detach()
        .numpy()
    )
    changed = base + 0.5 * up @ down  # alpha 2 / rank 4
    if style == "peft":
        magnitude = rng.uniform(0.5, 1.5, 64).astype(np.float32)
        tensors = {
            "transformer.x_embedder.lora_A.weight": down,
            "transformer.x_embedder.lora_B.weight": up,
            "transformer.x_embedder.alpha": np.array(2.0, np.float32),
            "transformer.x_embedder.lora_magnitude_vector": magnitude,
        }
        expected = magnitude[:, None] * changed / np.linalg.norm(changed, axis=1, keepdims=True)
    else:
        magnitude = rng.uniform(0.5, 1.5, (1, 64)).astype(np.float32)
        tensors = {
            "lycoris_x_embedder.lora_down.weight": down,
            "lycoris_x_embedder.lora_up.weight": up,
            "lycoris_x_embedder.alpha": np.array(2.0, np.float32),
            "lycoris_x_embedder.dora_scale": magnitude,
        }
        expected = magnitude * changed / np.linalg.norm(changed, axis=0, keepdims=True)
    mx.save_safetensors(str(tmp_path / "dora.safetensors"), {k: mx.array(v) for k, v in tensors.items()})
    model = load_transformer(tiny_schnell / "transformer")
    apply_file({"transformer": model}, tmp_path / "dora.safetensors", 1.0)
    reference = _reference_with_weights(tiny_schnell / "transformer", {"x_embedder": expected})
    assert relative_error(_ours(model, _inputs(False)), reference) < TOLERANCE


def test_lokr(tiny_schnell, tmp_path):
    """dW = kron(w1, w2a @ w2b) * alpha / rank of the decomposed factor."""
    rng = np.random.default_rng(9)
    w1 = rng.standard_normal((4, 4), dtype=np.float32)
    w2a, w2b = rng.standard_normal((16, 2), dtype=np.float32), rng.standard_normal((2, 16), dtype=np.float32)
    tensors = {
        "lora_unet_double_blocks_0_img_attn_proj.lokr_w1": w1,
        "lora_unet_double_blocks_0_img_attn_proj.lokr_w2_a": w2a,
        "lora_unet_double_blocks_0_img_attn_proj.lokr_w2_b": w2b,
        "lora_unet_double_blocks_0_img_attn_proj.alpha": np.array(1.0, np.float32),
    }
    mx.save_safetensors(str(tmp_path / "lokr.safetensors"), {k: mx.array(v) for k, v in tensors.items()})
    model = load_transformer(tiny_schnell / "transformer")
    assert apply_file({"transformer": model}, tmp_path / "lokr.safetensors", 1.0).dialect == "LyCORIS"
    change = np.kron(w1, w2a @ w2b) * 0.5 * 0.1
    expected = _reference_output(
        tiny_schnell / "transformer", {"transformer_blocks.0.attn.to_out.0": change}, 1 / 0.1
    )
    assert relative_error(_ours(model, _inputs(False)), expected) < TOLERANCE


def test_peft_metadata_alpha_pattern_and_rslora(tiny_schnell, tmp_path):
    """alpha_pattern overrides lora_alpha per module; use_rslora divides by sqrt(rank)."""
    rng = np.random.default_rng(10)
    factors = {
        name: (rng.standard_normal((4, 64), dtype=np.float32), rng.standard_normal((64, 4), dtype=np.float32))
        for name in ("x_embedder", "proj_out")
    }
    tensors = {}
    for name, (down, up) in factors.items():
        tensors[f"transformer.{name}.lora_A.weight"], tensors[f"transformer.{name}.lora_B.weight"] = down, up
    config = '{"r": 4, "lora_alpha": 8, "alpha_pattern": {"x_embedder": 2}, "use_rslora": true}'
    mx.save_safetensors(
        str(tmp_path / "peft.safetensors"),
        {k: mx.array(v) for k, v in tensors.items()},
        metadata={"lora_adapter_metadata": config},
    )
    model = load_transformer(tiny_schnell / "transformer")
    apply_file({"transformer": model}, tmp_path / "peft.safetensors", 1.0)
    changes = {
        "x_embedder": 1.0 * factors["x_embedder"][1] @ factors["x_embedder"][0],  # 2 / sqrt(4)
        "proj_out": 4.0 * factors["proj_out"][1] @ factors["proj_out"][0],
    }  # 8 / sqrt(4)
    expected = _reference_output(tiny_schnell / "transformer", changes, 1.0)
    assert relative_error(_ours(model, _inputs(False)), expected) < TOLERANCE


def test_file_written_by_diffusers_pipeline_applies_its_prefixed_metadata(tiny_schnell, tmp_path, caplog):
    """diffusers' FluxPipeline.save_lora_weights (what its DreamBooth LoRA script calls) stores the
    LoraConfig with `transformer.` / `text_encoder.` prefixed keys: alpha 8 / rank 4 must give scale 2,
    for the transformer and CLIP, exactly as diffusers' own load_lora_weights applies it."""
    from diffusers import FluxPipeline

    from flux1.loaders.text_encoders import load_clip
    from flux1.tokenizers import PromptTokenizer

    rng = np.random.default_rng(9)

    def pair(out_dim, in_dim):
        return {
            "lora_A.weight": torch.from_numpy(rng.standard_normal((4, in_dim), dtype=np.float32)),
            "lora_B.weight": torch.from_numpy(rng.standard_normal((out_dim, 4), dtype=np.float32) * 0.1),
        }

    transformer_layers = {
        f"{module}.{k}": v
        for module, (out_dim, in_dim) in {
            "transformer_blocks.0.attn.to_q": (64, 64),
            "transformer_blocks.1.ff.net.2": (64, 256),
            "single_transformer_blocks.0.proj_out": (64, 320),
        }.items()
        for k, v in pair(out_dim, in_dim).items()
    }
    clip_layers = {f"text_model.encoder.layers.0.self_attn.v_proj.{k}": v for k, v in pair(40, 40).items()}
    config = {"r": 4, "lora_alpha": 8}
    FluxPipeline.save_lora_weights(
        tmp_path,
        transformer_lora_layers=transformer_layers,
        text_encoder_lora_layers=clip_layers,
        transformer_lora_adapter_metadata={
            **config,
            "target_modules": sorted({k.rsplit(".", 2)[0] for k in transformer_layers}),
        },
        text_encoder_lora_adapter_metadata={**config, "target_modules": ["v_proj"]},
        weight_name="lora.safetensors",
    )
    file = tmp_path / "lora.safetensors"
    pipe = FluxPipeline.from_pretrained(tiny_schnell, dtype=torch.float32)
    pipe.load_lora_weights(file)

    model = load_transformer(tiny_schnell / "transformer")
    clip = load_clip(tiny_schnell / "text_encoder")
    report = apply_file({"transformer": model, "clip": clip}, file, 1.0)
    assert report.layers == 4 and report.unmatched == []
    ids = PromptTokenizer(tiny_schnell / "tokenizer", "clip", 77)("a red fox").ids
    expected = reference_velocity(pipe.transformer, _inputs(False))
    with torch.no_grad():
        clip_expected = pipe.text_encoder(torch.from_numpy(ids).long()).pooler_output.numpy()
    assert relative_error(_ours(model, _inputs(False)), expected) < TOLERANCE
    assert relative_error(clip(mx.array(ids)), clip_expected) < TOLERANCE
