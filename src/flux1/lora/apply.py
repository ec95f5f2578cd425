"""Apply LoRA files to loaded networks: every key converted to a canonical target, or reported.

Low-rank changes stay adapters beside the weight (exact on quantized bases, where merging into 4-bit
weights would erase them; on CPU two skinny matmuls per layer). Full-rank changes (LoHa, LoKr,
ComfyUI .diff) and DoRA are merged into dense weights; on quantized bases a full-rank change is kept
as a dense delta adapter."""

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from flux1.convert.transformer_diffusers import swap_halves
from flux1.lora.dialects import DIFFUSERS_PREFIXES, parse_key
from flux1.lora.targets import Target, build_table, xlabs_target
from flux1.nn.linear import DenseDeltaAdapter, Linear, LowRankAdapter
from flux1.weights.safetensors_io import read_file

log = logging.getLogger("flux1")


class LoraError(ValueError):
    """A LoRA file that cannot be applied as a whole; says which keys and why."""


@dataclass
class LoraReport:
    path: str
    dialect: str
    scale: float
    layers: int
    unmatched: list[str] = field(default_factory=list)
    sha256: str = ""

    def line(self) -> str:
        skipped = f", {len(self.unmatched)} keys matched no layer" if self.unmatched else ""
        return f"{Path(self.path).name}: {self.dialect} LoRA, {self.layers} layers changed, scale {self.scale}{skipped}"


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class _Group:
    """The tensors of one layer of one file."""

    target: Target
    dialects: set[str] = field(default_factory=set)
    keys: list[str] = field(default_factory=list)
    tensors: dict[str, mx.array] = field(default_factory=dict)


def _peft_config(metadata: dict, component: str) -> dict:
    """The PEFT LoraConfig of `component`: diffusers' model-level `save_lora_adapter` writes it as is,
    its pipeline-level `save_lora_weights` (what its training scripts call) prefixes every key with the
    component (`transformer.r`, `text_encoder.lora_alpha`)."""
    text = metadata.get("lora_adapter_metadata")
    config = json.loads(text) if text else {}
    prefix = DIFFUSERS_PREFIXES[component]
    if any(key.startswith(tuple(DIFFUSERS_PREFIXES.values())) for key in config):
        return {key.removeprefix(prefix): v for key, v in config.items() if key.startswith(prefix)}
    return config


def _pattern_value(patterns: dict, layer: str, default):
    for pattern, value in patterns.items():
        if layer == pattern or layer.endswith("." + pattern) or re.fullmatch(rf"(.*\.)?{pattern}", layer):
            return value
    return default


def _scale(group: _Group, rank: int | None, peft: dict, layer: str) -> float:
    """alpha / rank (or / sqrt(rank) with rsLoRA); 1 without an alpha. A layer's own `.alpha` tensor
    wins over the file's metadata: it is what every kohya-style loader applies, and it is specific to
    the layer while the metadata is file-wide (a disagreement is reported)."""
    alpha = None
    if peft:
        alpha = _pattern_value(peft.get("alpha_pattern") or {}, layer, peft.get("lora_alpha"))
        rank = _pattern_value(peft.get("rank_pattern") or {}, layer, rank)
    if "alpha" in group.tensors:
        own = float(group.tensors["alpha"].item())
        if alpha is not None and own != alpha:
            log.warning(
                "%s: alpha tensor %g differs from the metadata's lora_alpha %g; using %g",
                layer,
                own,
                alpha,
                own,
            )
        alpha = own
    if alpha is None or not rank:
        return 1.0
    return alpha / (math.sqrt(rank) if peft.get("use_rslora") else rank)


def _full_delta(t: dict[str, mx.array]) -> tuple[mx.array, int | None] | None:
    """LoHa / LoKr / .diff -> (dW, rank used by alpha or None)."""
    if "hada_w1_a" in t:
        w1 = t["hada_w1_a"] @ t["hada_w1_b"]
        return w1 * (t["hada_w2_a"] @ t["hada_w2_b"]), t["hada_w1_b"].shape[0]
    if "lokr_w1" in t or "lokr_w1_a" in t:
        rank = None
        w1 = t.get("lokr_w1")
        if w1 is None:
            w1, rank = t["lokr_w1_a"] @ t["lokr_w1_b"], t["lokr_w1_b"].shape[0]
        w2 = t.get("lokr_w2")
        if w2 is None:
            w2, rank = t["lokr_w2_a"] @ t["lokr_w2_b"], t["lokr_w2_b"].shape[0]
        return mx.kron(w1, w2), rank
    if "diff" in t:
        return t["diff"], None
    return None


def check_lora_file(path: Path):
    """The file's tensors, refused before anything is applied if it holds none, or a value that is
    not finite (it would turn every image black without a word)."""
    tensors = read_file(path)
    if not len(tensors):
        raise LoraError(f"{path}: holds no tensors, so it changes nothing")
    for name, array in tensors.arrays.items():
        if mx.issubdtype(array.dtype, mx.floating) and not mx.all(mx.isfinite(array)).item():
            raise LoraError(f"{path}: tensor '{name}' holds NaN or infinite values")
    _check_control_lora(tensors, path)
    return tensors


def _check_control_lora(tensors, path: Path) -> None:
    names = tensors.names()
    widened = [
        n
        for n in names
        if re.search(r"(x_embedder|img_in)\.lora_A(\.weight)?$", n) and tensors.arrays[n].shape[-1] == 128
    ]
    if widened or any(n.endswith(("norm.scale", "_norm.scale")) and "lora" not in n for n in names):
        raise LoraError(
            f"{path}: a FLUX.1 control LoRA (Canny/Depth): it widens img_in to 128 input channels (image + "
            "control latents) and replaces norm scales, so it needs a control pipeline, which flux1 does not have"
        )


def _groups(tensors, tables) -> tuple[dict[tuple[str, str], _Group], list[str], set[str]]:
    groups: dict[tuple[str, str], _Group] = {}
    unmatched, dialects = [], set()
    for key in tensors.names():
        parsed = parse_key(key)
        # Keys of networks not given here wait for their pass; keys of no network belong to the transformer's.
        if (parsed is not None and parsed.component not in tables) or (
            parsed is None and "transformer" not in tables
        ):
            continue
        target = None
        if parsed is not None:
            table = tables.get(parsed.component, {})
            target = xlabs_target(parsed.layer) if parsed.dialect == "XLabs" else table.get(parsed.layer)
        if target is None:
            unmatched.append(key)
            continue
        group = groups.setdefault((parsed.component, parsed.layer), _Group(target))
        group.dialects.add(parsed.dialect)
        group.keys.append(key)
        group.tensors[parsed.role] = tensors.arrays[key].astype(mx.float32)
    for group in groups.values():  # LyCORIS files keep kohya's prefixes and `.alpha`
        dialects.update({"LyCORIS"} if "LyCORIS" in group.dialects else group.dialects)
    return groups, unmatched, dialects


def _place(rows_of_part: mx.array, rows: slice, total: int) -> mx.array:
    """rows of one part -> the full-height matrix, zero elsewhere."""
    before = mx.zeros((rows.start, *rows_of_part.shape[1:]), rows_of_part.dtype)
    after = mx.zeros((total - rows.stop, *rows_of_part.shape[1:]), rows_of_part.dtype)
    return mx.concatenate([before, rows_of_part, after], axis=0)


def apply_file(models: dict[str, nn.Module], path: Path, strength: float, strict: bool = True) -> LoraReport:
    """Apply the keys of `path` that belong to the networks in `models` (the others are left for a
    later call with their network: the pipeline loads one network at a time)."""
    path = Path(path)
    tensors = check_lora_file(path)
    groups, unmatched, dialects = _groups(tensors, build_table(models))
    dialect = " + ".join(sorted(dialects)) or "unknown"
    if unmatched and strict:
        shown = ", ".join(unmatched[:12]) + (
            f" (and {len(unmatched) - 12} more)" if len(unmatched) > 12 else ""
        )
        raise LoraError(f"{path}: {len(unmatched)} keys match no layer (format detected: {dialect}): {shown}")
    layers = {c: dict(m.named_modules()) for c, m in models.items()}
    low_rank: dict[tuple[str, str], list[tuple[mx.array, mx.array]]] = {}
    for (component, name), group in groups.items():
        target, t = group.target, group.tensors
        layer: Linear = layers[component][target.module]
        rows = target.rows(layer)
        height = rows.stop - rows.start
        if ("down" in t) != ("up" in t):
            raise LoraError(
                f"{path}: '{group.keys[0]}': a {'down' if 'down' in t else 'up'} matrix without its "
                f"{'up' if 'down' in t else 'down'} matrix changes nothing"
            )
        if "down" in t and "up" in t:
            down, up = t["down"], t["up"]
            if down.ndim != 2 or down.shape[0] == 0:
                raise LoraError(
                    f"{path}: '{group.keys[0]}': rank 0 (down {list(down.shape)}) changes nothing"
                )
            if down.shape[1] != layer.input_dims or up.shape[0] != height or up.shape[1] != down.shape[0]:
                raise LoraError(
                    f"{path}: '{group.keys[0]}': down {list(down.shape)} / up {list(up.shape)} do not fit "
                    f"layer '{target.module}' of {component} ([out, in] = [{height}, {layer.input_dims}])"
                )
            up = up * (
                strength * _scale(group, down.shape[0], _peft_config(tensors.metadata, component), name)
            )
            up = swap_halves(up) if target.swap_halves else up
            if "dora" in t or "magnitude" in t:
                _merge_dora(layer, rows, up @ down, t.get("magnitude", t.get("dora")))
            else:
                low_rank.setdefault((component, target.module), []).append(
                    (down, _place(up, rows, layer.output_dims))
                )
        elif (full := _full_delta(t)) is not None:
            delta, rank = full
            if tuple(delta.shape) != (height, layer.input_dims):
                raise LoraError(
                    f"{path}: '{group.keys[0]}': change of shape {list(delta.shape)} for layer "
                    f"'{target.module}' of {component} ([out, in] = [{height}, {layer.input_dims}])"
                )
            peft = _peft_config(tensors.metadata, component)
            scale = 1.0 if "diff" in t or rank is None else _scale(group, rank, peft, name)
            delta = _place(swap_halves(delta) if target.swap_halves else delta, rows, layer.output_dims)
            _add_full(layer, delta * (strength * scale))
        elif "up_bias" not in t and "diff_b" not in t:
            raise LoraError(
                f"{path}: '{group.keys[0]}': no change for this layer (only {', '.join(sorted(t))})"
            )
        if "up_bias" in t or "diff_b" in t:
            bias = t.get("up_bias", t.get("diff_b")) * strength
            if "bias" not in layer:
                raise LoraError(
                    f"{path}: '{group.keys[0]}': bias change for '{target.module}', which has no bias"
                )
            layer.bias = layer.bias + _place(
                swap_halves(bias) if target.swap_halves else bias, rows, layer.output_dims
            ).astype(layer.bias.dtype)
    for (component, module), pairs in low_rank.items():
        down = mx.concatenate([d for d, _ in pairs], axis=0)
        up = mx.concatenate([u for _, u in pairs], axis=1)
        layers[component][module].add_adapter(LowRankAdapter(down, up, 1.0))
    changed = {(g.target.component, g.target.module) for g in groups.values()}
    return LoraReport(str(path), dialect, strength, len(changed), unmatched)


def _merge_dora(layer: Linear, rows: slice, delta: mx.array, magnitude: mx.array) -> None:
    """W'' = m * (W + s dW) / norm(W + s dW) on the target rows. PEFT's magnitude [out] normalises
    each output row, LyCORIS/OneTrainer's `dora_scale` [1, in] each input column. A quantized layer
    becomes dense: the normalisation needs the whole weight."""
    weight = layer.dense_weight(mx.float32)
    changed = weight[rows] + delta
    if magnitude.ndim == 2 and magnitude.shape[0] == 1:
        norm = mx.linalg.norm(changed, axis=0, keepdims=True)
    else:
        magnitude, norm = magnitude.reshape(-1, 1), mx.linalg.norm(changed, axis=1, keepdims=True)
    weight[rows] = magnitude * changed / norm
    layer.set_dense(weight)


def _add_full(layer: Linear, delta: mx.array) -> None:
    if layer.is_quantized:
        layer.add_adapter(DenseDeltaAdapter(delta))
    else:
        layer.weight = (layer.weight.astype(mx.float32) + delta).astype(layer.weight.dtype)
