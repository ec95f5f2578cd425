"""train.py: fine-tune a LoRA of FLUX.1 on your own images. Every flag is also a key of `--config FILE.json`;
flags given on the command line win."""

import argparse

from flux1.cli import add_model_source, run_program
from flux1.quantize import BITS, GROUP_SIZES
from flux1.train.adapters import TARGETS
from flux1.train.objective import SCHEMES
from flux1.train.options import FORMATS, SCHEDULES, TrainOptions, read_config


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py", description="Train a FLUX.1 LoRA on images with captions, in MLX."
    )
    p.add_argument("--config", help="a JSON file of flag names and values (flags given here win)")
    base = p.add_argument_group("base model (as main.py)")
    add_model_source(base)
    base.add_argument("--quantize", "-q", type=int, choices=BITS, help="quantize the frozen base to N bits")
    base.add_argument(
        "--group-size", type=int, choices=GROUP_SIZES, help="quantization group size (default 64)"
    )
    base.add_argument(
        "--low-ram", action="store_true", default=None, help="release the VAE after each validation image"
    )
    data = p.add_argument_group("data")
    data.add_argument(
        "--data", help="folder of images with a same-name .txt caption each, or a metadata.jsonl"
    )
    data.add_argument(
        "--resolution",
        type=int,
        help="training area, a multiple of 16 (default 512: 512x512 pixels, aspect-ratio buckets)",
    )
    data.add_argument("--max-sequence-length", type=int, help="T5 tokens of the captions (default 512)")
    lora = p.add_argument_group("LoRA")
    lora.add_argument("--rank", type=int, help="LoRA rank (default 16)")
    lora.add_argument("--alpha", type=float, help="LoRA alpha (default: the rank, scale 1)")
    lora.add_argument(
        "--target",
        choices=list(TARGETS),
        help="layers to train (default attention: to_q, to_k, to_v, to_out.0)",
    )
    lora.add_argument(
        "--train-text-encoder",
        action="store_true",
        default=None,
        help="also train adapters on CLIP-L's attention layers (q, k, v, out_proj); T5 stays frozen",
    )
    run = p.add_argument_group("optimization")
    run.add_argument("--steps", type=int, help="optimizer steps (default 1000)")
    run.add_argument("--batch-size", type=int, help="images per micro-batch (default 1)")
    run.add_argument("--gradient-accumulation", type=int, help="micro-batches per step (default 1)")
    run.add_argument("--learning-rate", type=float, help="AdamW peak learning rate (default 1e-4)")
    run.add_argument("--lr-schedule", choices=SCHEDULES, help="after warm-up (default constant)")
    run.add_argument("--lr-warmup-steps", type=int, help="linear warm-up steps (default 0)")
    run.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 1e-4)")
    run.add_argument(
        "--text-encoder-lr",
        type=float,
        help="CLIP adapters' peak learning rate, same schedule (default 5e-6)",
    )
    run.add_argument(
        "--text-encoder-weight-decay", type=float, help="CLIP adapters' AdamW weight decay (default 1e-3)"
    )
    run.add_argument("--max-grad-norm", type=float, help="gradient clipping, 0 for none (default 1.0)")
    run.add_argument(
        "--weighting-scheme",
        choices=SCHEMES,
        help="timestep density and loss weighting (default logit_normal)",
    )
    run.add_argument("--logit-mean", type=float, help="logit_normal mean (default 0)")
    run.add_argument("--logit-std", type=float, help="logit_normal std (default 1)")
    run.add_argument("--mode-scale", type=float, help="mode scheme scale (default 1.29)")
    run.add_argument(
        "--guidance", type=float, help="dev's guidance embedding while training and validating (default 3.5)"
    )
    run.add_argument(
        "--seed", type=int, help="seed of initialisation, batches, noise and timesteps (default 0)"
    )
    out = p.add_argument_group("output")
    out.add_argument(
        "--output",
        help="the LoRA file (.safetensors); checkpoints, loss curve and validation images beside it",
    )
    out.add_argument(
        "--format", choices=FORMATS, help="peft (diffusers names, default) or kohya (kohya/ComfyUI)"
    )
    out.add_argument("--validation-prompt", help="draw this prompt during and after training")
    out.add_argument("--validation-every", type=int, help="every N steps (default: only at the end)")
    out.add_argument(
        "--validation-steps",
        type=int,
        help="denoising steps of validation images (default 4 schnell, 25 dev)",
    )
    out.add_argument("--checkpoint-every", type=int, help="write a checkpoint every N steps")
    out.add_argument("--resume", help="continue from a checkpoint written by a run of the same settings")
    return p


def options_from(argv: list[str]) -> TrainOptions:
    args = parser().parse_args(argv)
    values = read_config(args.config) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if v is not None})
    for flag in ("data", "output"):
        if not values.get(flag):
            raise ValueError(f"--{flag} is required (on the command line or in --config)")
    return TrainOptions(**values)


def main(argv: list[str] | None = None) -> int:
    def run(arguments: list[str]) -> int:
        from flux1.train.trainer import Run

        Run(options_from(arguments)).train()
        return 0

    return run_program(
        run, argv, interrupted="no LoRA file was written; --resume continues from a checkpoint"
    )
