"""Load the FLUX transformer from a diffusers folder, a BFL (or ComfyUI) single file, or a flux1 save."""

import re
from pathlib import Path

from flux1.convert.transformer_diffusers import from_diffusers, is_diffusers
from flux1.models.transformer import DEFAULT_AXES_DIMS, FluxTransformer
from flux1.weights import saved
from flux1.weights.assign import assign_weights
from flux1.weights.safetensors_io import Tensors, WeightFileError, read_config, read_file, read_folder

SINGLE_FILE_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def load_transformer(source: Path, config: dict | None = None) -> FluxTransformer:
    """source: a diffusers `transformer/` folder, a flux1 saved `transformer/` folder, or a single
    .safetensors file with BFL (or diffusers) names. Weights stay lazy, in their stored dtype."""
    source = Path(source)
    if source.is_dir():
        config = config or read_config(source)
        model = FluxTransformer(config)
        if saved.is_saved(source):
            saved.load_saved_component(model, source, f"transformer ({source})")
            return model
        tensors = from_diffusers(read_folder(source, "diffusion_pytorch_model"))
    else:
        tensors = _strip_prefix(read_file(source))
        if is_diffusers(tensors.names()):
            tensors = from_diffusers(tensors)
        model = FluxTransformer(
            config or infer_config({n: a.shape for n, a in tensors.arrays.items()}, source)
        )
    assign_weights(model, tensors, f"transformer ({source})")
    return model


def strip_prefix(name: str) -> str:
    for prefix in SINGLE_FILE_PREFIXES:
        if name.startswith(prefix):
            return name.removeprefix(prefix)
    return name


def _strip_prefix(tensors: Tensors) -> Tensors:
    out = Tensors(metadata=tensors.metadata)
    for name in tensors.names():
        array, origin = tensors.pop(name)
        out.add(strip_prefix(name), array, origin)
    return out


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
        "axes_dims_rope": [d * head_dim // 128 for d in DEFAULT_AXES_DIMS],
        "guidance_embeds": "guidance_in.in_layer.weight" in shapes,
        "in_channels": in_channels,
        "joint_attention_dim": joint_dim,
        "num_attention_heads": dim // head_dim,
        "num_layers": depth[0],
        "num_single_layers": depth[1],
        "patch_size": 1,
        "pooled_projection_dim": pooled_dim,
    }
