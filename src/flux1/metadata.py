"""What a generated PNG records: the full generation record as JSON (a PNG text chunk `flux1` and
the EXIF UserComment, which exiftool shows), plus an AUTOMATIC1111-style `parameters` chunk that
image sites and other tools display."""

import datetime
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import piexif
import piexif.helper
from PIL import Image, PngImagePlugin

TEXT_KEY = "flux1"


def generation_record(
    flux, seed: int, prompt: str, config, steps: int, max_length: int, seconds: float, inputs=None
) -> dict:
    """Everything that made the image, as stored in the PNG and read back by -C."""
    import flux1
    from flux1 import cpu_plan, modes
    from flux1.generation import ModeInputs

    files = flux.files
    inputs = inputs or ModeInputs()
    mode = modes.select(files.base_model, inputs)
    return {
        "prompt": prompt,
        "model": files.name,
        "gguf": str(files.transformer) if files.transformer_format == "gguf" else None,
        "base_model": files.base_model,
        "seed": seed,
        "steps": steps,
        "guidance": config.guidance_for(files.base_model),
        "height": config.height,
        "width": config.width,
        "max_sequence_length": max_length,
        "vae_tiling": config.vae_tiling or None,
        "negative_prompt": inputs.negative_prompt,
        "true_cfg_scale": inputs.true_cfg_scale,
        **_input_file("image", inputs.image),
        **_input_file("mask", inputs.mask),
        "image_strength": None if mode.DEFAULT_STRENGTH is None else inputs.strength(mode.DEFAULT_STRENGTH),
        "canny": inputs.canny or None,
        "precision": flux.precision,
        "activations": str(flux.compute_dtype("transformer")).removeprefix("mlx.core."),
        "compute": cpu_plan.describe(quantized=flux.quantization_bits is not None),
        "quantize": flux.quantization_bits,
        "group_size": flux.group_size if flux.quantize is not None else None,
        "loras": [
            {"name": Path(r.path).name, "path": r.path, "scale": r.scale, "sha256": r.sha256}
            for r in flux.lora_reports
        ],
        "generation_seconds": round(seconds, 2),
        "version": flux1.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _input_file(name: str, image) -> dict:
    """`<name>_path` (None for an image given in memory) and `<name>_sha256` (of the file)."""
    return {f"{name}_path": image and image.path, f"{name}_sha256": image and image.sha256}


def check_recorded_inputs(record: dict, source: Path, given: set[str]) -> None:
    """-C: the record's input image and mask must be where it says, unchanged (unless replaced by a
    flag given explicitly)."""
    import hashlib

    for name, flag in (("image", "--image-path"), ("mask", "--mask-path")):
        if f"{name}_path" in given:
            continue
        path, digest = record.get(f"{name}_path"), record.get(f"{name}_sha256")
        if digest and not path:
            raise ValueError(f"-C {source}: the {name} was given in memory, not as a file: pass {flag}")
        if not path:
            continue
        if not Path(path).is_file():
            raise ValueError(f"-C {source}: its {name} {path} is not there (pass {flag} to use another)")
        if hashlib.sha256(Path(path).read_bytes()).hexdigest() != digest:
            raise ValueError(
                f"-C {source}: its {name} {path} changed since (SHA-256 differs; pass {flag} to use it anyway)"
            )


def a1111_parameters(record: dict) -> str:
    fields = [
        ("Steps", record["steps"]),
        ("Sampler", "Euler (flow matching)"),
        ("Seed", record["seed"]),
        ("Size", f"{record['width']}x{record['height']}"),
        ("Model", f"FLUX.1-{record['base_model']}"),
    ]
    if record.get("guidance") is not None:
        fields.insert(2, ("Distilled CFG Scale", record["guidance"]))
    if record.get("negative_prompt") is not None and (record.get("true_cfg_scale") or 1) > 1:
        fields.insert(2, ("CFG scale", record["true_cfg_scale"]))
    if record.get("image_strength") is not None:
        fields.append(("Denoising strength", round(1 - record["image_strength"], 4)))
    if record.get("quantize"):
        fields.append(("Quantization", f"{record['quantize']}-bit"))
    for lora in record.get("loras") or []:
        fields.append(("Lora", f"{lora['name']}:{lora['scale']}"))
    fields.append(("Version", f"flux1 {record['version']}"))
    negative = f"\nNegative prompt: {record['negative_prompt']}" if record.get("negative_prompt") else ""
    return record["prompt"] + negative + "\n" + ", ".join(f"{k}: {v}" for k, v in fields)


def write_png(pixels: np.ndarray, path: Path, record: dict) -> None:
    """Write atomically: a temporary file in the same folder, renamed when complete, so a PNG that
    exists is always whole."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    info.add_text(TEXT_KEY, json.dumps(record))
    info.add_text("parameters", a1111_parameters(record))
    comment = piexif.helper.UserComment.dump(json.dumps(record), encoding="unicode")
    exif = piexif.dump({"Exif": {piexif.ExifIFD.UserComment: comment}})
    atomic_write(path, lambda f: Image.fromarray(pixels).save(f, format="PNG", pnginfo=info, exif=exif))


def write_json(record: dict, path: Path) -> None:
    atomic_write(Path(path), lambda f: f.write(json.dumps(record, indent=2).encode() + b"\n"))


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~umask())  # as an ordinary file; mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_record(path: Path) -> dict:
    """The generation record of a PNG written by flux1, or of its `--metadata` JSON."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config-from-metadata {path}: file not found")
    if path.suffix.lower() == ".json":
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"--config-from-metadata {path}: invalid JSON ({e})") from None
    try:
        with Image.open(path) as image:
            text = image.text.get(TEXT_KEY) if hasattr(image, "text") else None
    except OSError:
        raise ValueError(f"--config-from-metadata {path}: not an image or JSON file") from None
    if text is None:
        raise ValueError(f"--config-from-metadata {path}: no flux1 generation record in this image")
    return json.loads(text)
