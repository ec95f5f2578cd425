"""Load time and peak memory of the GGUF transformer loader alone, against the saved -q 4 folder of the
same weights, and optionally against another checkout's loader (the code before a change).

Builds (or reuses) the fixture (random bf16 weights; `wide`: real widths, 1 double + 1 single block),
its transformer as GGUF files of each type, and its transformer saved at -q 4 (group 64). Each load
runs in its own process (imports excluded from the time, included in the peak RSS: the row "imports
only" is that floor), all rows alternated `--repeats` times; medians. The files are in the page cache.

    python benchmarks/gguf_load.py [--preset wide] [--types Q4_K Q8_0 Q6_K] [--before OTHER/src] [--repeats 3]
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import fixture_folder, gguf_fixture, run_measured  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LOAD = """
import sys, time
import flux1  # first: loads the BLAS before mlx
import mlx.core as mx
from mlx.utils import tree_flatten
kind, source = sys.argv[1:3]
start = time.perf_counter()
if kind == "gguf":
    from flux1.loaders.gguf import load_transformer_gguf
    model = load_transformer_gguf(source)
elif kind == "saved":
    from flux1.loaders.transformer import load_transformer
    model = load_transformer(source)
if kind != "none":
    mx.eval(model.parameters())
    print(time.perf_counter() - start, sum(a.nbytes for _, a in tree_flatten(model.parameters())))
else:
    print(0, 0)
"""


def cpu_model() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def load(src: Path, kind: str, source: Path, compute: str = "auto") -> tuple[float, float, float]:
    """(seconds, held GB, peak RSS GB) of one load in its own process."""
    env = {"PYTHONPATH": str(src), "FLUX1_COMPUTE": compute}
    result = run_measured(["-c", LOAD, kind, str(source)], env=env)
    if result.returncode:
        sys.exit(f"loading {source} failed:\n{result.stderr[-3000:]}")
    seconds, held = result.stdout.split()[-2:]
    return float(seconds), int(held) / 2**30, result.peak_rss_gb


def ensure_saved(fixture: Path, out: Path) -> None:
    if (out / "model_index.json").is_file():
        return
    print(f"saving {out} ...", flush=True)
    result = run_measured([str(ROOT / "save.py"), "--source", str(fixture), "--path", str(out), "-q", "4"])
    if result.returncode:
        sys.exit(result.stderr[-3000:])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="wide", choices=["tiny", "wide", "full"])
    parser.add_argument("--types", nargs="+", default=["Q4_K", "Q8_0", "Q6_K"])
    parser.add_argument("--before", type=Path, help="the src/ folder of another checkout, e.g. main's")
    parser.add_argument("--mlx", action="store_true", help="also load for MLX's kernels (FLUX1_COMPUTE=mlx)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "flux1-bench")
    args = parser.parse_args()
    os.environ.pop("FLUX1_COMPUTE", None)
    fixture = fixture_folder(args.cache, args.preset, "bfloat16")
    saved = args.cache / f"{args.preset}-schnell-q4"
    ensure_saved(fixture, saved)
    src = ROOT / "src"
    rows = {"imports only": (src, "none", saved / "transformer", "auto")}
    rows["saved -q 4"] = (src, "saved", saved / "transformer", "auto")
    for qtype in args.types:
        gguf_file = gguf_fixture(fixture, qtype)
        rows[f"{qtype}"] = (src, "gguf", gguf_file, "auto")
        if args.mlx:
            rows[f"{qtype}, FLUX1_COMPUTE=mlx"] = (src, "gguf", gguf_file, "mlx")
        if args.before:
            rows[f"{qtype}, before"] = (args.before, "gguf", gguf_file, "auto")
    runs = {name: [] for name in rows}
    for _ in range(args.repeats):
        for name, row in rows.items():
            runs[name].append(load(*row))
    print(f"\nGGUF transformer load, {args.preset} preset, median of {args.repeats}, GB = 2^30 bytes")
    print(f"CPU: {cpu_model()}")
    print(f"{'row':<30}{'file GB':>9}{'load s':>9}{'held GB':>9}{'peak RSS GB':>13}")
    for name, (_, kind, source, _) in rows.items():
        size = source.stat().st_size if source.is_file() else sum(f.stat().st_size for f in source.glob("*"))
        seconds, held, peak = (statistics.median(r[i] for r in runs[name]) for i in range(3))
        disk = "" if kind == "none" else f"{size / 2**30:.3f}"
        print(f"{name:<30}{disk:>9}{seconds:>9.2f}{held:>9.3f}{peak:>13.3f}")


if __name__ == "__main__":
    main()
