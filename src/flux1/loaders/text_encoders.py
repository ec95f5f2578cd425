"""Load CLIP-L (`text_encoder/`) and T5 (`text_encoder_2/`) from transformers folders or flux1 saves."""

from pathlib import Path

import mlx.nn as nn

from flux1.configs import check_config
from flux1.convert.text_encoders import from_transformers_clip, from_transformers_t5
from flux1.models.clip import CLIPTextEncoder
from flux1.models.t5 import T5Encoder
from flux1.weights import saved
from flux1.weights.assign import assign_weights
from flux1.weights.safetensors_io import read_config, read_folder


def _load(model: nn.Module, folder: Path, component: str, convert) -> nn.Module:
    if saved.is_saved(folder):
        saved.load_saved_component(model, folder, component)
    else:
        assign_weights(model, convert(read_folder(folder, "model")), component)
    return model


def load_clip(folder: Path) -> CLIPTextEncoder:
    folder = Path(folder)
    model = CLIPTextEncoder(check_config("text_encoder", read_config(folder), folder / "config.json"))
    return _load(model, folder, f"CLIP text encoder ({folder})", from_transformers_clip)


def load_t5(folder: Path) -> T5Encoder:
    folder = Path(folder)
    model = T5Encoder(check_config("text_encoder_2", read_config(folder), folder / "config.json"))
    return _load(model, folder, f"T5 text encoder ({folder})", from_transformers_t5)
