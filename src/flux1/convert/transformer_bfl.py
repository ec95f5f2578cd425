"""BFL single-file (and ComfyUI, GGUF) transformer checkpoints: BFL names are the canonical names, so
only a prefix is stripped; the diffusers config is read off the tensor shapes."""

import re
from pathlib import Path

from flux1.configs import AXES_DIMS_ROPE
from flux1.weights.safetensors_io import Tensors, WeightFileError

SINGLE_FILE_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def strip_prefix(name: str) -> str:
    for prefix in SINGLE_FILE_PREFIXES:
        if name.startswith(prefix):
            return name.removeprefix(prefix)
    return name


def from_single_file(tensors: Tensors) -> Tensors:
    """BFL (or ComfyUI) single-file tensors under their canonical names."""
    return tensors.renamed(strip_prefix)


def infer_config(shapes: dict[str, tuple[int, ...]], source: Path) -> dict:
    """The diffusers config of a BFL single file (or GGUF), read off its tensor shapes (BFL names).
    RoPE axes scale with the head dim as in the real model (16, 56, 56 of 128)."""
    try:
        dim, in_channels = shapes["img_in.weight"]
        head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        joint_dim = shapes["txt_in.weight"][1]
        pooled_dim = shapes["vector_in.in_layer.weight"][1]
    except KeyError as e:
        raise WeightFileError(f"{source}: not a FLUX transformer checkpoint (no tensor {e})") from None
    names = list(shapes)
    depth = [
        1 + max((int(m.group(1)) for n in names if (m := re.match(rf"{p}\.(\d+)\.", n))), default=-1)
        for p in ("double_blocks", "single_blocks")
    ]
    return {
        "attention_head_dim": head_dim,
        "axes_dims_rope": [d * head_dim // 128 for d in AXES_DIMS_ROPE],
        "guidance_embeds": "guidance_in.in_layer.weight" in shapes,
        "in_channels": in_channels,
        "out_channels": shapes.get("final_layer.linear.weight", (in_channels,))[0],
        "joint_attention_dim": joint_dim,
        "num_attention_heads": dim // head_dim,
        "num_layers": depth[0],
        "num_single_layers": depth[1],
        "patch_size": 1,
        "pooled_projection_dim": pooled_dim,
    }
