"""The MLX FLUX transformer computes what diffusers' FluxTransformer2DModel computes, on the same files."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from tests.conftest import relative_error

from flux1.fixtures import transformer as transformer_fixture
from flux1.fixtures.presets import configs
from flux1.loaders.transformer import load_transformer

# fp32 on both sides; what differs is summation order in matmuls and attention and the fp32
# evaluation of cos/sin at 1000 * guidance. Measured: about 5e-6 (schnell) and 3e-5 (dev).
TOLERANCE = 1e-4


@pytest.fixture(scope="session", params=["schnell", "dev"])
def transformer_folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"transformer-{request.param}") / "transformer"
    transformer_fixture.write(folder, configs("tiny", request.param)["transformer"], "float32", seed=3)
    transformer_fixture.write_bfl(folder, folder.parent / f"flux1-{request.param}.safetensors")
    return folder


def _inputs(guidance: bool, rows: int = 3, cols: int = 5, text_tokens: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    img_ids = np.zeros((rows * cols, 3), np.float32)
    img_ids[:, 1] = np.repeat(np.arange(rows), cols)
    img_ids[:, 2] = np.tile(np.arange(cols), rows)
    return {
        "img": rng.standard_normal((1, rows * cols, 64), dtype=np.float32),
        "img_ids": img_ids,
        "txt": rng.standard_normal((1, text_tokens, 48), dtype=np.float32),
        "txt_ids": np.zeros((text_tokens, 3), np.float32),
        "timesteps": np.array([0.75], np.float32),
        "y": rng.standard_normal((1, 40), dtype=np.float32),
        "guidance": np.array([3.5], np.float32) if guidance else None,
    }


def _ours(model, x: dict) -> np.ndarray:
    guidance = None if x["guidance"] is None else mx.array(x["guidance"])
    out = model(
        mx.array(x["img"]),
        mx.array(x["img_ids"])[None],
        mx.array(x["txt"]),
        mx.array(x["txt_ids"])[None],
        mx.array(x["timesteps"]),
        mx.array(x["y"]),
        guidance,
    )
    return np.array(out)


def reference_velocity(reference, x: dict) -> np.ndarray:
    """diffusers' FluxTransformer2DModel on the inputs of `_inputs`."""
    t = {k: None if v is None else torch.from_numpy(v) for k, v in x.items()}
    with torch.no_grad():
        return reference(
            hidden_states=t["img"],
            encoder_hidden_states=t["txt"],
            pooled_projections=t["y"],
            timestep=t["timesteps"],
            img_ids=t["img_ids"],
            txt_ids=t["txt_ids"],
            guidance=t["guidance"],
        ).sample.numpy()


def test_velocity_equals_diffusers(transformer_folder, compute_path):
    reference, info = FluxTransformer2DModel.from_pretrained(transformer_folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    model = load_transformer(transformer_folder)
    x = _inputs(model.guidance_embeds)
    expected = reference_velocity(reference, x)
    assert relative_error(_ours(model, x), expected) < TOLERANCE


def test_bfl_single_file_is_bit_identical_to_diffusers_folder(transformer_folder):
    variant = transformer_folder.parent.name.split("-")[1].rstrip("0123456789")
    from_folder = load_transformer(transformer_folder)
    from_file = load_transformer(transformer_folder.parent / f"flux1-{variant}.safetensors")
    assert from_file.config["guidance_embeds"] == from_folder.guidance_embeds
    x = _inputs(from_folder.guidance_embeds)
    assert np.array_equal(_ours(from_file, x), _ours(from_folder, x))


def test_weights_keep_their_stored_dtype_and_stay_lazy(tmp_path):
    folder = tmp_path / "transformer"
    transformer_fixture.write(folder, configs("tiny", "schnell")["transformer"], "bfloat16", seed=0)
    model = load_transformer(folder)
    assert model.double_blocks[0].img_attn.qkv.weight.dtype == mx.bfloat16
    assert model.img_in.weight.dtype == mx.bfloat16
    out = _ours(model, _inputs(False))
    assert out.dtype == np.float32 and np.isfinite(out).all()


def test_dev_transformer_requires_guidance(tmp_path):
    transformer_fixture.write(tmp_path, configs("tiny", "dev")["transformer"], "float32", seed=0)
    with pytest.raises(ValueError, match="FLUX.1-dev\\) needs a guidance value"):
        _ours(load_transformer(tmp_path), _inputs(False))


def test_several_steps_modulations_at_once_equal_diffusers_at_each_step(transformer_folder, compute_path):
    """`step_modulations`: the modulations of 3 steps from one product per modulation layer (a batch
    of 2 images, so 6 rows), each step's velocity against diffusers' at that step's timestep."""
    reference = FluxTransformer2DModel.from_pretrained(transformer_folder)
    model = load_transformer(transformer_folder)
    x = _inputs(model.guidance_embeds)
    x["img"], x["txt"] = (np.concatenate([a, 0.5 * a]) for a in (x["img"], x["txt"]))
    x["y"] = np.concatenate([x["y"], -x["y"]])
    timesteps = np.array([1.0, 0.75, 0.2], np.float32)
    guidance = None if x["guidance"] is None else mx.array(x["guidance"])
    steps = model.step_modulations(mx.array(timesteps), mx.array(x["y"]), guidance, mx.float32)
    assert len(steps) == 3
    for t, modulations in zip(timesteps, steps, strict=True):
        got = model(
            mx.array(x["img"]),
            mx.array(x["img_ids"])[None],
            mx.array(x["txt"]),
            mx.array(x["txt_ids"])[None],
            modulations=modulations,
        )
        expected = reference_velocity(reference, {**x, "timesteps": np.array([t, t], np.float32)})
        assert got.shape == expected.shape == (2, 15, 64)
        assert relative_error(np.array(got), expected) < TOLERANCE
