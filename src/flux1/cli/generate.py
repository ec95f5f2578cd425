"""main.py: generate images with FLUX.1 (flags follow mflux's where they exist)."""

import argparse
import copy
import json
import logging
import os
import random
import sys
import tempfile
from pathlib import Path

from flux1.backend import PRECISIONS
from flux1.cli import add_model_source, run_program
from flux1.configs import MAX_SEQUENCE_LENGTH
from flux1.quantize import BITS, GROUP_SIZES

# Flags that -C fills from a record (record key -> flag dest); an explicitly given flag wins.
FROM_RECORD = {
    "prompt": "prompt",
    "base_model": "base_model",
    "seed": "seed",
    "steps": "steps",
    "guidance": "guidance",
    "height": "height",
    "width": "width",
    "quantize": "quantize",
    "group_size": "group_size",
    "max_sequence_length": "max_sequence_length",
    "vae_tiling": "vae_tiling",
    "gguf": "gguf",
    "negative_prompt": "negative_prompt",
    "true_cfg_scale": "true_cfg_scale",
    "image_path": "image_path",
    "mask_path": "mask_path",
    "image_strength": "image_strength",
    "canny": "canny",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="main.py", description="Generate images with FLUX.1 schnell or dev in MLX."
    )
    source = p.add_argument_group("model")
    add_model_source(source)
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
        "--tensor-parallel",
        action="store_true",
        help="under mlx.launch: split the transformer's layers across the ranks (default: split the images)",
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
    # "--step" spelled out: otherwise that abbreviation would also match --stepwise-image-output-dir
    image.add_argument(
        "--steps", "--step", type=int, help="denoising steps (default: the model's, 4 schnell, 25 dev)"
    )
    image.add_argument(
        "--guidance", type=float, help="guidance scale, not schnell (default: the model's, 3.5 dev)"
    )
    image.add_argument(
        "--latents", help="initial noise as .npy of shape (1, 16, H/8, W/8) instead of the seed's"
    )
    image.add_argument(
        "--image-path",
        help="input image: img2img, inpainting, Fill, Kontext's reference, Canny's or Depth's control image",
    )
    image.add_argument(
        "--mask-path", "--masked-image-path", help="inpainting mask, white = repaint (same size as the image)"
    )
    image.add_argument(
        "--image-strength", type=float, help="how much of the input image is kept, 0 to 1 (default 0.4)"
    )
    image.add_argument(
        "--canny",
        action="store_true",
        help="FLUX.1 Canny: the control image is --image-path's Canny edges (OpenCV's, thresholds 50, 200)",
    )
    image.add_argument(
        "--vae-tiling",
        action="store_true",
        help="decode (and encode) in overlapping tiles, as diffusers' enable_tiling: large images in less memory",
    )
    image.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="images per batch through the text encoders and the transformer (default 1)",
    )
    out = p.add_argument_group("output")
    out.add_argument("--output", default="image.png", help="PNG path (default image.png; never overwritten)")
    out.add_argument(
        "--metadata", action="store_true", help="also write <output>.json with the generation record"
    )
    out.add_argument("--config-from-metadata", "-C", help="re-run from a PNG written by flux1 or its JSON")
    out.add_argument(
        "--stepwise-image-output-dir",
        help="a new or empty folder: an image of each step's predicted clean latents, and a strip of them",
    )
    out.add_argument(
        "--preview",
        choices=["vae", "latent"],
        help="step images decoded by the VAE (vae, the default: exact, one decode per step) or mapped "
        "from the latents (latent: 1/8 size, no VAE)",
    )
    return p


def _apply_record(args: argparse.Namespace, given: set[str]) -> None:
    """Every setting that determined the pixels, from the record, unless given as a flag. What cannot
    be reproduced (a LoRA, latents, image or mask file that is gone or changed) is refused, naming it."""
    from flux1.lora.apply import file_digest
    from flux1.metadata import check_recorded_inputs, read_record

    source = args.config_from_metadata
    record = read_record(Path(source))
    _check_record_types(record, source)
    check_recorded_inputs(record, Path(source), given)
    for key, dest in FROM_RECORD.items():
        if dest not in given and record.get(key) is not None:
            value = record[key]
            setattr(args, dest, [value] if dest == "seed" else value)
    if "precision" not in given and record.get("precision") in PRECISIONS:
        args.precision = record["precision"]
    model = record.get("model")
    if not given & {"model", "path"} and isinstance(model, str):
        args.path, args.model = (model, None) if Path(model).is_absolute() else (None, model)
    if "lora_paths" not in given and record.get("loras"):
        loras = record["loras"]
        for lora in loras:
            path = Path(str(lora.get("path")))
            if not path.is_file():
                raise ValueError(f"-C {source}: the image was made with LoRA {path}, which is not there")
            if file_digest(path) != lora.get("sha256"):
                raise ValueError(
                    f"-C {source}: LoRA {path} changed since the image was made (sha256 differs)"
                )
        args.lora_paths = [str(lora["path"]) for lora in loras]
        args.lora_scales = (
            args.lora_scales if "lora_scales" in given else [lora.get("scale") for lora in loras]
        )
    if "latents" not in given and record.get("latents"):
        latents = record["latents"]
        path = Path(str(latents.get("path")))
        if not path.is_file() or file_digest(path) != latents.get("sha256"):
            raise ValueError(
                f"-C {source}: the image was made from --latents {path}, which is gone or changed"
            )
        args.latents = str(path)


# The type each record value must have (None: absent); what the values mean is checked by Config & co.
_NUMBER, _WHOLE, _TEXT = ((int, float), "a number"), (int, "a whole number"), (str, "text")
_RECORD_TYPES = {  # the type each record value must have (None: absent), and its name in a message
    "prompt": _TEXT,
    "model": _TEXT,
    "base_model": _TEXT,
    "seed": _WHOLE,
    "steps": _WHOLE,
    "guidance": _NUMBER,
    "height": _WHOLE,
    "width": _WHOLE,
    "quantize": ((int, str), "a whole number or text"),
    "group_size": _WHOLE,
    "max_sequence_length": _WHOLE,
    "gguf": _TEXT,
    "precision": _TEXT,
    "negative_prompt": _TEXT,
    "true_cfg_scale": _NUMBER,
    "image_path": _TEXT,
    "image_sha256": _TEXT,
    "mask_path": _TEXT,
    "mask_sha256": _TEXT,
    "image_strength": _NUMBER,
    "canny": (bool, "true or false"),
    "vae_tiling": (bool, "true or false"),
    "loras": (list, "a list"),
    "latents": (dict, "a file entry"),
}
_FILE_ENTRY = {"path": str, "sha256": str}


def _check_record_types(record, source) -> None:
    def fail(what: str, value, expected: str):
        raise ValueError(f"-C {source}: '{what}' is {json.dumps(value)[:60]}, expected {expected}")

    if not isinstance(record, dict):
        raise ValueError(f"-C {source}: the record is not a JSON object")
    for key, (kind, name) in _RECORD_TYPES.items():
        value = record.get(key)
        if value is not None and (
            not isinstance(value, kind) or isinstance(value, bool) is not (kind is bool)
        ):
            fail(key, value, name)
    entries = [("latents", record["latents"])] if record.get("latents") else []
    entries += [("loras", lora) for lora in record.get("loras") or []]
    for key, entry in entries:
        if not isinstance(entry, dict) or any(
            not isinstance(entry.get(k), t) for k, t in _FILE_ENTRY.items()
        ):
            fail(key, entry, "a file entry with a path and a sha256")
        scale = entry.get("scale", 1.0)
        if key == "loras" and (isinstance(scale, bool) or not isinstance(scale, int | float)):
            fail("loras", entry, "a scale that is a number")


def _given_flags(argv: list[str], p: argparse.ArgumentParser) -> set[str]:
    """The destinations of the flags given on the command line, in any spelling (abbreviated, -q8)."""
    quiet = copy.deepcopy(p)
    for action in quiet._actions:
        action.default, action.required = argparse.SUPPRESS, False
    return set(vars(quiet.parse_args(argv)))


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


def output_file(output: str) -> Path:
    """--output as the PNG to write: a folder (existing, or written with a trailing /) gets
    `image.png` inside it; any other name must end in .png (flux1 writes PNG, whatever the name says)."""
    path = Path(output)
    if output.endswith(("/", os.sep)) or path.is_dir():
        return path / "image.png"
    if path.suffix.lower() != ".png":
        raise ValueError(f"--output {output}: flux1 writes PNG images; give a name ending in .png")
    return path


def output_paths(output: Path, prompts: int, seeds: list[int], sidecar: bool = False) -> list[list[Path]]:
    """[prompt][seed] -> path. Several images carry their seed (and prompt index) in the name; a name
    that exists already (or whose `.json` exists, with `sidecar`) gets the first free `_1`, `_2`, ...
    suffix: nothing is overwritten."""
    stem, suffix = output.stem, output.suffix
    taken: set[Path] = set()

    def used(path: Path) -> bool:
        return path.exists() or path in taken or (sidecar and path.with_suffix(".json").exists())

    def free(path: Path) -> Path:
        candidate, n = path, 0
        while used(candidate):
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
    from flux1 import backend, stepwise
    from flux1.batch import batch_size_for, generate_batch
    from flux1.distributed.agreement import agree
    from flux1.distributed.ranks import world
    from flux1.distributed.work import run_work
    from flux1.generation import Config, ModeInputs, check_fits, check_lora_options
    from flux1.latents import check_seed, load_noise
    from flux1.lora.apply import file_digest
    from flux1.modes import sized_for_image, true_cfg
    from flux1.pipeline import Flux1

    prompts, seeds = _prompts(args), _seeds(args)
    batch_size = batch_size_for(args.batch_size, len(prompts) * len(seeds))
    for seed in seeds:
        check_seed(seed)
    config = Config(
        num_inference_steps=args.steps,
        height=1024 if args.height is None else args.height,
        width=1024 if args.width is None else args.width,
        guidance=args.guidance,
        max_sequence_length=args.max_sequence_length,
        vae_tiling=args.vae_tiling,
    )
    rows = true_cfg.rows(args, batch_size)  # args: the flags ModeInputs takes
    check_fits(config, config.max_sequence_length or max(MAX_SEQUENCE_LENGTH.values()), rows)
    backend.compute_dtype(precision=args.precision)
    check_lora_options(args.lora_paths or [], args.lora_scales or [1.0] * len(args.lora_paths or []))
    output = output_file(args.output)
    _check_writable(output)
    inputs = ModeInputs(
        args.negative_prompt,
        args.true_cfg_scale,
        args.image_path,
        args.mask_path,
        args.image_strength,
        args.canny,
    )
    stepwise_dir = Path(args.stepwise_image_output_dir) if args.stepwise_image_output_dir else None
    if args.preview and stepwise_dir is None:
        raise ValueError(f"--preview {args.preview}: needs --stepwise-image-output-dir")
    if stepwise_dir is not None:
        stepwise.check_folder(stepwise_dir)
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
    if noise is not None:
        latents_record = {"path": str(Path(args.latents).resolve()), "sha256": file_digest(args.latents)}
    group = world() if world().size() > 1 else None  # under mlx.launch: several ranks
    if group is None and args.tensor_parallel:
        logging.getLogger("flux1").warning(
            "--tensor-parallel needs several processes (mlx.launch -n N): one runs all"
        )
    if group is not None:
        agree({"settings": vars(args)}, group)
    flux = Flux1(files, **options, group=group, tensor_parallel=group is not None and args.tensor_parallel)
    if args.guidance is not None and flux.files.base_model == "schnell":
        logging.getLogger("flux1").warning("--guidance is ignored: FLUX.1-schnell has no guidance input")

    def work() -> list[tuple[list]]:
        paths = output_paths(output, len(prompts), seeds, args.metadata)
        items = [(p, s, str(path)) for p, row in zip(prompts, paths) for s, path in zip(seeds, row)]
        return [(items[i : i + batch_size],) for i in range(0, len(items), batch_size)]

    latent_map = []  # the latent preview's map, fitted once

    def step_writer(path: str) -> stepwise.StepwiseWriter:
        mode = args.preview or "vae"
        if mode == "latent" and not latent_map:
            latent_map.append(stepwise.fitted_map(flux))
        folder = stepwise_dir if len(prompts) * len(seeds) == 1 else stepwise_dir / Path(path).stem
        return stepwise.StepwiseWriter(flux, config, folder, mode, latent_map[0] if latent_map else None)

    def generate(chunk: list, keep: bool) -> None:
        writers = [step_writer(path) if stepwise_dir is not None and keep else None for *_, path in chunk]
        if len(chunk) == 1:
            (prompt, seed, _), writer = chunk[0], writers[0]
            results = [
                flux.generate_image(seed, prompt, config, latents=noise, on_step=writer, **vars(inputs))
            ]
        else:
            on_step = (lambda n, step: writers[n](step)) if writers[0] is not None else None
            results = generate_batch(
                flux, [(p, s) for p, s, _ in chunk], config, noise, on_step=on_step, inputs=inputs
            )
        for (_, seed, path), result, writer in zip(chunk, results, writers):
            if noise is not None:
                result.record["latents"] = latents_record
            if keep:
                result.save(path, export_json=args.metadata)
                print(f"saved {path} (seed {seed}; {result.timings.line()})")
            if writer is None:
                continue
            strip = writer.finish()
            print(
                f"step previews ({writer.mode}) in {writer.folder}, strip {strip.name}: {writer.seconds:.2f}s"
            )

    run_work(work, generate, group, args.tensor_parallel)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_program(run, argv)


if __name__ == "__main__":
    sys.exit(main())
