"""save.py: write a self-contained (optionally quantized) copy of a model that main.py --path loads
with no -q flag and no original weights."""

import argparse
import sys
import time
from pathlib import Path

from flux1.cli import run_program
from flux1.model_files import resolve
from flux1.quantize import BITS, GROUP_SIZES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="save.py", description="Save FLUX.1 (quantized) for main.py --path.")
    p.add_argument("--path", required=True, help="the folder to write (must not exist, or be empty)")
    p.add_argument("--model", "-m", help="schnell or dev from the Hugging Face hub (or a repo id)")
    p.add_argument("--source", help="a local model instead: diffusers folder, flux1 save or BFL .safetensors")
    p.add_argument("--gguf", help="a GGUF transformer file to save (its quantized layers kept as they are)")
    p.add_argument(
        "--base-model", choices=["schnell", "dev"], help="which model --source is, when it cannot tell"
    )
    p.add_argument("--quantize", "-q", type=int, choices=BITS, help="bits for transformer and text encoders")
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=64)
    p.add_argument("--lora-paths", nargs="+", help="LoRAs to bake in before quantizing")
    p.add_argument("--lora-scales", nargs="+", type=float)
    return p


def run(argv: list[str]) -> int:
    from flux1.pipeline import Flux1

    args = parser().parse_args(argv)
    if args.model and args.source:
        raise ValueError("give --model (hub) or --source (local), not both")
    files = resolve(model=args.model, path=args.source, base_model=args.base_model, gguf=args.gguf)
    flux = Flux1(
        files,
        quantize=args.quantize,
        group_size=args.group_size,
        lora_paths=args.lora_paths,
        lora_scales=args.lora_scales,
    )
    start = time.perf_counter()
    flux.save(args.path)
    size = sum(f.stat().st_size for f in Path(args.path).rglob("*") if f.is_file())
    print(f"saved {args.path} ({size / 1e9:.2f} GB) in {time.perf_counter() - start:.1f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_program(run, argv)


if __name__ == "__main__":
    sys.exit(main())
