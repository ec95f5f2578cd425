"""BFL `ae.safetensors` names <-> the canonical (diffusers AutoencoderKL) VAE names.

BFL numbers the decoder's `up` levels from the lowest resolution's opposite end (diffusers
up_blocks.k is BFL up.{levels-1-k}) and stores the mid attention projections as 1x1 convolutions.
"""

import re

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
