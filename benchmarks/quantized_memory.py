"""Peak memory and speed of the real 12B FLUX.1-schnell architecture, quantized, end to end.

Builds (or reuses) the `full` fixture (random bf16 weights, real layout, 33 GB), saves it with -q 4 and
-q 8 through save.py, then runs main.py on each at 512x512 and prints peak resident memory of the whole
run, load time, seconds per step, decode time and the saved folder's size; beside them, the transformer
as a GGUF file (Q4_K by default; the fixture builder writes it) with the other components from the
saved -q 4 folder when --bits has 4 (so that only the transformer differs), else from the bf16
fixture at -q 4. The files each run reads are read once right before it, so that every load is timed
from the page cache (on disk, the order of the runs decided which loads were cold). Each step is set
against its floor: the step's floating-point work (`measure.transformer_flops`) at the rate of the
GEMM the CPU plan uses (`--precision auto`, as main.py), measured here right before and after each run
(their mean: a shared machine's speed drifts), and at the rate the plan itself measured when it was
made (`/ plan`).

    python benchmarks/quantized_memory.py [--cache DIR] [--steps 4] [--bits 4 8] [--runtime] [--gguf Q4_K]
"""

import argparse
import json
import re
import sys
from pathlib import Path

import flux1  # noqa: F401  (first: loads the BLAS before mlx)
from flux1 import cpu_plan

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import cpu_model, gemm_rate, gguf_fixture, plan_rate, run_measured, transformer_flops  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TEXT_TOKENS = 256  # schnell's T5 sequence length, main.py's default
TIMINGS = re.compile(
    r"load (?P<load>[\d.]+)s, encode (?P<encode>[\d.]+)s, denoise [\d.]+s \((?P<step>[\d.]+)s/step\), "
    r"decode (?P<decode>[\d.]+)s"
)


def folder_gb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**30


def ensure(cmd: list[str], target: Path, what: str) -> None:
    if (target / "model_index.json").is_file():
        return
    print(f"building {what} in {target} ...", flush=True)
    result = run_measured(cmd)
    if result.returncode:
        sys.exit(f"{what} failed:\n{result.stderr[-3000:]}")
    print(f"  {result.seconds:.0f}s, peak {result.peak_rss_gb:.1f} GB", flush=True)


def read_once(paths: list[Path]) -> None:
    """Bring the files under `paths` into the page cache."""
    files = [f for path in paths for f in ([path] if path.is_file() else sorted(path.rglob("*")))]
    for file in (f for f in files if f.is_file()):
        with open(file, "rb") as handle:
            while handle.read(64 * 2**20):
                pass


def generate(source: Path, steps: int, size: int, extra: list[str], out: Path, reads: list[Path]) -> dict:
    """One main.py run on `source`, its files (`reads`) read once before it."""
    out.unlink(missing_ok=True)
    read_once(reads)
    rate_before = gemm_rate()
    result = run_measured(
        [
            str(ROOT / "main.py"),
            "--path",
            str(source),
            "--prompt",
            "a lighthouse at dusk",
            "--seed",
            "0",
            "--steps",
            str(steps),
            "--height",
            str(size),
            "--width",
            str(size),
            "--low-ram",
            "--output",
            str(out),
            *extra,
        ]
    )
    if result.returncode:
        sys.exit(f"main.py failed:\n{result.stderr[-3000:]}")
    timings = {k: float(v) for k, v in TIMINGS.search(result.stdout).groupdict().items()}
    rate = (rate_before + gemm_rate()) / 2
    return {"peak_gb": result.peak_rss_gb, "total_s": result.seconds, "rate": rate, **timings}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "flux1-bench")
    parser.add_argument(
        "--preset", default="full", choices=["tiny", "wide", "full"], help="tiny: a smoke test"
    )
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument(
        "--bits", type=int, nargs="*", default=[4, 8], help="saved -q levels to run; none: skip"
    )
    parser.add_argument(
        "--runtime", action="store_true", help="also quantize at load time from the bf16 folder"
    )
    parser.add_argument(
        "--gguf",
        nargs="*",
        default=["Q4_K"],
        metavar="TYPE",
        help="also run the transformer as a GGUF file of each type (text encoders at -q 4); none: skip",
    )
    args = parser.parse_args()
    fixture = args.cache / f"{args.preset}-schnell-bfloat16"
    build = ["-m", "flux1.fixtures", "--preset", args.preset, "--variant", "schnell", "--dtype", "bfloat16"]
    ensure([*build, "--out", str(fixture)], fixture, f"the {args.preset} bf16 fixture")
    cpu_plan.set_precision("auto")
    image_tokens = (args.size // 16) ** 2
    config = json.loads((fixture / "transformer" / "config.json").read_text())
    flops = transformer_flops(config, image_tokens, TEXT_TOKENS)
    rows = []
    for bits in args.bits:
        saved = args.cache / f"{args.preset}-schnell-q{bits}"
        ensure(
            [str(ROOT / "save.py"), "--source", str(fixture), "--path", str(saved), "-q", str(bits)],
            saved,
            f"the {bits}-bit save",
        )
        rows.append(
            (
                f"saved -q {bits}",
                folder_gb(saved),
                generate(saved, args.steps, args.size, [], args.cache / "image.png", [saved]),
            )
        )
        if args.runtime:
            rows.append(
                (
                    f"bf16 + -q {bits} at load",
                    folder_gb(fixture),
                    generate(
                        fixture, args.steps, args.size, ["-q", str(bits)], args.cache / "image.png", [fixture]
                    ),
                )
            )
    for qtype in args.gguf:
        gguf_file = gguf_fixture(fixture, qtype)
        saved4 = args.cache / f"{args.preset}-schnell-q4"
        others, extra = (saved4, []) if 4 in args.bits else (fixture, ["-q", "4"])
        rows.append(
            (
                f"gguf {qtype}, text -q 4",
                gguf_file.stat().st_size / 2**30,
                generate(
                    others,
                    args.steps,
                    args.size,
                    ["--gguf", str(gguf_file), *extra],
                    args.cache / "image.png",
                    [gguf_file, *(part for part in others.iterdir() if part.name != "transformer")],
                ),
            )
        )
    print(
        f"\nFLUX.1-schnell, {args.preset} preset, {args.size}x{args.size}, {args.steps} steps, --low-ram; "
        "each run's files read once before it (loads from the page cache)"
    )
    print(f"CPU: {cpu_model()}; {cpu_plan.describe(quantized=True)}")
    rate, measured = plan_rate()
    print(
        f"step floor: {flops / 1e12:.2f} TFLOP ({image_tokens} image + {TEXT_TOKENS} text tokens) at the "
        f"{cpu_plan.active().name} GEMM's rate around each run (/ floor), and at the plan's own "
        f"{rate / 1e9:.1f} GFLOP/s, measured {measured} (/ plan)"
    )
    print(
        f"{'run':<24}{'on disk GB':>11}{'peak RSS GB':>12}{'load s':>9}{'encode s':>10}{'s/step':>9}"
        f"{'GFLOP/s':>9}{'/ floor':>9}{'/ plan':>8}{'decode s':>10}{'total s':>9}"
    )
    for name, disk, r in rows:
        print(
            f"{name:<24}{disk:>11.2f}{r['peak_gb']:>12.2f}{r['load']:>9.1f}{r['encode']:>10.1f}"
            f"{r['step']:>9.1f}{r['rate'] / 1e9:>9.1f}{r['step'] * r['rate'] / flops:>9.2f}"
            f"{r['step'] * rate / flops:>8.2f}{r['decode']:>10.1f}{r['total_s']:>9.0f}"
        )


if __name__ == "__main__":
    main()
