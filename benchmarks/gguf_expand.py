"""What a CPU step pays to keep layers quantized: time to expand one 3072 x 21504 weight (the largest of
FLUX.1) on all cores, GGUF blocks against MLX affine weights of saved folders, by each expansion path
of the CPU plan (NumPy or oneDNN, to fp32 or to bf16 for the GEMMs of that dtype).

    python benchmarks/gguf_expand.py [--types Q4_K Q8_0 Q6_K Q5_K Q3_K] [--bits 4 8] [--repeats 7]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import flux1  # noqa: F401  (first: loads the BLAS before mlx)

# isort: split
import gguf
import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as T

from flux1.fixtures.gguf import K_QUANTS, random_k_blocks
from flux1.nn.cpu_expansion import ExpansionPath, expanded_weight, expansion_paths
from flux1.nn.linear import Linear

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_load import cpu_model  # noqa: E402

ROWS, COLS = 3072, 21504


def seconds(layer: Linear, path: ExpansionPath, repeats: int) -> float:
    # The scratch buffer allocated and paged in once, and a Q4_K layer's codes re-laid, as a run's
    # first step does.
    expanded_weight(layer, path.dtype, path.kernel)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        expanded_weight(layer, path.dtype, path.kernel)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--types", nargs="+", default=["Q4_K", "Q8_0", "Q6_K", "Q5_K", "Q3_K"])
    parser.add_argument("--bits", type=int, nargs="*", default=[4, 8], help="MLX affine widths (saved -q)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((ROWS, COLS), np.float32) / np.sqrt(COLS)
    layers = {}
    for bits in args.bits:
        layer = Linear(COLS, ROWS, bias=False)
        layer.weight = mx.array(weight).astype(mx.bfloat16)  # bf16 scales, as saved from bf16
        layer.quantize(bits, 64)
        mx.eval(layer.parameters())
        layers[f"MLX affine {bits}-bit, group 64"] = layer
    for name in args.types:
        qtype = T[name]
        if qtype in K_QUANTS:
            raw = random_k_blocks(ROWS, COLS, qtype, 1 / np.sqrt(COLS), rng)
        else:
            raw = gguf.quants.quantize(weight, qtype)
        layer = Linear(COLS, ROWS, bias=False)
        layer.set_gguf(mx.array(raw), qtype)
        layers[f"GGUF {name} blocks"] = layer
    paths = expansion_paths()
    print(f"\nexpand a {ROWS} x {COLS} weight, ms (median of {args.repeats}); CPU: {cpu_model()}")
    print(f"{'weight':<32}{'bits/weight':>12}" + "".join(f"{name:>16}" for name in paths))
    for name, layer in layers.items():
        held = sum(a.nbytes for a in (layer.weight, *(layer[p] for p in ("scales", "biases") if p in layer)))
        times = "".join(f"{seconds(layer, path, args.repeats) * 1e3:>16.0f}" for path in paths.values())
        print(f"{name:<32}{held * 8 / (ROWS * COLS):>12.2f}{times}")


if __name__ == "__main__":
    main()
