"""Where a tensor-parallel rank reads its shard of each cut weight: only those bytes, from disk.

The transformer is read lazily (nothing read yet), quantized and given its LoRAs as in one process;
`ShardSource` is made between the two, remembering each layer's weight. A layer whose weight a LoRA
did not change (LoRAs are adapters beside the weight, except full-rank changes merged into a dense
weight and DoRA) gets the rank's part read alone: the rows or columns of the file's tensors (the
parts of a diffusers fused qkv each), quantized as -q quantizes the whole (quantization groups lie
along rows and a cut falls on whole groups, so the parts are equal). A changed layer keeps its lazy
cut, which reads its whole tensor (correct, more bytes). GGUF layers were read in part by the
loader already (`loaders/gguf.py`), so a changed GGUF layer is refused.
"""

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from flux1.convert.transformer_bfl import strip_prefix
from flux1.convert.transformer_diffusers import is_diffusers, module_table
from flux1.distributed.tensor_parallel import Cut
from flux1.model_files import ModelFiles
from flux1.nn.linear import Linear
from flux1.weights import saved
from flux1.weights.slices import SafetensorsSlices

_STEMS = {"diffusers": "diffusion_pytorch_model", "saved": saved.STEM}


def _split(ranges: tuple[tuple[int, int], ...], heights: list[int]) -> list[list[tuple[int, int]]]:
    """Row ranges of a concatenation of parts `heights` tall, as each part's own row ranges."""
    out, start = [], 0
    for height in heights:
        end = start + height
        out.append([(max(a, start) - start, min(b, end) - start) for a, b in ranges if a < end and b > start])
        start = end
    return out


class ShardSource:
    def __init__(self, model: nn.Module, files: ModelFiles):
        self._weights = {
            path: layer.weight for path, layer in model.named_modules() if isinstance(layer, Linear)
        }
        self._gguf = files.transformer_format == "gguf"
        if self._gguf:
            return
        source = Path(files.transformer)
        stem = _STEMS.get(files.transformer_format)
        self._slices = SafetensorsSlices(sorted(source.glob(f"{stem}*.safetensors")) if stem else [source])
        names = self._slices.names()
        if is_diffusers(names):
            table = module_table(len(model.double_blocks), len(model.single_blocks))
            self._parts = {canonical: parts for canonical, parts in table.items()}
        else:
            self._parts = {
                strip_prefix(name).removesuffix(".weight"): [name.removesuffix(".weight")] for name in names
            }

    def as_read(self, path: str, layer: Linear) -> bool:
        """Whether `layer` still holds the weight it was read with (no LoRA merged into it)."""
        if layer.weight is self._weights.pop(path):  # dropped: it must not keep an evaluated tensor
            return not self._gguf  # GGUF: already read in part
        if self._gguf:
            raise ValueError(
                f"--tensor-parallel with a GGUF transformer: a LoRA changes the whole weight of "
                f"'{path}' (DoRA); use it without --tensor-parallel"
            )
        return False

    def fill(self, path: str, layer: Linear, cut: Cut) -> None:
        """Replace the cut layer's weight (codes, scales and biases if quantized) by its part on disk."""
        parts = self._parts.get(path)
        if not parts or not all(self._slices.readable(f"{p}.weight") for p in parts):
            return  # left to the lazy cut
        dense_source = self._slices.dtype(f"{parts[0]}.weight") != "U32"
        if layer.bits is None or dense_source:
            weight = self._read(parts, "weight", cut.axis, cut.ranges)
            if layer.bits is None:
                layer.weight = weight
            else:
                layer.weight, layer.scales, layer.biases = mx.quantize(weight, layer.group_size, layer.bits)
            return
        if cut.axis == 0:
            for param in ("weight", "scales", "biases"):
                layer[param] = self._read(parts, param, 0, cut.ranges)
            return
        per_word, group = 32 // layer.bits, layer.group_size
        layer.weight = self._read(
            parts, "weight", 1, tuple((a // per_word, b // per_word) for a, b in cut.ranges)
        )
        for param in ("scales", "biases"):
            layer[param] = self._read(parts, param, 1, tuple((a // group, b // group) for a, b in cut.ranges))

    def _read(self, parts: list[str], param: str, axis: int, ranges) -> mx.array:
        names = [f"{p}.{param}" for p in parts]
        if axis == 1:
            return mx.concatenate([self._slices.read(n, 1, list(ranges)) for n in names], axis=0)
        pieces = _split(ranges, [self._slices.rows(n) for n in names])
        return mx.concatenate(
            [self._slices.read(n, 0, r) for n, r in zip(names, pieces, strict=True) if r], axis=0
        )
