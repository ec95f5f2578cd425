"""VAE checkpoints -> the canonical (diffusers AutoencoderKL) names in MLX's layout: PyTorch conv
kernels are transposed, and BFL's `ae.safetensors` is renamed (and its config read off its shapes).

BFL numbers the decoder's `up` levels from the lowest resolution's opposite end (diffusers
up_blocks.k is BFL up.{levels-1-k}) and stores the mid attention projections as 1x1 convolutions.
"""

import copy
import re
from pathlib import Path

from mlx.utils import tree_flatten

from flux1.configs import VAE as REAL_VAE_CONFIG
from flux1.weights.safetensors_io import Tensors, WeightFileError

_RENAMES = [
    (r"(coder)\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"\1.down.\2.block.\3."),
    (r"(coder)\.down_blocks\.(\d+)\.downsamplers\.0\.", r"\1.down.\2.downsample."),
    (r"(coder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
    (r"(coder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
    (r"(coder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
    (r"(coder)\.mid_block\.attentions\.0\.to_([qkv])\.", r"\1.mid.attn_1.\2."),
    (r"(coder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
    (r"(coder)\.conv_norm_out\.", r"\1.norm_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
]
ATTENTION_PROJECTIONS = re.compile(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def bfl_name(name: str, levels: int) -> str:
    """The BFL name of a canonical (diffusers) VAE tensor name."""
    up = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.*)", name)
    if up:
        level, kind, index, rest = up.groups()
        level = levels - 1 - int(level)
        return (
            f"decoder.up.{level}.block.{index}.{rest}"
            if kind == "resnets"
            else f"decoder.up.{level}.upsample.{rest}"
        )
    for pattern, replacement in _RENAMES:
        name = re.sub(pattern, replacement, name)
    return name


def from_bfl(tensors: Tensors, model) -> Tensors:
    """Rename BFL tensors to the model's names; names that match nothing pass through (and are reported)."""
    levels = len(model.config["block_out_channels"])
    out = Tensors(metadata=tensors.metadata)
    for name, _ in tree_flatten(model.parameters()):
        source = bfl_name(name, levels)
        if source in tensors:
            array, origin = tensors.pop(source)
            if ATTENTION_PROJECTIONS.search(source):
                array = array.reshape(array.shape[:2])
            out.add(name, array, origin)
    for name in tensors.names():
        out.add(name, *tensors.pop(name))
    return out


def to_mlx_layout(tensors: Tensors) -> Tensors:
    """PyTorch conv kernels [out, in, kh, kw] -> MLX [out, kh, kw, in] (lazily)."""
    for name, array in tensors.arrays.items():
        if array.ndim == 4:
            tensors.arrays[name] = array.transpose(0, 2, 3, 1)
    return tensors


def infer_config(tensors: Tensors, source: Path) -> dict:
    names = tensors.names()
    try:
        levels = 1 + max(int(m.group(1)) for n in names if (m := re.match(r"encoder\.down\.(\d+)\.", n)))
        channels = [tensors.arrays[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
        latent_channels = tensors.arrays["decoder.conv_in.weight"].shape[1]
    except (KeyError, ValueError):
        raise WeightFileError(f"{source}: not a FLUX autoencoder (ae.safetensors) checkpoint") from None
    layers = 1 + max(
        int(m.group(1)) for n in names if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", n))
    )
    config = copy.deepcopy(REAL_VAE_CONFIG)
    config.update(block_out_channels=channels, latent_channels=latent_channels, layers_per_block=layers)
    return config
