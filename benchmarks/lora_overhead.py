"""What a LoRA costs per denoising step: kept as a runtime adapter beside the weight, or merged into it.

On the `wide` preset (real widths), a rank-r adapter on every linear layer of the transformer (as a
LoRA trained on all layers would be): the median step without adapters, with them as runtime adapters
(`x W^T + s (x A^T) B^T`), and after merging them into the weights (`W + s B A`), for the dense base
and, with --bits, quantized bases (adapters only: merging into quantized weights would erase the LoRA).

    python benchmarks/lora_overhead.py [--preset wide] [--size 512] [--rank 16] [--bits 4] [--repeats 5]
"""

import statistics
import sys
import time
from pathlib import Path

import flux1  # noqa: F401  (first: loads the BLAS before mlx)

# isort: split
import mlx.core as mx

from flux1.loaders.transformer import load_transformer
from flux1.nn.linear import Linear, LowRankAdapter
from flux1.quantize import quantize_linears

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import fixture_folder, fixture_parser, transformer_inputs  # noqa: E402


def step_seconds(transformer, inputs: list) -> float:
    start = time.perf_counter()
    mx.eval(transformer(*inputs))
    return time.perf_counter() - start


def add_adapters(transformer, rank: int) -> list[Linear]:
    layers = [layer for _, layer in transformer.named_modules() if isinstance(layer, Linear)]
    for layer in layers:
        down = mx.random.normal((rank, layer.input_dims)) * layer.input_dims**-0.5
        up = mx.random.normal((layer.output_dims, rank)) * 0.01
        layer.add_adapter(LowRankAdapter(down, up, 1.0))
    mx.eval([(a.down, a.up) for layer in layers for a in layer.adapters])
    return layers


def alternated(transformer, inputs: list, layers: list[Linear], repeats: int) -> tuple[float, float]:
    """Median steps without and with the adapters, measured in turn so drift hits both alike."""
    adapters = [list(layer.adapters) for layer in layers]
    times: dict[bool, list[float]] = {False: [], True: []}
    for on in [False, True] * (repeats + 1):
        for layer, own in zip(layers, adapters, strict=True):
            layer.adapters[:] = own if on else []
        times[on].append(step_seconds(transformer, inputs))
    return statistics.median(times[False][1:]), statistics.median(times[True][1:])  # first: warm-up


def main() -> None:
    parser = fixture_parser(__doc__)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--bits", type=int, nargs="*", default=[4], help="quantized bases to measure too")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    folder = fixture_folder(args.cache, args.preset, args.dtype) / "transformer"
    rows = []
    for bits in [None, *args.bits]:
        transformer = load_transformer(folder)
        if bits is not None:
            quantize_linears(transformer, bits, 64)
        mx.eval(transformer.parameters())
        inputs = transformer_inputs(transformer, args.size)
        base = "dense" if bits is None else f"{bits}-bit"
        layers = add_adapters(transformer, args.rank)
        plain, adapted = alternated(transformer, inputs, layers, args.repeats)
        rows.append((base, "no LoRA", plain, plain))
        rows.append((base, f"{len(layers)} runtime adapters", adapted, plain))
        if bits is None:  # merging into quantized weights would erase the LoRA: never done
            for layer in layers:
                layer.merge_adapters()
            step_seconds(transformer, inputs)
            merged = statistics.median(step_seconds(transformer, inputs) for _ in range(args.repeats))
            rows.append((base, "merged", merged, plain))
        del transformer
    print(f"\n{args.preset} preset ({args.dtype} weights), {args.size}x{args.size}, LoRA rank {args.rank}")
    print(f"{'base':<8}{'LoRA':<24}{'step s':>8}{'vs no LoRA':>12}")
    for base, lora, seconds, plain in rows:
        print(f"{base:<8}{lora:<24}{seconds:>8.3f}{seconds / plain - 1:>+12.1%}")


if __name__ == "__main__":
    main()
