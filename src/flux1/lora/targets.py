"""Every name a LoRA file may use for a layer, mapped to the canonical layer (and the rows of it).

Built from the loaded networks themselves, so names are parsed against a table of known layers
(kohya's `img_attn` and `query_norm` contain underscores: replacing every `_` by `.` cannot work)."""

import re
from dataclasses import dataclass

import mlx.nn as nn

from flux1.convert.transformer_diffusers import SWAPPED_HALVES, module_table
from flux1.nn.linear import Linear


@dataclass(frozen=True)
class Target:
    component: str  # "transformer", "clip" or "t5"
    module: str  # canonical path of a Linear
    part: int | None = None  # first diffusers part of a fused layer covered (q, k, v, mlp); None: all
    parts: int = 1  # how many parts the fused layer has
    span: int = 1  # how many consecutive parts are covered
    swap_halves: bool = False  # diffusers' norm_out rows are (scale, shift); BFL's (shift, scale)

    def rows(self, layer: Linear) -> slice:
        """Rows of `layer` this target covers: parts before the last are `input_dims` rows each (q, k, v
        of width D), the last takes the rest (v of qkv, or the MLP input of a single block's linear1)."""
        if self.part is None:
            return slice(0, layer.output_dims)
        start, end = self.part * layer.input_dims, (self.part + self.span) * layer.input_dims
        return slice(start, layer.output_dims if self.part + self.span == self.parts else end)


def _depth(model: nn.Module, prefix: str) -> int:
    return len(getattr(model, prefix, []))


def build_table(models: dict[str, nn.Module]) -> dict[str, dict[str, Target]]:
    """component -> name (dotted, and with `_` for `.`) -> Target, for every Linear of the networks."""
    tables: dict[str, dict[str, Target]] = {}
    for component, model in models.items():
        table = tables[component] = {}

        def add(name: str, target: Target, table=table) -> None:
            table[name] = target
            table[name.replace(".", "_")] = target

        linears = [path for path, layer in model.named_modules() if isinstance(layer, Linear)]
        for path in linears:
            add(path, Target(component, path))
            if component == "clip":
                add(f"text_model.{path}", Target(component, path))
        if component == "transformer":
            table_parts = module_table(_depth(model, "double_blocks"), _depth(model, "single_blocks"))
            for canonical, parts in table_parts.items():
                if canonical not in linears:
                    continue
                for k, part in enumerate(parts):
                    fused = len(parts) > 1
                    target = Target(
                        component,
                        canonical,
                        part=k if fused else None,
                        parts=len(parts),
                        swap_halves=canonical == SWAPPED_HALVES,
                    )
                    add(part, target)
    return tables


# The processor names of XLabs' files in double blocks -> canonical layer of the block.
XLABS = {
    "qkv_lora1": "img_attn.qkv",
    "qkv_lora2": "txt_attn.qkv",
    "proj_lora1": "img_attn.proj",
    "proj_lora2": "txt_attn.proj",
}


def xlabs_target(name: str) -> Target | None:
    """`double_blocks.0.processor.qkv_lora1` etc.; single blocks' `qkv_lora` covers q, k, v of linear1."""
    match = re.fullmatch(r"(double|single)_blocks\.(\d+)\.processor\.(\w+)", name)
    if not match:
        return None
    kind, index, lora = match.groups()
    if kind == "double" and lora in XLABS:
        return Target("transformer", f"double_blocks.{index}.{XLABS[lora]}")
    if kind == "single" and lora == "qkv_lora":
        return Target("transformer", f"single_blocks.{index}.linear1", part=0, parts=4, span=3)
    if kind == "single" and lora == "proj_lora":
        return Target("transformer", f"single_blocks.{index}.linear2")
    return None
