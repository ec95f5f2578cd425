"""Which layers a LoRA trains, the trainable adapters on them, and their files.

Layers are chosen by diffusers' module names with PEFT's rule (a name equal to a target or ending in
`.<target>`), from the target lists of diffusers' train_dreambooth_lora_flux.py. A diffusers layer that
is a row slice of a fused flux1 layer (q, k, v of `qkv` or `linear1`) gets its own adapter on those rows,
so each adapter is one `lora_A`/`lora_B` pair of the file diffusers' trainer would write. With
`--train-text-encoder`, CLIP-L's attention layers get adapters too (diffusers' `text_lora_config`)."""

import mlx.core as mx
import mlx.nn as nn

from flux1.convert.transformer_diffusers import module_table, swap_halves
from flux1.lora.dialects import DIFFUSERS_PREFIXES
from flux1.lora.targets import Target, build_table
from flux1.nn.linear import LowRankAdapter

_ATTENTION = ["to_k", "to_q", "to_v", "to_out.0"]
_ATTENTION_MLP = [
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
]
_EVERY_LINEAR = _ATTENTION_MLP + [
    "proj_mlp",
    "proj_out",
    "norm1.linear",
    "norm1_context.linear",
    "norm.linear",
    "norm_out.linear",
    "x_embedder",
    "context_embedder",
    *(
        f"time_text_embed.{e}.linear_{i}"
        for e in ("timestep_embedder", "text_embedder", "guidance_embedder")
        for i in (1, 2)
    ),
]
TARGETS = {"attention": _ATTENTION, "attention+mlp": _ATTENTION_MLP, "all": _EVERY_LINEAR}
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# kohya's LORA_PREFIX_UNET and LORA_PREFIX_TEXT_ENCODER_CLIP, followed by the layer's flux1 path with `_`
# for `.` (for CLIP, transformers' path: `text_model.` + flux1's).
KOHYA_PREFIXES = {"transformer": "lora_unet_", "clip": "lora_te1_text_model_"}


def targeted(name: str, target_modules: list[str]) -> bool:
    """PEFT's rule for a list of target names."""
    return any(name == t or name.endswith("." + t) for t in target_modules)


def target_modules(component: str, target: str) -> list[str]:
    """PEFT's `target_modules` of the component's LoraConfig in diffusers' trainer."""
    return TARGETS[target] if component == "transformer" else CLIP_TARGETS


def _candidates(component: str, model: nn.Module) -> list[str]:
    """The diffusers (transformers, for CLIP) names of the network's linear layers, in order."""
    if component == "transformer":
        depth = len(model.double_blocks), len(model.single_blocks)
        return [p for parts in module_table(*depth).values() for p in parts]
    return [
        f"text_model.encoder.layers.{i}.self_attn.{p}"
        for i in range(len(model.encoder.layers))
        for p in CLIP_TARGETS
    ]


class TrainedAdapters(nn.Module):
    """The adapters being trained (their `down`/`up` are this module's parameters), with the diffusers
    name and flux1 target (whose `component` is the network) of each."""

    def __init__(self, names: list[str], targets: list[Target], adapters: list[LowRankAdapter]):
        super().__init__()
        self.adapters = adapters
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "targets", targets)

    @property
    def components(self) -> list[str]:
        """The networks holding adapters, transformer first."""
        return list(dict.fromkeys(t.component for t in self.targets))

    def component_of(self, path: str) -> str:
        """The network of a parameter of this module, by its path (`adapters.12.down`)."""
        return self.targets[int(path.split(".")[1])].component

    def of_block(self, prefix: str) -> list[LowRankAdapter]:
        """The adapters inside the transformer block at `prefix` (`double_blocks.3`)."""
        return [
            a
            for a, t in zip(self.adapters, self.targets)
            if t.component == "transformer" and t.module.startswith(prefix + ".")
        ]


def attach(
    networks: dict[str, nn.Module], target: str, rank: int, alpha: float, key: mx.array
) -> TrainedAdapters:
    """New adapters on the targeted layers of `networks` (`transformer`, and `clip` when it trains),
    initialised as PEFT's `init_lora_weights="gaussian"`: down ~ N(0, (1/rank)^2), up = 0, scale
    alpha / rank. Both networks' adapters take their rank and alpha, as in diffusers' trainer."""
    tables = build_table(networks)
    chosen = []
    for component, model in networks.items():
        table, layers = tables[component], dict(model.named_modules())
        modules = target_modules(component, target)
        for name in _candidates(component, model):
            if targeted(name, modules) and name in table and table[name].module in layers:
                chosen.append((name, table[name], layers[table[name].module]))
    keys = mx.random.split(key, len(chosen))
    adapters = []
    for (_, found, layer), k in zip(chosen, keys):
        rows = found.rows(layer) if found.part is not None else None
        height = layer.output_dims if rows is None else rows.stop - rows.start
        down = mx.random.normal((rank, layer.input_dims), key=k) / rank
        adapter = LowRankAdapter(down, mx.zeros((height, rank)), alpha / rank, rows)
        layer.add_adapter(adapter)
        adapters.append(adapter)
    return TrainedAdapters([n for n, _, _ in chosen], [t for _, t, _ in chosen], adapters)


def peft_tensors(trained: TrainedAdapters, tree: list[dict] | None = None) -> dict[str, mx.array]:
    """`transformer.<diffusers name>` / `text_encoder.<transformers name>` `.lora_A.weight` / `.lora_B.weight`
    of the adapters' parameters (or of a tree shaped like them, e.g. gradients). diffusers' norm_out rows
    are BFL's with halves swapped."""
    tree = tree if tree is not None else [{"down": a.down, "up": a.up} for a in trained.adapters]
    out = {}
    for name, target, pair in zip(trained.names, trained.targets, tree):
        up = swap_halves(pair["up"]) if target.swap_halves else pair["up"]
        key = DIFFUSERS_PREFIXES[target.component] + name
        out[f"{key}.lora_A.weight"] = pair["down"]
        out[f"{key}.lora_B.weight"] = up
    return out


def kohya_tensors(trained: TrainedAdapters) -> dict[str, mx.array]:
    """`lora_unet_<BFL name>` / `lora_te1_<transformers name>` `.lora_down/lora_up/.alpha`, one entry per
    flux1 layer: the row-sliced adapters of a fused layer become one of rank k*r with a block-structured
    up (kohya's split_qkv layout, read with alpha / down.shape[0] by every loader, so alpha = scale * k*r)."""
    grouped: dict[tuple[str, str], list[LowRankAdapter]] = {}
    for target, adapter in zip(trained.targets, trained.adapters):
        grouped.setdefault((target.component, target.module), []).append(adapter)
    out = {}
    for (component, module), adapters in grouped.items():
        down = mx.concatenate([a.down for a in adapters], axis=0)
        key = KOHYA_PREFIXES[component] + module.replace(".", "_")
        out[f"{key}.lora_down.weight"] = down
        out[f"{key}.lora_up.weight"] = mx.concatenate([a.full_up() for a in adapters], axis=1)
        out[f"{key}.alpha"] = mx.array(adapters[0].scale * down.shape[0], mx.float32)
    return out
