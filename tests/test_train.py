"""LoRA training: one step's loss and gradients equal torch autograd through diffusers + PEFT (and
transformers' CLIP + PEFT when the text encoder trains), the trained file loads in diffusers and flux1
alike, runs resume bit for bit, bad input is refused."""

import dataclasses
import json
import signal
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.training_utils import compute_loss_weighting_for_sd3
from peft import LoraConfig, set_peft_model_state_dict
from PIL import Image
from safetensors.numpy import load_file, save_file
from tests.conftest import relative_error
from transformers import CLIPTextModel

from flux1 import Config, Flux1, latents
from flux1.configs import CLIP_LENGTH
from flux1.loaders.text_encoders import load_clip
from flux1.loaders.transformer import load_transformer
from flux1.nn import cpu_linear
from flux1.tokenizers import PromptTokenizer
from flux1.train.adapters import CLIP_TARGETS, TARGETS, attach, peft_tensors
from flux1.train.cli import main as train_main
from flux1.train.objective import Batch, Weighting, training_sigmas
from flux1.train.trainer import loss_and_gradients

# fp32 on both sides; the differences are summation order (as the transformer parity test, 1e-4).
# Measured on the whole gradient: 7e-6 to 1.3e-5 (schnell), 4e-5 (dev); the loss: 1e-6 to 5e-6. dev's
# guidance is 1.0 here: its sinusoidal embedding at 1000 * guidance differs in the last bits of fp32 cos/sin.
# With CLIP training (through transformers' CLIPTextModel + PEFT): CLIP's adapters' gradients 1.4e-5
# (schnell), 2.0e-5 (dev), at most 2.9e-5 per tensor; the transformer's 1.2e-5, 2.1e-5.
TOLERANCE = 1e-4
RANK, ALPHA = 4, 8.0


def _random_adapters(trained, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for adapter in trained.adapters:
        adapter.down = mx.array(rng.standard_normal(adapter.down.shape, dtype=np.float32) * 0.2)
        adapter.up = mx.array(rng.standard_normal(adapter.up.shape, dtype=np.float32) * 0.2)


def _batch(transformer, seed: int = 0) -> Batch:
    """Two images of 4x6 latents (2x3 tokens), 7 text tokens, two different sigmas."""
    rng = np.random.default_rng(seed)
    text_width = transformer.config["joint_attention_dim"]
    pooled_width = transformer.config["pooled_projection_dim"]
    return Batch(
        latents=mx.array(rng.standard_normal((2, 16, 4, 6), dtype=np.float32)),
        hidden=mx.array(rng.standard_normal((2, 7, text_width), dtype=np.float32)),
        pooled=mx.array(rng.standard_normal((2, pooled_width), dtype=np.float32)),
        noise=mx.array(rng.standard_normal((2, 16, 4, 6), dtype=np.float32)),
        sigmas=mx.array(np.array([0.3, 0.85], np.float32)),
    )


def _clip_ids(folder, captions=("a red square on blue", "a green disc on black")) -> mx.array:
    tokenizer = PromptTokenizer(folder / "tokenizer", "clip", CLIP_LENGTH)
    return mx.array(np.concatenate([tokenizer(c).ids for c in captions]))


def _with_peft_lora(model, target_modules: list[str], lora: dict, prefix: str):
    """`model` frozen, with PEFT adapters (rank, alpha as ours) holding the tensors of `lora` under `prefix`."""
    model.requires_grad_(False)
    model.add_adapter(
        LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=target_modules)
    )
    state = {
        k.removeprefix(prefix): torch.from_numpy(np.array(v)) for k, v in lora.items() if k.startswith(prefix)
    }
    result = set_peft_model_state_dict(model, state)
    assert not result.unexpected_keys
    return model


def _reference_step(folder, lora: dict, batch: Batch, scheme: str, guidance: float):
    """diffusers' train_dreambooth_lora_flux.py loss on the same batch, and the LoRA gradients (CLIP's
    too when the batch holds CLIP tokens: its pooled output computed with gradients, as the script
    does with --train_text_encoder)."""
    model = FluxTransformer2DModel.from_pretrained(folder / "transformer", dtype=torch.float32)
    networks = {"transformer.": _with_peft_lora(model, TARGETS["all"], lora, "transformer.")}
    t = {
        k: torch.from_numpy(np.array(getattr(batch, k)))
        for k in ("latents", "hidden", "pooled", "noise", "sigmas", "clip_ids")
        if getattr(batch, k) is not None
    }
    if "clip_ids" in t:
        clip = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32)
        # transformers 5 dropped CLIPTextModel's `text_model.` level; the file keeps it (diffusers reads both)
        prefix = "text_encoder." + ("" if hasattr(clip, "text_model") else "text_model.")
        networks[prefix] = _with_peft_lora(clip, CLIP_TARGETS, lora, prefix)
        t["pooled"] = networks[prefix](t["clip_ids"].long()).pooler_output
    x, noise, sigmas = t["latents"], t["noise"], t["sigmas"]
    b, c, h, w = x.shape
    noisy = (1.0 - sigmas.view(-1, 1, 1, 1)) * x + sigmas.view(-1, 1, 1, 1) * noise
    packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
    image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    prediction = model(
        hidden_states=packed,
        timestep=(sigmas * 1000) / 1000,
        guidance=torch.full((b,), guidance) if model.config.guidance_embeds else None,
        pooled_projections=t["pooled"],
        encoder_hidden_states=t["hidden"],
        txt_ids=torch.zeros(t["hidden"].shape[1], 3),
        img_ids=image_ids,
        return_dict=False,
    )[0]
    prediction = FluxPipeline._unpack_latents(prediction, height=h * 8, width=w * 8, vae_scale_factor=8)
    weighting = compute_loss_weighting_for_sd3(scheme, sigmas.view(-1, 1, 1, 1))
    loss = torch.mean((weighting * (prediction - (noise - x)) ** 2).reshape(b, -1), 1).mean()
    loss.backward()
    grads = {}
    for prefix, network in networks.items():
        for name, param in network.named_parameters():
            if param.grad is not None:
                grads[prefix + name.replace(".default", "")] = param.grad.numpy()
    return loss.item(), grads


@pytest.mark.parametrize(
    "scheme, train_clip, cpu_kernels",
    [("sigma_sqrt", False, True), ("logit_normal", False, True), ("logit_normal", True, True)]
    + [("logit_normal", False, False), ("logit_normal", True, False)],
)
def test_one_step_loss_and_gradients_equal_diffusers_peft(
    tiny_checkpoint, scheme, train_clip, cpu_kernels, monkeypatch
):
    """On the CPU kernels (each linear product counted: how a quantized base trains on the CPU) and on
    MLX's kernels (how a dense one does)."""
    products = []
    original = cpu_linear.frozen_product
    monkeypatch.setattr(
        cpu_linear, "frozen_product", lambda x, layer: products.append(1) or original(x, layer)
    )
    transformer = load_transformer(tiny_checkpoint / "transformer")
    networks = {"transformer": transformer}
    batch = _batch(transformer)
    if train_clip:
        networks["clip"] = load_clip(tiny_checkpoint / "text_encoder")
        batch = dataclasses.replace(batch, pooled=None, clip_ids=_clip_ids(tiny_checkpoint))
    trained = attach(networks, "all", RANK, ALPHA, mx.random.key(0))
    _random_adapters(trained, 1)
    loss, grads = loss_and_gradients(
        transformer, trained, batch, Weighting(scheme), 1.0, networks.get("clip"), cpu_kernels
    )
    assert bool(products) == cpu_kernels  # the path proven is the one asked for
    ours = {k: np.array(v) for k, v in peft_tensors(trained, grads["adapters"]).items()}
    ref_loss, ref_grads = _reference_step(tiny_checkpoint, peft_tensors(trained), batch, scheme, guidance=1.0)
    assert set(ours) == set(ref_grads)
    assert train_clip == any(k.startswith("text_encoder.text_model.") for k in ours)
    assert abs(loss.item() - ref_loss) / ref_loss < TOLERANCE
    for network in ("transformer.", "text_encoder.") if train_clip else ("transformer.",):
        keys = sorted(k for k in ours if k.startswith(network))
        flat = np.concatenate([ours[k].ravel() for k in keys])
        assert relative_error(flat, np.concatenate([ref_grads[k].ravel() for k in keys])) < TOLERANCE
    # Per tensor, q/k gradients of the single blocks pass the softmax of random-weight attention, which
    # amplifies summation-order differences: measured up to 1.3e-4 (dev), hence 3e-4 per tensor.
    worst = max(relative_error(ours[k], ref_grads[k]) for k in ours if np.linalg.norm(ref_grads[k]) > 0)
    assert worst < 3 * TOLERANCE


def test_training_sigmas_are_the_training_schedulers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    for config in ({"shift": 1.0}, {"shift": 3.0, "use_dynamic_shifting": True}, {"shift": 2.0}):
        scheduler = FlowMatchEulerDiscreteScheduler(**config)
        assert np.array_equal(np.array(training_sigmas(config)), scheduler.sigmas.numpy())


def test_loss_weights_are_diffusers():
    sigmas = np.array([0.05, 0.5, 0.97], np.float32)
    for scheme in ("sigma_sqrt", "cosmap", "logit_normal", "mode", "none"):
        expected = compute_loss_weighting_for_sd3(scheme, torch.from_numpy(sigmas)).numpy()
        np.testing.assert_allclose(
            np.array(Weighting(scheme).loss_weights(mx.array(sigmas))), expected, rtol=1e-6
        )


def _write_images(folder, captions=("a red square on blue", "a green disc on black"), size=(40, 32)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, caption in enumerate(captions):
        pixels = (rng.random((size[1], size[0], 3)) * 60).astype(np.uint8)
        pixels[8:24, 8:24, i % 3] = 240
        Image.fromarray(pixels).save(folder / f"image{i}.png")
        (folder / f"image{i}.txt").write_text(caption)
    return folder


def _args(checkpoint, data, output, *extra):
    return [
        "--path", str(checkpoint), "--data", str(data), "--output", str(output),
        "--resolution", "32", "--max-sequence-length", "16", "--rank", "4", *extra,
    ]  # fmt: skip


LEARNING = ["--target", "all", "--alpha", "2", "--learning-rate", "1e-2", "--weighting-scheme", "none"]
LEARNING_STEPS = 40
TEXT_ENCODER = ["--train-text-encoder", "--text-encoder-lr", "1e-2"]


@pytest.fixture(scope="module")
def trained_run(tiny_schnell, tmp_path_factory):
    """2 images overfit by a rank-4 LoRA on every linear layer (alpha 2: scale 0.5)."""
    return _trained(
        tiny_schnell, tmp_path_factory.mktemp("learning"), "--steps", str(LEARNING_STEPS), *LEARNING
    )


@pytest.fixture(scope="module")
def text_encoder_run(tiny_schnell, tmp_path_factory):
    """A few steps with CLIP's attention layers training too (their own rate, 1e-2 here)."""
    return _trained(
        tiny_schnell, tmp_path_factory.mktemp("text_encoder"), "--steps", "6", *LEARNING, *TEXT_ENCODER
    )


def _trained(checkpoint, folder, *extra):
    from flux1.train.cli import options_from
    from flux1.train.trainer import Run

    data = _write_images(folder / "data")
    run = Run(options_from(_args(checkpoint, data, folder / "lora.safetensors", *extra)))
    run.train()
    return run


@pytest.fixture(params=["trained_run", "text_encoder_run"])
def any_run(request):
    return request.getfixturevalue(request.param)


def _fixed_loss(transformer, drawer, draws: int = 8) -> float:
    """The mean loss over the first draws of the run (same images, noise and timesteps)."""
    from flux1 import backend
    from flux1.train.objective import loss

    with backend.use("mlx"):
        return float(
            np.mean([loss(transformer, drawer.draw(g), drawer.weighting, 3.5).item() for g in range(draws)])
        )


def test_two_images_overfit(trained_run, tiny_schnell):
    before = _fixed_loss(load_transformer(tiny_schnell / "transformer"), trained_run.drawer)
    after = _fixed_loss(trained_run.transformer, trained_run.drawer)
    assert after < before / 2, (before, after)
    output = trained_run.output
    assert output.with_name("lora_loss.png").is_file()
    record = json.loads(_metadata(output)["flux1_training"])
    assert record["steps"] == LEARNING_STEPS and record["base_model"] == "schnell" and record["images"] == 2
    assert record["data_sha256"] == trained_run.data_sha256 and record["options"]["target"] == "all"


def _tensors(path) -> dict:
    return load_file(path)


def _metadata(path) -> dict:
    from flux1.weights.safetensors_io import read_header

    return read_header(path)[0]["__metadata__"]


def test_file_is_what_diffusers_trainer_writes(any_run):
    config = json.loads(_metadata(any_run.output)["lora_adapter_metadata"])
    networks = ["transformer", "text_encoder"] if any_run.options.train_text_encoder else ["transformer"]
    assert {k.split(".")[0] for k in config} == set(networks)
    for network in networks:
        own = {k.removeprefix(network + "."): v for k, v in config.items() if k.startswith(network + ".")}
        assert own["r"] == 4 and own["lora_alpha"] == 2.0
        LoraConfig(**own)  # diffusers rebuilds it so
    tensors = _tensors(any_run.output)
    assert len(tensors) == 2 * len(any_run.trained.adapters)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    clip = {k for k in tensors if k.startswith("text_encoder.text_model.encoder.layers.")}
    assert all(k.startswith("transformer.") for k in set(tensors) - clip)
    if "text_encoder" in networks:  # q, k, v, out_proj of every layer, trained away from zero
        assert config["text_encoder.target_modules"] == sorted(CLIP_TARGETS)
        assert len(clip) == 2 * 4 * any_run.clip.config["num_hidden_layers"]
        assert all(np.abs(tensors[k]).max() > 0 for k in clip if k.endswith("lora_B.weight"))


SIZE = 32


def _flux1_image(folder, loras: list) -> np.ndarray:
    flux = Flux1.from_path(folder, lora_paths=loras, precision="fp32")  # diffusers computes fp32
    config = Config(num_inference_steps=2, height=SIZE, width=SIZE)
    return flux.generate_image(
        3, "a red square on blue", config, latents=latents.noise(3, SIZE, SIZE), progress=False
    ).pixels


def test_trained_file_changes_the_image_and_diffusers_draws_the_same(any_run, tiny_schnell, tmp_path):
    with_lora = _flux1_image(tiny_schnell, [any_run.output])
    assert np.abs(with_lora.astype(int) - _flux1_image(tiny_schnell, []).astype(int)).max() > 16
    if any_run.options.train_text_encoder:  # CLIP's adapters change the image by themselves
        transformer_only = tmp_path / "transformer_only.safetensors"
        tensors = {k: v for k, v in _tensors(any_run.output).items() if k.startswith("transformer.")}
        save_file(tensors, transformer_only, metadata=_metadata(any_run.output))
        without_clip = _flux1_image(tiny_schnell, [transformer_only])
        assert np.abs(with_lora.astype(int) - without_clip.astype(int)).max() > 16
    pipe = FluxPipeline.from_pretrained(tiny_schnell, dtype=torch.float32)
    pipe.load_lora_weights(str(any_run.output))
    packed = torch.from_numpy(np.array(latents.pack(latents.noise(3, SIZE, SIZE))))
    reference = pipe(
        "a red square on blue", height=SIZE, width=SIZE, num_inference_steps=2, latents=packed,
        output_type="np", max_sequence_length=256,
    ).images[0]  # fmt: skip
    assert np.abs(with_lora / 255.0 - reference).max() <= 1 / 255


def test_kohya_file_draws_what_the_peft_file_draws(any_run, tiny_schnell, tmp_path):
    from flux1.train import files

    kohya = tmp_path / "kohya.safetensors"
    files.write_lora(kohya, any_run.trained, "kohya", 4, 2.0, "all", {})
    if any_run.options.train_text_encoder:
        assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in _tensors(kohya)
    assert np.array_equal(_flux1_image(tiny_schnell, [kohya]), _flux1_image(tiny_schnell, [any_run.output]))


@pytest.mark.parametrize("text_encoder", [[], TEXT_ENCODER], ids=["transformer", "with_text_encoder"])
def test_resume_ends_with_the_adapters_of_an_uninterrupted_run(tiny_schnell, tmp_path, text_encoder):
    data = _write_images(tmp_path / "data")
    extra = ["--steps", "4", "--learning-rate", "1e-2", "--gradient-accumulation", "2", *text_encoder]
    assert (
        train_main(
            _args(tiny_schnell, data, tmp_path / "whole.safetensors", *extra, "--checkpoint-every", "2")
        )
        == 0
    )
    checkpoint = tmp_path / "whole_checkpoints" / "step_000002.safetensors"
    resumed = ["--resume", str(checkpoint)]
    assert train_main(_args(tiny_schnell, data, tmp_path / "resumed.safetensors", *extra, *resumed)) == 0
    whole, again = _tensors(tmp_path / "whole.safetensors"), _tensors(tmp_path / "resumed.safetensors")
    assert set(whole) == set(again) and all(np.array_equal(whole[k], again[k]) for k in whole)
    for network in ("transformer.", "text_encoder.") if text_encoder else ("transformer.",):
        assert any(
            np.abs(whole[k]).max() > 0 for k in whole if k.startswith(network) and k.endswith("lora_B.weight")
        )


def _refused(argv, capsys, message: str, output) -> None:
    assert train_main(argv) == 2
    assert message in capsys.readouterr().err
    assert not output.exists() and not output.with_name(f"{output.stem}_checkpoints").exists()


def test_bad_input_is_refused_with_its_reason(tiny_schnell, tmp_path, capsys):
    out = tmp_path / "lora.safetensors"
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(_args(tiny_schnell, empty, out), capsys, f"--data {empty}: no images", out)
    uncaptioned = _write_images(tmp_path / "uncaptioned")
    (uncaptioned / "image1.txt").unlink()
    _refused(
        _args(tiny_schnell, uncaptioned, out),
        capsys,
        f"{uncaptioned / 'image1.png'}: no caption (expected image1.txt",
        out,
    )
    broken = _write_images(tmp_path / "broken")
    (broken / "image0.png").write_bytes(b"not a png")
    _refused(
        _args(tiny_schnell, broken, out), capsys, f"{broken / 'image0.png'}: cannot be read as an image", out
    )
    data = _write_images(tmp_path / "data")
    bad_size = [*_args(tiny_schnell, data, out), "--resolution", "500"]
    _refused(
        bad_size, capsys, "--resolution 500: must be a positive multiple of 16 (nearest: 496 or 512)", out
    )
    _refused(
        [*_args(tiny_schnell, data, out), "--rank", "0"],
        capsys,
        "--rank 0: expected a whole number of at least 1",
        out,
    )
    for rate in ("0", "-1e-5", "nan", "inf"):
        _refused(
            [*_args(tiny_schnell, data, out), *TEXT_ENCODER[:1], f"--text-encoder-lr={rate}"],
            capsys,
            f"--text-encoder-lr {float(rate)}: expected a positive number",
            out,
        )
    _refused(  # nothing asked is silently ignored
        [*_args(tiny_schnell, data, out), "--text-encoder-lr", "1e-4"],
        capsys,
        "--text-encoder-lr 0.0001: only used with --train-text-encoder",
        out,
    )


def test_resume_from_another_configuration_is_refused(tiny_schnell, tmp_path, capsys):
    data = _write_images(tmp_path / "data")
    first = tmp_path / "first.safetensors"
    assert train_main(_args(tiny_schnell, data, first, "--steps", "2", "--checkpoint-every", "1")) == 0
    checkpoint = tmp_path / "first_checkpoints" / "step_000001.safetensors"
    out = tmp_path / "other.safetensors"
    other = [
        *_args(tiny_schnell, data, out, "--steps", "2", "--resume", str(checkpoint)),
        "--learning-rate",
        "0.5",
    ]
    _refused(other, capsys, "--learning-rate 0.0001 (checkpoint) vs 0.5 (this run)", out)
    (data / "image0.txt").write_text("another caption")
    _refused(
        _args(tiny_schnell, data, out, "--steps", "2", "--resume", str(checkpoint)),
        capsys,
        "data_sha256 differs",
        out,
    )


def test_interrupted_training_leaves_the_last_complete_checkpoint(tiny_schnell, tmp_path):
    """Killed (SIGKILL, no clean-up) while it writes a checkpoint a step: every checkpoint file there
    is whole and resumes; no LoRA file was written."""
    data = _write_images(tmp_path / "data")
    out = tmp_path / "lora.safetensors"
    command = [
        sys.executable,
        "train.py",
        *_args(tiny_schnell, data, out, "--steps", "1000", "--checkpoint-every", "1"),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = tmp_path / "lora_checkpoints"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(folder.glob("step_*.safetensors"))) < 3:
        time.sleep(0.05)
    process.kill()
    process.wait()
    assert not out.exists()
    from flux1.train import files

    last = files.latest_checkpoint(out)
    assert last is not None and last.name >= "step_000003.safetensors"
    step = int(last.stem.split("_")[1])
    resumed = tmp_path / "resumed.safetensors"
    args = _args(
        tiny_schnell,
        data,
        resumed,
        "--steps",
        str(step + 1),
        "--checkpoint-every",
        "1",
        "--resume",
        str(last),
    )
    assert train_main(args) == 0 and resumed.is_file()


def test_ctrl_c_ends_training_with_one_line_and_130(tiny_schnell, tmp_path):
    """SIGINT once checkpoints are being written: one line, exit code 130, no LoRA file."""
    data = _write_images(tmp_path / "data")
    out = tmp_path / "lora.safetensors"
    command = [sys.executable, "train.py", *_args(tiny_schnell, data, out, "--steps", "1000")]
    command += ["--checkpoint-every", "1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    folder = tmp_path / "lora_checkpoints"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(folder.glob("step_*.safetensors")):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130
    last_line = err.strip().splitlines()[-1]
    assert last_line == "interrupted: no LoRA file was written; --resume continues from a checkpoint"
    assert "Traceback" not in err
    assert not out.exists()


def test_a_quantized_base_trains_on_the_cpu_kernels(tiny_schnell, tmp_path, monkeypatch):
    """-q 4: the frozen 4-bit layers multiply through the CPU kernels (MLX's CPU quantized matmul has no
    BLAS path); the run writes its LoRA."""
    products = []
    original = cpu_linear.frozen_product
    monkeypatch.setattr(
        cpu_linear, "frozen_product", lambda x, layer: products.append(layer) or original(x, layer)
    )
    data = _write_images(tmp_path / "data")
    out = tmp_path / "lora.safetensors"
    assert train_main(_args(tiny_schnell, data, out, "--steps", "2", "-q", "4", "--group-size", "32")) == 0
    assert any(layer.bits == 4 for layer in products) and out.is_file()


def test_a_checkpoint_from_before_an_option_existed_has_its_default():
    from flux1.train import files
    from flux1.train.options import TrainOptions

    options = TrainOptions(data="data", output="lora.safetensors").identity()
    current = {"options": options, "data_sha256": "0", "layers": ["x_embedder"]}
    older = {k: v for k, v in options.items() if not k.startswith(("train_text", "text_encoder"))}
    assert files._differences({**current, "options": older}, current) == []
    training_clip = {**current, "options": {**options, "train_text_encoder": True}}
    assert files._differences({**current, "options": older}, training_clip) == [
        "--train-text-encoder False (checkpoint) vs True (this run)"
    ]
