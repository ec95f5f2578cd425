"""Every setting of a training run, checked before any work; the settings a checkpoint must share to be resumed."""

import json
import math
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from flux1.train.adapters import TARGETS
from flux1.train.data import check_resolution
from flux1.train.objective import SCHEMES

SCHEDULES = ("constant", "linear", "cosine")
FORMATS = ("peft", "kohya")
# May differ between a checkpoint and the run resuming it: they change no step's result.
RESUMABLE_CHANGES = {
    "steps",
    "validation_prompt",
    "validation_every",
    "validation_steps",
    "checkpoint_every",
    "resume",
    "output",
    "format",
    "low_ram",
    "config",
}


@dataclass
class TrainOptions:
    data: str
    output: str
    model: str | None = None
    path: str | None = None
    gguf: str | None = None
    base_model: str | None = None
    quantize: int | None = None
    group_size: int = 64
    low_ram: bool = False
    resolution: int = 512
    rank: int = 16
    alpha: float | None = None  # None: the rank (scale 1), as diffusers' trainer
    target: str = "attention"
    train_text_encoder: bool = False  # CLIP-L's attention layers too (diffusers' --train_text_encoder)
    text_encoder_lr: float = 5e-6
    text_encoder_weight_decay: float = 1e-3  # diffusers' --adam_weight_decay_text_encoder
    steps: int = 1000
    batch_size: int = 1
    gradient_accumulation: int = 1
    learning_rate: float = 1e-4
    lr_schedule: str = "constant"
    lr_warmup_steps: int = 0
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    seed: int = 0
    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    guidance: float = 3.5
    max_sequence_length: int = 512
    validation_prompt: str | None = None
    validation_every: int | None = None
    validation_steps: int | None = None
    checkpoint_every: int | None = None
    resume: str | None = None
    format: str = "peft"
    config: str | None = None

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def check(self) -> None:
        """Every bad value, named with its flag, before anything is loaded."""
        check_resolution(self.resolution)
        for flag, value in (
            ("rank", self.rank),
            ("steps", self.steps),
            ("batch-size", self.batch_size),
            ("gradient-accumulation", self.gradient_accumulation),
            ("max-sequence-length", self.max_sequence_length),
        ):
            if value < 1:
                raise ValueError(f"--{flag} {value}: expected a whole number of at least 1")
        for flag, value in (
            ("validation-every", self.validation_every),
            ("checkpoint-every", self.checkpoint_every),
        ):
            if value is not None and value < 1:
                raise ValueError(f"--{flag} {value}: expected a whole number of at least 1")
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"--alpha {self.alpha}: expected a positive number")
        for flag, value in (("learning-rate", self.learning_rate), ("text-encoder-lr", self.text_encoder_lr)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"--{flag} {value}: expected a positive number")
        for flag in ("text-encoder-lr", "text-encoder-weight-decay"):
            name = flag.replace("-", "_")
            value = getattr(self, name)
            if not self.train_text_encoder and value != defaults()[name]:
                raise ValueError(f"--{flag} {value}: only used with --train-text-encoder")
        for flag, value in (
            ("weight-decay", self.weight_decay),
            ("text-encoder-weight-decay", self.text_encoder_weight_decay),
        ):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--{flag} {value}: expected 0 or more")
        if self.lr_warmup_steps < 0:
            raise ValueError(f"--lr-warmup-steps {self.lr_warmup_steps}: expected 0 or more")
        for flag, value, allowed in (
            ("target", self.target, tuple(TARGETS)),
            ("lr-schedule", self.lr_schedule, SCHEDULES),
            ("weighting-scheme", self.weighting_scheme, SCHEMES),
            ("format", self.format, FORMATS),
        ):
            if value not in allowed:
                raise ValueError(f"--{flag} {value}: expected one of {', '.join(allowed)}")
        if not (self.model or self.path or self.gguf):
            raise ValueError("--model, --path or --gguf is required: the base model to train on")
        output = Path(self.output)
        if output.suffix != ".safetensors":
            raise ValueError(f"--output {output}: expected a .safetensors file name")
        if output.exists():
            raise FileExistsError(f"--output {output} exists; flux1 never overwrites a file")
        if not output.parent.is_dir():
            raise ValueError(f"--output {output}: folder {output.parent} does not exist")
        if self.resume and not Path(self.resume).is_file():
            raise ValueError(f"--resume {self.resume}: file not found")

    def record(self) -> dict:
        return asdict(self)

    def identity(self) -> dict:
        """The settings that decide every step's result (a resumed run must share them)."""
        return {k: v for k, v in self.record().items() if k not in RESUMABLE_CHANGES}


def field_names() -> list[str]:
    return [f.name for f in fields(TrainOptions)]


def defaults() -> dict:
    """Each option's default (the data and output have none)."""
    return {f.name: f.default for f in fields(TrainOptions) if f.default is not MISSING}


def read_config(path: Path) -> dict:
    """`--config FILE.json`: keys are the flags' names (`learning_rate` or `learning-rate`)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"--config {path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--config {path}: invalid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"--config {path}: expected a JSON object of flag names and values")
    config = {k.replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(config) - set(field_names()) - {"config"})
    if unknown:
        raise ValueError(
            f"--config {path}: unknown keys {', '.join(unknown)} (expected flag names of train.py)"
        )
    return config
