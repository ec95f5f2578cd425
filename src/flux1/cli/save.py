"""save.py: write a self-contained (optionally quantized) copy of a model that main.py --path loads
with no -q flag and no original weights."""

import argparse
import gc
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from flux1.model_files import ModelFilesError, resolve
from flux1.nn.linear import Linear
from flux1.quantize import BITS, GROUP_SIZES
from flux1.weights.safetensors_io import WeightFileError

COPIED = ("scheduler", "tokenizer", "tokenizer_2")


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


def save_model(flux, out: Path) -> None:
    """Write every component of `flux` (a Flux1) into `out`, atomically: everything goes to a hidden
    temporary folder beside it, model_index.json last, renamed to `out` only when complete."""
    from flux1.weights import saved

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--path {out}: exists and is not an empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        for folder in COPIED:
            shutil.copytree(flux.files.root / folder, tmp / folder)
        for name, folder in (
            ("clip", "text_encoder"),
            ("t5", "text_encoder_2"),
            ("transformer", "transformer"),
            ("vae", "vae"),
        ):
            model = flux._model(name)
            for _, layer in model.named_modules():
                if isinstance(layer, Linear):
                    layer.merge_adapters()  # LoRAs baked in, then re-quantized where quantized
                    layer.to_affine()  # saved folders hold MLX affine, not GGUF blocks
            (tmp / folder).mkdir()
            (tmp / folder / "config.json").write_text(json.dumps(model.config, indent=2) + "\n")
            saved.save_component(model, tmp / folder)
            flux._models.pop(name)  # one component in memory at a time:
            gc.collect()
            mx.clear_cache()  # MLX keeps freed buffers for reuse; give them back before the next
        index = json.loads((flux.files.root / "model_index.json").read_text())
        index["flux1"] = {
            "quantization": saved.bits_of(saved.saved_quantization(tmp / "transformer")),
            "base_model": flux.files.base_model,
            "source": flux.files.name,
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    save_model(flux, Path(args.path))
    size = sum(f.stat().st_size for f in Path(args.path).rglob("*") if f.is_file())
    print(f"saved {args.path} ({size / 1e9:.2f} GB) in {time.perf_counter() - start:.1f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="flux1: %(message)s", level=logging.INFO)
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except (ValueError, ModelFilesError, WeightFileError, NotImplementedError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
