"""diffusers FluxTransformer2DModel names <-> the canonical (BFL) names.

One table serves both directions. Fused canonical weights (qkv, linear1) are the row-concatenation
of their diffusers parts; the final adaLN weight has its two row halves swapped (diffusers: scale,
shift; BFL: shift, scale).
"""

import re

import mlx.core as mx

from flux1.weights.safetensors_io import Tensors

# canonical module -> diffusers modules whose rows it concatenates (one entry: a plain rename).
_GLOBAL = {
    "img_in": ["x_embedder"],
    "txt_in": ["context_embedder"],
    "time_in.in_layer": ["time_text_embed.timestep_embedder.linear_1"],
    "time_in.out_layer": ["time_text_embed.timestep_embedder.linear_2"],
    "vector_in.in_layer": ["time_text_embed.text_embedder.linear_1"],
    "vector_in.out_layer": ["time_text_embed.text_embedder.linear_2"],
    "guidance_in.in_layer": ["time_text_embed.guidance_embedder.linear_1"],
    "guidance_in.out_layer": ["time_text_embed.guidance_embedder.linear_2"],
    "final_layer.linear": ["proj_out"],
    "final_layer.adaLN_modulation.1": ["norm_out.linear"],
}
_DOUBLE = {
    "img_mod.lin": ["norm1.linear"],
    "txt_mod.lin": ["norm1_context.linear"],
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn.proj": ["attn.to_out.0"],
    "txt_attn.proj": ["attn.to_add_out"],
    "img_mlp.0": ["ff.net.0.proj"],
    "img_mlp.2": ["ff.net.2"],
    "txt_mlp.0": ["ff_context.net.0.proj"],
    "txt_mlp.2": ["ff_context.net.2"],
}
_DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_SINGLE = {
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
    "modulation.lin": ["norm.linear"],
}
_SINGLE_NORMS = {
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
}
SWAPPED_HALVES = "final_layer.adaLN_modulation.1"


def _block_count(names, prefix: str) -> int:
    found = [int(m.group(1)) for n in names if (m := re.match(rf"{prefix}\.(\d+)\.", n))]
    return max(found) + 1 if found else 0


def module_table(double_blocks: int, single_blocks: int) -> dict[str, list[str]]:
    """canonical linear module -> its diffusers parts, for a model of that depth."""
    table = dict(_GLOBAL)
    for i in range(double_blocks):
        table.update(
            {
                f"double_blocks.{i}.{c}": [f"transformer_blocks.{i}.{d}" for d in ds]
                for c, ds in _DOUBLE.items()
            }
        )
    for i in range(single_blocks):
        table.update(
            {
                f"single_blocks.{i}.{c}": [f"single_transformer_blocks.{i}.{d}" for d in ds]
                for c, ds in _SINGLE.items()
            }
        )
    return table


def norm_table(double_blocks: int, single_blocks: int) -> dict[str, str]:
    """canonical norm scale -> diffusers norm weight."""
    table = {}
    for i in range(double_blocks):
        table.update(
            {f"double_blocks.{i}.{c}": f"transformer_blocks.{i}.{d}" for c, d in _DOUBLE_NORMS.items()}
        )
    for i in range(single_blocks):
        table.update(
            {f"single_blocks.{i}.{c}": f"single_transformer_blocks.{i}.{d}" for c, d in _SINGLE_NORMS.items()}
        )
    return table


def swap_halves(x: mx.array) -> mx.array:
    half = x.shape[0] // 2
    return mx.concatenate([x[half:], x[:half]], axis=0)


def is_diffusers(names) -> bool:
    return any(
        n.startswith(("transformer_blocks.", "x_embedder.", "single_transformer_blocks.")) for n in names
    )


def from_diffusers(tensors: Tensors) -> Tensors:
    """Canonical tensors from diffusers ones (lazy). Unknown names pass through unchanged, so the
    strict assignment reports them."""
    names = tensors.names()
    depth = _block_count(names, "transformer_blocks"), _block_count(names, "single_transformer_blocks")
    out = Tensors(metadata=dict(tensors.metadata))
    for canonical, parts in module_table(*depth).items():
        for param in ("weight", "bias"):
            sources = [f"{p}.{param}" for p in parts]
            if not all(s in tensors for s in sources):
                continue
            popped = [tensors.pop(s) for s in sources]
            array = mx.concatenate([a for a, _ in popped], axis=0) if len(popped) > 1 else popped[0][0]
            if canonical == SWAPPED_HALVES:
                array = swap_halves(array)
            out.add(f"{canonical}.{param}", array, " + ".join(origin for _, origin in popped))
    for canonical, source in norm_table(*depth).items():
        if source in tensors:
            array, origin = tensors.pop(source)
            out.add(canonical, array, origin)
    for name in tensors.names():
        array, origin = tensors.pop(name)
        out.add(name, array, origin)
    return out


def to_diffusers(arrays: dict[str, mx.array], head_dim_total: int) -> dict[str, mx.array]:
    """diffusers tensors from canonical ones (splitting fused rows: q, k, v of `head_dim_total` rows
    each, the rest of linear1 being proj_mlp)."""
    names = list(arrays)
    depth = _block_count(names, "double_blocks"), _block_count(names, "single_blocks")
    out = {}
    for canonical, parts in module_table(*depth).items():
        for param in ("weight", "bias"):
            name = f"{canonical}.{param}"
            if name not in arrays:
                continue
            array = swap_halves(arrays[name]) if canonical == SWAPPED_HALVES else arrays[name]
            if len(parts) == 1:
                out[f"{parts[0]}.{param}"] = array
                continue
            cuts = [head_dim_total * (k + 1) for k in range(len(parts) - 1)]
            for part, piece in zip(parts, mx.split(array, cuts, axis=0), strict=True):
                out[f"{part}.{param}"] = piece
    for canonical, source in norm_table(*depth).items():
        if canonical in arrays:
            out[source] = arrays[canonical]
    return out
