"""Everything a run writes, each file atomically (a temporary file renamed when complete): checkpoints
to resume from, the LoRA itself, the loss curve."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as safetensors_bytes

from flux1.lora.dialects import DIFFUSERS_PREFIXES
from flux1.metadata import atomic_write
from flux1.train.adapters import TrainedAdapters, kohya_tensors, peft_tensors, target_modules
from flux1.train.options import defaults

CHECKPOINT_KEY = "flux1_checkpoint"
TRAINING_KEY = "flux1_training"


class ResumeError(ValueError):
    """A checkpoint that this run cannot continue from; names the file and the difference."""


def write_safetensors(path: Path, tensors: dict[str, mx.array], metadata: dict[str, str]) -> None:
    arrays = {name: np.array(array) for name, array in tensors.items()}
    data = safetensors_bytes(arrays, metadata={"format": "pt", **metadata})
    atomic_write(Path(path), lambda f: f.write(data))


def checkpoint_path(output: Path, step: int) -> Path:
    return output.with_name(f"{output.stem}_checkpoints") / f"step_{step:06d}.safetensors"


def save_checkpoint(path: Path, trained: TrainedAdapters, optimizer, step: int, record: dict) -> None:
    """Adapters, optimizer state, the step and what the run is (options, data hash, layer names). The
    random draws of a step are a function of (seed, step), so the step is the generators' state."""
    tensors = {f"adapters.{k}": v for k, v in tree_flatten(trained.parameters())}
    tensors.update({f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)})
    record = {**record, "step": step, "layers": trained.names}
    path.parent.mkdir(exist_ok=True)
    write_safetensors(path, tensors, {CHECKPOINT_KEY: json.dumps(record)})


def load_checkpoint(path: Path, trained: TrainedAdapters, optimizer, record: dict) -> dict:
    """Put a checkpoint's adapters and optimizer state in place; returns its record (step, losses). Refused, with every
    difference named, if it was written by a run of other settings, data or layers."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            stored = f.metadata() or {}
            arrays = {name: mx.array(f.get_tensor(name)) for name in f.keys()}  # noqa: SIM118 (no __iter__)
    except (OSError, SafetensorError) as e:
        raise ResumeError(f"--resume {path}: {e}") from None
    if CHECKPOINT_KEY not in stored:
        raise ResumeError(
            f"--resume {path}: not a flux1 training checkpoint (no '{CHECKPOINT_KEY}' metadata)"
        )
    saved = json.loads(stored[CHECKPOINT_KEY])
    differences = _differences(saved, {**record, "layers": trained.names})
    if differences:
        raise ResumeError(f"--resume {path}: written by a run with other settings: {'; '.join(differences)}")
    trained.update(
        tree_unflatten([(k[len("adapters.") :], v) for k, v in arrays.items() if k.startswith("adapters.")])
    )
    optimizer.state = tree_unflatten(
        [(k[len("optimizer.") :], v) for k, v in arrays.items() if k.startswith("optimizer.")]
    )
    optimizer.init(trained.trainable_parameters())
    mx.eval(trained.parameters(), optimizer.state)
    return saved


def _differences(saved: dict, current: dict) -> list[str]:
    found = []
    for key in ("data_sha256", "layers"):
        if saved.get(key) != current.get(key):
            found.append(f"{key} differs")
    new = current.get("options", {})
    # An option added after the checkpoint was written had its default then.
    old = {**{k: v for k, v in defaults().items() if k in new}, **saved.get("options", {})}
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            found.append(
                f"--{key.replace('_', '-')} {old.get(key)} (checkpoint) vs {new.get(key)} (this run)"
            )
    return found


def latest_checkpoint(output: Path) -> Path | None:
    folder = output.with_name(f"{output.stem}_checkpoints")
    found = sorted(folder.glob("step_*.safetensors")) if folder.is_dir() else []
    return found[-1] if found else None


def peft_config(rank: int, alpha: float, modules: list[str]) -> dict:
    """The LoraConfig fields diffusers' trainer writes (what `load_lora_weights` rebuilds it from)."""
    return {
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(modules),
        "init_lora_weights": "gaussian",
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "use_rslora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def write_lora(
    path: Path, trained: TrainedAdapters, form: str, rank: int, alpha: float, target: str, record: dict
) -> None:
    """The trained LoRA: PEFT/diffusers names with `lora_adapter_metadata` packed as diffusers'
    `save_lora_weights` packs it (each network's LoraConfig keys prefixed `transformer.` or
    `text_encoder.`), or the kohya/ComfyUI layout; `flux1_training` records the run."""
    metadata = {TRAINING_KEY: json.dumps(record)}
    if form == "peft":
        tensors = peft_tensors(trained)
        config = {
            DIFFUSERS_PREFIXES[component] + k: v
            for component in trained.components
            for k, v in peft_config(rank, alpha, target_modules(component, target)).items()
        }
        metadata["lora_adapter_metadata"] = json.dumps(config, indent=2, sort_keys=True)
    else:
        tensors = kohya_tensors(trained)
        metadata.update(
            ss_network_module="networks.lora_flux", ss_network_dim=str(rank), ss_network_alpha=str(alpha)
        )
    write_safetensors(path, tensors, metadata)
