"""main.py: generate images with FLUX.1 (flags follow mflux's where they exist)."""

import argparse
import logging
import random
import sys
import tempfile
from pathlib import Path

from flux1.backend import PRECISIONS
from flux1.configs import REPOS
from flux1.model_files import ModelFilesError
from flux1.quantize import BITS, GROUP_SIZES
from flux1.weights.safetensors_io import WeightFileError

# Flags that -C may fill from a record; an explicitly given flag wins.
FROM_RECORD = {
    "prompt": "prompt",
    "model": "model",
    "base_model": "base_model",
    "seed": "seed",
    "steps": "steps",
    "guidance": "guidance",
    "height": "height",
    "width": "width",
    "quantize": "quantize",
    "max_sequence_length": "max_sequence_length",
    "gguf": "gguf",
    "negative_prompt": "negative_prompt",
    "true_cfg_scale": "true_cfg_scale",
    "image_path": "image_path",
    "mask_path": "mask_path",
    "image_strength": "image_strength",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="main.py", description="Generate images with FLUX.1 schnell or dev in MLX."
    )
    source = p.add_argument_group("model")
    source.add_argument(
        "--model", "-m", help="schnell, dev, fill or kontext (from the Hugging Face hub), or a hub repo id"
    )
    source.add_argument(
        "--path", help="a local diffusers folder, a folder saved by save.py, or a BFL .safetensors file"
    )
    source.add_argument(
        "--gguf", help="a GGUF transformer file (other components from --path, --model or the hub)"
    )
    source.add_argument(
        "--base-model", choices=list(REPOS), help="which model --path is, when it cannot tell"
    )
    source.add_argument(
        "--quantize", "-q", type=int, choices=BITS, help="quantize transformer and text encoders to N bits"
    )
    source.add_argument(
        "--group-size", type=int, choices=GROUP_SIZES, default=64, help="quantization group size"
    )
    source.add_argument("--lora-paths", nargs="+", default=None, help="LoRA files to apply")
    source.add_argument(
        "--lora-scales", nargs="+", type=float, default=None, help="one scale per LoRA (default 1.0)"
    )
    source.add_argument(
        "--lora-lenient",
        action="store_true",
        help="warn about LoRA keys that match no layer instead of failing",
    )
    source.add_argument(
        "--low-ram", action="store_true", help="load each model just before use and release it after"
    )
    source.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="activation dtype: auto (fp32 on the CPU kernels, the weights' dtype on MLX's), fp32 or bf16",
    )
    prompt = p.add_argument_group("prompt")
    prompt.add_argument("--prompt", help="what to draw")
    prompt.add_argument("--prompt-file", help="a text file with one prompt per line (one image each)")
    prompt.add_argument("--max-sequence-length", type=int, help="T5 tokens (default 256 schnell, 512 dev)")
    prompt.add_argument("--negative-prompt", help="what not to draw (needs --true-cfg-scale above 1)")
    prompt.add_argument(
        "--true-cfg-scale",
        type=float,
        default=1.0,
        help="true CFG scale; above 1 runs the negative prompt too",
    )
    image = p.add_argument_group("image")
    image.add_argument("--seed", type=int, nargs="+", help="one image per seed (default: a random seed)")
    image.add_argument("--auto-seeds", type=int, help="N images with random seeds")
    image.add_argument("--height", type=int, help="pixels, a multiple of 16 (default 1024)")
    image.add_argument("--width", type=int, help="pixels, a multiple of 16 (default 1024)")
    image.add_argument("--steps", type=int, help="denoising steps (default 4 schnell, 25 dev)")
    image.add_argument("--guidance", type=float, help="guidance scale, dev only (default 3.5)")
    image.add_argument(
        "--latents", help="initial noise as .npy of shape (1, 16, H/8, W/8) instead of the seed's"
    )
    image.add_argument("--image-path", help="input image: img2img, inpainting, Fill, Kontext's reference")
    image.add_argument(
        "--mask-path", "--masked-image-path", help="inpainting mask, white = repaint (same size as the image)"
    )
    image.add_argument(
        "--image-strength", type=float, help="how much of the input image is kept, 0 to 1 (default 0.4)"
    )
    out = p.add_argument_group("output")
    out.add_argument("--output", default="image.png", help="PNG path (default image.png; never overwritten)")
    out.add_argument(
        "--metadata", action="store_true", help="also write <output>.json with the generation record"
    )
    out.add_argument("--config-from-metadata", "-C", help="re-run from a PNG written by flux1 or its JSON")
    return p


def _apply_record(args: argparse.Namespace, given: set[str]) -> None:
    from flux1.metadata import check_recorded_inputs, read_record

    record = read_record(Path(args.config_from_metadata))
    check_recorded_inputs(record, Path(args.config_from_metadata), given)
    for key, dest in FROM_RECORD.items():
        if dest not in given and record.get(key) is not None:
            value = record[key]
            setattr(args, dest, [value] if dest == "seed" else value)
    if "model" not in given and "path" not in given and record.get("model") not in ("schnell", "dev", None):
        args.path, args.model = record["model"], None


def _given_flags(argv: list[str], p: argparse.ArgumentParser) -> set[str]:
    options = {opt: action.dest for action in p._actions for opt in action.option_strings}
    return {options[a.split("=")[0]] for a in argv if a.split("=")[0] in options}


def _prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt_file:
        file = Path(args.prompt_file)
        if not file.is_file():
            raise ValueError(f"--prompt-file {file}: file not found")
        prompts = [line.strip() for line in file.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"--prompt-file {file}: no prompts (one per line expected)")
        return prompts
    if not args.prompt:
        raise ValueError("--prompt (or --prompt-file) is required")
    return [args.prompt]


def _seeds(args: argparse.Namespace) -> list[int]:
    if args.auto_seeds is not None:
        if args.auto_seeds < 1:
            raise ValueError(f"--auto-seeds {args.auto_seeds}: expected at least 1")
        return [random.randrange(2**31) for _ in range(args.auto_seeds)]
    return args.seed or [random.randrange(2**31)]


def output_paths(output: Path, prompts: int, seeds: list[int]) -> list[list[Path]]:
    """[prompt][seed] -> path. Several images carry their seed (and prompt index) in the name; a name
    that exists already gets the first free `_1`, `_2`, ... suffix: nothing is overwritten."""
    stem, suffix = output.stem, output.suffix or ".png"
    taken: set[Path] = set()

    def free(path: Path) -> Path:
        candidate, n = path, 0
        while candidate.exists() or candidate in taken or candidate.with_suffix(".json") in taken:
            n += 1
            candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
        taken.add(candidate)
        return candidate

    paths = []
    for i in range(prompts):
        row = []
        for seed in seeds:
            name = stem + (f"_{i + 1}" if prompts > 1 else "") + (f"_seed_{seed}" if len(seeds) > 1 else "")
            row.append(free(output.with_name(name + suffix)))
        paths.append(row)
    return paths


def _check_writable(output: Path) -> None:
    """Before any work: the output folder exists and takes a file."""
    if not output.parent.is_dir():
        raise ValueError(f"--output {output}: folder {output.parent} does not exist")
    try:
        tempfile.TemporaryFile(dir=output.parent).close()
    except OSError as e:
        raise ValueError(f"--output {output}: cannot write in {output.parent} ({e.strerror})") from None


def run(argv: list[str]) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.config_from_metadata:
        _apply_record(args, _given_flags(argv, p))
    from flux1 import backend
    from flux1.generation import Config, ModeInputs, check_lora_options
    from flux1.latents import check_seed, load_noise
    from flux1.modes import sized_for_image
    from flux1.pipeline import Flux1

    prompts, seeds = _prompts(args), _seeds(args)
    for seed in seeds:
        check_seed(seed)
    config = Config(
        num_inference_steps=args.steps,
        height=1024 if args.height is None else args.height,
        width=1024 if args.width is None else args.width,
        guidance=args.guidance,
        max_sequence_length=args.max_sequence_length,
    )
    backend.compute_dtype(precision=args.precision)
    check_lora_options(args.lora_paths or [], args.lora_scales or [1.0] * len(args.lora_paths or []))
    output = Path(args.output)
    _check_writable(output)
    inputs = ModeInputs(
        args.negative_prompt, args.true_cfg_scale, args.image_path, args.mask_path, args.image_strength
    )
    options = dict(
        quantize=args.quantize,
        group_size=args.group_size,
        lora_paths=args.lora_paths,
        lora_scales=args.lora_scales,
        low_ram=args.low_ram,
        lora_strict=not args.lora_lenient,
        precision=args.precision,
    )
    from flux1.model_files import resolve

    if args.path:
        files = resolve(path=args.path, base_model=args.base_model or args.model, gguf=args.gguf)
    else:
        files = resolve(model=args.model, base_model=args.base_model, gguf=args.gguf)
    config = sized_for_image(config, files.base_model, inputs, args.height, args.width)
    noise = load_noise(Path(args.latents), config.height, config.width) if args.latents else None
    flux = Flux1(files, **options)
    if args.guidance is not None and flux.files.base_model == "schnell":
        logging.getLogger("flux1").warning("--guidance is ignored: FLUX.1-schnell has no guidance input")
    for prompt, row in zip(prompts, output_paths(output, len(prompts), seeds)):
        for seed, path in zip(seeds, row):
            result = flux.generate_image(seed, prompt, config, latents=noise, **vars(inputs))
            result.save(path, export_json=args.metadata)
            print(f"saved {path} (seed {seed}; {result.timings.line()})")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="flux1: %(message)s", level=logging.INFO)
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except (
        ValueError,
        ModelFilesError,
        WeightFileError,
        FileExistsError,
        FileNotFoundError,
        NotImplementedError,
        PermissionError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
