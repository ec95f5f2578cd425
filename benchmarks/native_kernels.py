"""flux1's native kernels built from two source trees, timed call for call in turn in one process:
the GEMM (bf16 weights, and MLX's 4-bit codes; x packed per call as linear layers pack it) on FLUX's
linear shapes, and the attention of a layer's heads (with its packing), their products in AMX tiles
(`--kernel tiles`, the default where they run) or in AVX512-BF16 vectors (`--kernel vectors`). The other tree's C
files are compiled as this one's are and called through this tree's Python, so they must take the
same arguments. Calls alternate A B, B A, ..., so that a shared machine's drift slows both builds
alike; the table gives each build's median and the median of the pairs' ratios.

    git worktree add /tmp/before <rev>
    python benchmarks/native_kernels.py --before /tmp/before/src [--calls 12] [--size 512] [--kernel vectors]
"""

import argparse
import contextlib
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import flux1  # noqa: F401  (first: loads the BLAS before mlx)

# isort: split
import mlx.core as mx
import numpy as np

from flux1.nn import cpu_expansion, native
from flux1.nn.linear import Linear
from flux1.nn.numpy_cpu import as_bf16

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import HEAD_DIM, HEADS, cpu_model, linear_shapes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("single linear1", "single linear2", "double qkv, image", "double mlp up, text")


def cases(image_tokens: int, text_tokens: int, kernel: str) -> dict[str, tuple[float, object]]:
    """{name: (its floating-point work, a call of it through native's wrappers)}."""
    rng = np.random.default_rng(0)
    made = {}
    layers = {name: shape for name, *shape in linear_shapes(image_tokens, text_tokens)}
    for name in LAYERS:
        rows, inputs, outputs = layers[name]
        x = as_bf16(rng.standard_normal((rows, inputs), np.float32))
        weight = as_bf16(rng.standard_normal((outputs, inputs), np.float32) * inputs**-0.5)
        y = np.empty((rows, outputs), np.float32)
        layer = Linear(inputs, outputs, bias=False)
        layer.weight = mx.array(weight).view(mx.bfloat16)
        layer.quantize(4, 64)

        def packed(x=x, rows=rows, inputs=inputs):
            return native.pack_tile_rows([(x.ctypes.data, inputs, inputs, False)], rows)

        def bf16(weight=weight, y=y, rows=rows, inputs=inputs, outputs=outputs, packed=packed):
            tiles = native.bf16_tiles(weight.ctypes.data, inputs)
            native.tile_products(tiles, outputs, packed(), rows, y.ctypes.data, outputs, False, None, kernel)

        def codes(layer=layer, y=y, rows=rows, outputs=outputs, packed=packed):
            cpu_expansion.tile_product(layer, packed(), rows, 0, outputs, y, False, None, kernel)

        made[f"{name}, bf16"] = (2.0 * rows * inputs * outputs, bf16)
        made[f"{name}, 4-bit"] = (2.0 * rows * inputs * outputs, codes)
    tokens = image_tokens + text_tokens
    q, k, v = (rng.standard_normal((1, HEADS, tokens, HEAD_DIM), np.float32) for _ in range(3))
    out = np.empty_like(q)
    made["attention"] = (
        4.0 * HEADS * tokens**2 * HEAD_DIM,
        lambda: native.attend(q, k, v, HEAD_DIM**-0.5, out, kernel),
    )
    return made


def other_build(source: Path, folder: Path) -> ctypes.CDLL:
    """The kernels of the tree whose src folder is `source`, compiled as this tree's are."""
    built = folder / "before.so"
    native.build(native.compiler()[0], built, tuple(source / "flux1" / "nn" / s.name for s in native.SOURCES))
    return native.declared(ctypes.CDLL(str(built)))


@contextlib.contextmanager
def calling(kernels: ctypes.CDLL):
    """native's wrappers call `kernels` inside the block."""
    own = native.library
    native.library = lambda: kernels
    try:
        yield
    finally:
        native.library = own


def revision(source: Path) -> str:
    found = subprocess.run(
        ["git", "-C", str(source), "describe", "--always", "--dirty"], capture_output=True, text=True
    )
    return found.stdout.strip() or str(source)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--before", type=Path, required=True, help="the src folder of the tree to compare with"
    )
    parser.add_argument("--calls", type=int, default=12, help="timed calls of each case and build")
    parser.add_argument("--size", type=int, default=512, help="image side: (size / 16)^2 image tokens")
    parser.add_argument("--text-tokens", type=int, default=256)
    parser.add_argument(
        "--kernel", choices=("tiles", "vectors"), help="the products' (default: the tiles where they run)"
    )
    args = parser.parse_args()
    sources = [args.before / "flux1" / "nn" / s.name for s in native.SOURCES]
    if missing := [str(s) for s in sources if not s.is_file()]:
        sys.exit(
            f"--before {args.before}: expected the src folder of a flux1 tree; missing {', '.join(missing)}"
        )
    running = native.gemm_kernels()
    kernel = args.kernel or (running[0] if running else "tiles")
    if kernel not in running:
        sys.exit(f"--kernel {kernel}: the native kernels do not run on this machine in {kernel}")
    image_tokens = (args.size // 16) ** 2
    with tempfile.TemporaryDirectory() as folder:
        builds = {"before": other_build(args.before, Path(folder)), "after": native.library()}
        print(
            f"\nnative kernels, before {revision(args.before)} / after {revision(ROOT)}; {image_tokens} image + "
            f"{args.text_tokens} text tokens; products in {kernel}; GFLOP/s, median of {args.calls} calls each, the builds' calls "
            f"alternated; CPU: {cpu_model()}"
        )
        print(f"{'case':<28}{'GFLOP':>9}{'before':>9}{'after':>9}{'after/before':>14}")
        for case, (work, call) in cases(image_tokens, args.text_tokens, kernel).items():
            seconds = {side: [] for side in builds}
            for turn in range(args.calls + 1):  # the first pair warms up
                for side in list(builds)[:: 1 if turn % 2 == 0 else -1]:
                    with calling(builds[side]):
                        start = time.perf_counter()
                        call()
                        seconds[side].append(time.perf_counter() - start)
            before, after = (np.array(seconds[side][1:]) for side in builds)
            rate = {side: work / statistics.median(seconds[side][1:]) / 1e9 for side in builds}
            print(
                f"{case:<28}{work / 1e9:>9.2f}{rate['before']:>9.0f}{rate['after']:>9.0f}"
                f"{statistics.median(before / after):>14.3f}"
            )


if __name__ == "__main__":
    main()
