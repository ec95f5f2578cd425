"""Seconds per LoRA training step and peak memory: flux1 (MLX, blocks checkpointed, AdamW on the
adapters) against diffusers + PEFT (torch autograd, gradient checkpointing, AdamW) on the same weights
and batch, each in its own process, runs alternated (A B A B), medians.

`wide` preset (real widths, 1 double + 1 single block), 512x512 (1024 image + 512 text tokens),
rank 16 on the target layers of diffusers' trainer (with `--train-text-encoder`, on CLIP's attention
layers too, its pooled output computed each step from 77 tokens).

`--path` trains on another folder, e.g. the 12B `full` preset saved with -q 4 (what
quantized_memory.py saves), flux1 alone (`--rows flux1`: diffusers + PEFT would need the 48 GB fp32
model) and without a warm-up step (`--warmup 0`: a step of the 12B model takes half an hour on 2 cores):

    python benchmarks/train_step.py [--preset wide] [--size 512] [--rank 16] [--steps 3] [--repeats 2]
        [--train-text-encoder] [--path FOLDER] [--rows flux1 flux1-mlx diffusers] [--warmup 1]
"""

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import cpu_model, fixture_folder, fixture_parser, run_measured  # noqa: E402

TEXT_TOKENS = 512
# name: (label, environment); flux1-mlx is flux1 on MLX's own kernels (what a GPU runs), for comparison
ROWS = {
    "flux1": ("flux1", {}),
    "flux1-mlx": ("flux1, FLUX1_COMPUTE=mlx", {"FLUX1_COMPUTE": "mlx"}),
    "diffusers": ("diffusers + peft", {}),
}


def batch(size: int, text_width: int, pooled_width: int, clip_vocab: int | None = None):
    """One image's inputs; with `clip_vocab` (CLIP training), 77 CLIP tokens in place of the pooled
    embedding."""
    import numpy as np

    rng = np.random.default_rng(0)
    shape = (1, 16, size // 8, size // 8)
    arrays = {
        "latents": rng.standard_normal(shape, dtype=np.float32),
        "noise": rng.standard_normal(shape, dtype=np.float32),
        "hidden": rng.standard_normal((1, TEXT_TOKENS, text_width), dtype=np.float32),
        "pooled": rng.standard_normal((1, pooled_width), dtype=np.float32),
        "sigmas": np.array([0.6], np.float32),
    }
    if clip_vocab:
        arrays["clip_ids"] = rng.integers(0, clip_vocab, (1, 77), dtype=np.int32)
    return arrays


def clip_vocab(folder: Path, train_text_encoder: bool) -> int | None:
    return (
        json.loads((folder / "text_encoder" / "config.json").read_text())["vocab_size"]
        if train_text_encoder
        else None
    )


def flux1_steps(
    folder: Path, size: int, rank: int, target: str, steps: int, text: bool, warmup: int
) -> list[float]:
    import flux1  # noqa: F401  (first: loads the BLAS before mlx)

    # isort: split
    import mlx.core as mx

    from flux1.loaders.text_encoders import load_clip
    from flux1.loaders.transformer import load_transformer
    from flux1.train.adapters import attach
    from flux1.train.objective import Batch, Weighting
    from flux1.train.options import TrainOptions
    from flux1.train.trainer import loss_and_gradients, make_optimizer

    transformer = load_transformer(folder / "transformer")
    networks = {"transformer": transformer, **({"clip": load_clip(folder / "text_encoder")} if text else {})}
    trained = attach(networks, target, rank, rank, mx.random.key(0))
    optimizer = make_optimizer(
        TrainOptions(data="", output="", steps=steps, train_text_encoder=text), trained
    )
    arrays = batch(
        size,
        transformer.txt_in.input_dims,
        transformer.vector_in.in_layer.input_dims,
        clip_vocab(folder, text),
    )
    inputs = Batch(**{k: mx.array(v) for k, v in arrays.items()})
    times = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        _, gradients = loss_and_gradients(
            transformer, trained, inputs, Weighting("none"), 3.5, networks.get("clip")
        )
        optimizer.update(trained, gradients)
        mx.eval(trained.parameters(), optimizer.state)
        times.append(time.perf_counter() - start)
    return times[warmup:]


def diffusers_steps(
    folder: Path, size: int, rank: int, target: str, steps: int, text: bool, warmup: int
) -> list[float]:
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig
    from transformers import CLIPTextModel

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    from flux1.train.adapters import CLIP_TARGETS, TARGETS

    torch.set_num_threads(2)
    model = FluxTransformer2DModel.from_pretrained(folder / "transformer", dtype=torch.float32)
    model.requires_grad_(False)
    model.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGETS[target])
    )
    model.enable_gradient_checkpointing()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": params, "lr": 1e-4}]
    if text:
        clip = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32)
        clip.requires_grad_(False)
        clip.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=CLIP_TARGETS)
        )
        clip.train()
        clip_params = [p for p in clip.parameters() if p.requires_grad]
        groups.append({"params": clip_params, "lr": 5e-6, "weight_decay": 1e-3})
        params = params + clip_params
    optimizer = torch.optim.AdamW(groups, weight_decay=1e-4)
    arrays = batch(
        size, model.config.joint_attention_dim, model.config.pooled_projection_dim, clip_vocab(folder, text)
    )
    t = {k: torch.from_numpy(v) for k, v in arrays.items()}
    x, noise, sigmas = t["latents"], t["noise"], t["sigmas"]
    b, c, h, w = x.shape
    image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    times = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        noisy = (1.0 - sigmas.view(-1, 1, 1, 1)) * x + sigmas.view(-1, 1, 1, 1) * noise
        prediction = model(
            hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w),
            timestep=sigmas,
            guidance=torch.full((b,), 3.5) if model.config.guidance_embeds else None,
            pooled_projections=clip(t["clip_ids"].long()).pooler_output if text else t["pooled"],
            encoder_hidden_states=t["hidden"],
            txt_ids=torch.zeros(TEXT_TOKENS, 3),
            img_ids=image_ids,
            return_dict=False,
        )[0]
        prediction = FluxPipeline._unpack_latents(prediction, height=h * 8, width=w * 8, vae_scale_factor=8)
        loss = torch.mean((prediction - (noise - x)) ** 2)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return times[warmup:]


def main() -> None:
    parser = fixture_parser(__doc__)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--target", default="attention")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="steps run before the timed ones")
    parser.add_argument("--train-text-encoder", action="store_true", help="CLIP's attention layers too")
    parser.add_argument("--path", type=Path, help="a model folder to train on instead of the preset's")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=["flux1", "diffusers"])
    parser.add_argument("--child", choices=list(ROWS), help=argparse_hidden())
    parser.add_argument("--folder", type=Path, help=argparse_hidden())
    args = parser.parse_args()
    common = [args.size, args.rank, args.target, args.steps, args.train_text_encoder, args.warmup]
    if args.child:
        run = diffusers_steps if args.child == "diffusers" else flux1_steps
        print("RESULT " + json.dumps(run(args.folder, *common)))
        return
    folder = args.path or fixture_folder(args.cache, args.preset, args.dtype)
    rows: dict[str, list] = {ROWS[row][0]: [] for row in args.rows}
    for _ in range(args.repeats):
        for row in args.rows:
            flags = ["--size", str(args.size), "--rank", str(args.rank), "--target", args.target]
            flags += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
            flags += ["--train-text-encoder"] if args.train_text_encoder else []
            label, env = ROWS[row]
            result = run_measured([__file__, "--child", row, "--folder", str(folder), *flags], env)
            if result.returncode:
                sys.exit(result.stderr[-3000:])
            steps = json.loads(result.stdout.split("RESULT ", 1)[1])
            rows[label].append((statistics.median(steps), result.peak_rss_gb))
    source = str(args.path) if args.path else f"{args.preset} preset ({args.dtype})"
    print(
        f"\nLoRA training step, {source}, {args.size}x{args.size}, rank {args.rank}, target {args.target}"
        f"{' + CLIP attention' if args.train_text_encoder else ''}, median of {args.steps} steps x "
        f"{args.repeats} runs alternated, after {args.warmup} warm-up step(s)"
    )
    print(f"CPU: {cpu_model()}")
    print(f"{'row':<34} {'s/step':>8} {'peak RSS GB':>12}")
    for name, runs in rows.items():
        step, peak = statistics.median(s for s, _ in runs), max(r for _, r in runs)
        print(f"{name:<34} {step:>8.2f} {peak:>12.2f}")


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
