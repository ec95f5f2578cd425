"""Each LoRA dialect's key spelling -> (component, layer name as the target table knows it, role).

Prefixes say the dialect and the network; suffixes say what a tensor is. What matches nothing is
returned as unmatched, never dropped."""

import re
from dataclasses import dataclass

# prefix -> (dialect, component, separator of the layer name that follows)
PREFIXES = [
    ("lora_unet_", "kohya", "transformer", "_"),
    ("lora_transformer_", "OneTrainer", "transformer", "_"),
    ("lycoris_", "LyCORIS", "transformer", "_"),
    ("lora_te1_", "kohya", "clip", "_"),
    ("lora_te2_", "OneTrainer", "t5", "_"),
    ("lora_te3_", "kohya", "t5", "_"),
    ("text_encoders.clip_l.transformer.", "ComfyUI", "clip", "."),
    ("text_encoders.t5xxl.transformer.", "ComfyUI", "t5", "."),
    ("model.diffusion_model.", "ComfyUI", "transformer", "."),
    ("diffusion_model.", "ComfyUI", "transformer", "."),
    ("transformer.", "diffusers", "transformer", "."),
    ("text_encoder_2.", "diffusers", "t5", "."),
    ("text_encoder.", "diffusers", "clip", "."),
    ("", "diffusers", "transformer", "."),
]
# The prefix of each flux1 network in diffusers' pipeline-level files (`save_lora_weights`: tensor names and the
# keys of its `lora_adapter_metadata`).
DIFFUSERS_PREFIXES = {"transformer": "transformer.", "clip": "text_encoder.", "t5": "text_encoder_2."}
# suffix -> role; longest first so `.lora_B.bias` wins over `.lora_B`
ROLES = {
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_B.bias": "up_bias",
    ".lora_A": "down",
    ".lora_B": "up",
    ".down.weight": "down",
    ".up.weight": "up",
    ".alpha": "alpha",
    ".dora_scale": "dora",
    ".lora_magnitude_vector.weight": "magnitude",
    ".lora_magnitude_vector": "magnitude",
    ".diff_b": "diff_b",
    ".diff": "diff",
    ".hada_w1_a": "hada_w1_a",
    ".hada_w1_b": "hada_w1_b",
    ".hada_w2_a": "hada_w2_a",
    ".hada_w2_b": "hada_w2_b",
    ".lokr_w1_a": "lokr_w1_a",
    ".lokr_w1_b": "lokr_w1_b",
    ".lokr_w2_a": "lokr_w2_a",
    ".lokr_w2_b": "lokr_w2_b",
    ".lokr_w1": "lokr_w1",
    ".lokr_w2": "lokr_w2",
}
_SUFFIXES = sorted(ROLES, key=len, reverse=True)


@dataclass(frozen=True)
class ParsedKey:
    dialect: str
    component: str
    layer: str  # as the file spells it, prefix and suffix removed
    role: str


def parse_key(key: str) -> ParsedKey | None:
    name = key.removeprefix("base_model.model.")
    suffix = next((s for s in _SUFFIXES if name.endswith(s)), None)
    if suffix is None:
        return None
    name = name[: -len(suffix)]
    for prefix, dialect, component, _ in PREFIXES:
        if name.startswith(prefix):
            layer = name[len(prefix) :]
            if dialect == "ComfyUI" and suffix in (".lora_A.weight", ".lora_B.weight", ".lora_B.bias"):
                dialect = "BFL-PEFT"
            if re.search(r"\.processor\.", layer):
                dialect = "XLabs"
            if ROLES[suffix].startswith(("hada", "lokr")):
                dialect = "LyCORIS"
            return ParsedKey(dialect, component, layer, ROLES[suffix])
    return None
