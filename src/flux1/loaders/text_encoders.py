"""Load CLIP-L (`text_encoder/`) and T5 (`text_encoder_2/`) from transformers folders or flux1 saves."""

from pathlib import Path

import mlx.nn as nn

from flux1.models.clip import CLIPTextEncoder
from flux1.models.t5 import T5Encoder
from flux1.weights import saved
from flux1.weights.assign import assign_weights
from flux1.weights.safetensors_io import Tensors, read_config, read_folder

# transformers 4 writes CLIP keys under `text_model.`; transformers 5 drops the prefix.
_CLIP_PREFIX = "text_model."
# Buffers some writers store that are recomputed here, not weights.
_CLIP_BUFFERS = ("embeddings.position_ids",)
# The real T5 files store the tied input embedding as `shared` and/or `encoder.embed_tokens`.
_T5_TIED = "encoder.embed_tokens.weight"


def _load(model: nn.Module, folder: Path, component: str, convert) -> nn.Module:
    if saved.is_saved(folder):
        saved.load_saved_component(model, folder, component)
    else:
        assign_weights(model, convert(read_folder(folder, "model")), component)
    return model


def from_transformers_clip(tensors: Tensors) -> Tensors:
    out = Tensors(metadata=tensors.metadata)
    for name in tensors.names():
        array, origin = tensors.pop(name)
        name = name.removeprefix(_CLIP_PREFIX)
        if name not in _CLIP_BUFFERS:
            out.add(name, array, origin)
    return out


def from_transformers_t5(tensors: Tensors) -> Tensors:
    if _T5_TIED in tensors:
        array, origin = tensors.pop(_T5_TIED)
        if "shared.weight" not in tensors:
            tensors.add("shared.weight", array, origin)
    return tensors


def load_clip(folder: Path) -> CLIPTextEncoder:
    folder = Path(folder)
    model = CLIPTextEncoder(read_config(folder))
    return _load(model, folder, f"CLIP text encoder ({folder})", from_transformers_clip)


def load_t5(folder: Path) -> T5Encoder:
    folder = Path(folder)
    model = T5Encoder(read_config(folder))
    return _load(model, folder, f"T5 text encoder ({folder})", from_transformers_t5)
