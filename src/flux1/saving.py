"""A self-contained copy of a loaded model (quantized, LoRAs baked in) that `main.py --path` loads with
no -q flag and no original weights."""

import json
import os
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx

from flux1.metadata import umask
from flux1.nn.linear import Linear
from flux1.weights import saved

COPIED = ("scheduler", "tokenizer", "tokenizer_2")


def _remove_abandoned_partials(out: Path) -> None:
    """A save killed outright (kill -9, power loss) leaves its hidden `.NAME.partial-PID-*` folder:
    removed by the next save to the same name once its process is gone."""
    for partial in out.parent.glob(f".{out.name}.partial-*"):
        pid = partial.name.removeprefix(f".{out.name}.partial-").split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save_model(flux, out: Path) -> Path:
    """Write every component of `flux` (a Flux1) into `out`, atomically: everything goes to a hidden
    temporary folder beside it, model_index.json last, renamed to `out` only when complete."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--path {out}: exists and is not an empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_partials(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-{os.getpid()}-"))
    try:
        for folder in COPIED:
            shutil.copytree(flux.files.root / folder, tmp / folder)
        for name, folder in (
            ("clip", "text_encoder"),
            ("t5", "text_encoder_2"),
            ("transformer", "transformer"),
            ("vae", "vae"),
        ):
            model = flux.load(name)
            if name == "vae":
                mx.eval(model.parameters())  # the encoder too (load() reads only what generation needs)
            for _, layer in model.named_modules():
                if isinstance(layer, Linear):
                    layer.merge_adapters()  # LoRAs baked in, then re-quantized where quantized
                    layer.to_affine()  # saved folders hold MLX affine, not GGUF blocks
            (tmp / folder).mkdir()
            (tmp / folder / "config.json").write_text(json.dumps(model.config, indent=2) + "\n")
            saved.save_component(model, tmp / folder)
            flux.release(name)  # one component in memory at a time
        index = json.loads((flux.files.root / "model_index.json").read_text())
        index["flux1"] = {
            "quantization": saved.bits_of(saved.saved_quantization(tmp / "transformer")),
            "base_model": flux.files.base_model,
            "source": flux.files.name,
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        for folder in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
            folder.chmod(0o777 & ~umask())  # as an ordinary folder; mkdtemp makes it 0700
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
