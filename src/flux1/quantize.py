"""MLX affine quantization of a network's linear layers, layer by layer.

Each layer is quantized and evaluated before the next is touched: with weights read lazily from
safetensors, the full-precision network is never in memory at once (peak = quantized result +
one dense layer).
"""

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from flux1.nn.linear import Linear

BITS = (3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)


@dataclass
class QuantizationReport:
    quantized: int = 0
    kept_dense: list[str] = field(
        default_factory=list
    )  # layers whose input width is no multiple of the group


def check_quantization(bits: int, group_size: int) -> None:
    if bits not in BITS:
        raise ValueError(f"--quantize {bits}: expected one of {', '.join(map(str, BITS))} bits")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"--group-size {group_size}: expected one of {', '.join(map(str, GROUP_SIZES))}")


def quantize_linears(
    module: nn.Module, bits: int, group_size: int, evaluate: bool = True
) -> QuantizationReport:
    """Quantize every `Linear` of `module` in place; layers that do not fit the group stay dense.
    With `evaluate` False the layers stay lazy (a caller that shards them evaluates each shard)."""
    check_quantization(bits, group_size)
    report = QuantizationReport()
    for path, layer in module.named_modules():
        if not isinstance(layer, Linear) or layer.is_quantized:
            continue
        if layer.quantize(bits, group_size):
            if evaluate:
                mx.eval(layer.parameters())
            report.quantized += 1
        else:
            report.kept_dense.append(path)
    return report
