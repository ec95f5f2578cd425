"""Two ranks on this machine under `mlx.launch --backend ring` against one process: peak RSS per rank
with --tensor-parallel, bytes each rank exchanges per denoising step, images per minute of data
parallel; and the model of how each scales across machines from the measured compute and exchange.

    python benchmarks/distributed.py [--preset wide] [--size 256] [--steps 2] [--images 4]
    python benchmarks/distributed.py --preset full -q 4 --modes tensor --calls 0   # 12B: memory only

Two ranks on one 2-core machine share its cores (one BLAS thread each), so data parallel cannot be
faster here; what it shows is that the work is split and costs nothing extra.
"""

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import cpu_model, fixture_folder, fixture_parser, run_measured  # noqa: E402

MAIN = Path(__file__).resolve().parent.parent / "main.py"


def launch(ranks: int, args: list[str]):
    """`args` (a script and its flags) on `ranks` ranks, or as one plain process for 1 rank; the peak
    RSS is that of the largest process (rusage of the launcher's descendants)."""
    if ranks == 1:
        return run_measured(args)
    command = [shutil.which("mlx.launch"), "-n", str(ranks), "--backend", "ring", "--env"]
    command += [f"OPENBLAS_NUM_THREADS={max(1, (os.cpu_count() or 1) // ranks)}", "--python", sys.executable]
    return run_measured([*command, *args])


def step_probe() -> None:
    """Under mlx.launch (or alone): load the transformer, time one call; each rank prints its
    seconds, exchanged bytes, shard bytes read from disk and transformer bytes held."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from flux1.distributed import tensor_parallel
    from flux1.distributed.ranks import world
    from flux1.pipeline import Flux1
    from flux1.weights import slices
    from measure import transformer_inputs

    folder, size, calls = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    quantize = int(sys.argv[5]) if sys.argv[5:] else None
    group = world()
    flux = Flux1.from_path(folder, quantize=quantize, group=group, tensor_parallel=group.size() > 1)
    transformer = flux.load("transformer")
    held = sum(a.nbytes for _, a in tree_flatten(transformer.parameters()))
    held += sum(
        a.nbytes
        for m in transformer.modules()
        for x in getattr(m, "adapters", [])
        for a in vars(x).values()
        if isinstance(a, mx.array)
    )
    seconds, exchanged = [float("nan")], 0
    if calls:
        inputs = transformer_inputs(transformer, size)
        mx.eval(transformer(*inputs))  # warm
        seconds = []
        for _ in range(calls):
            before = tensor_parallel.exchanged_bytes
            start = time.perf_counter()
            mx.eval(transformer(*inputs))
            seconds.append(time.perf_counter() - start)
        exchanged = tensor_parallel.exchanged_bytes - before
    report = {"rank": group.rank(), "step_s": sorted(seconds)[len(seconds) // 2], "exchanged": exchanged}
    report.update(shard_read=slices.bytes_read, held=held, calls=exchanges_per_call(transformer.config))
    print(json.dumps(report), flush=True)


def exchanges_per_call(config: dict) -> int:
    """all_sum / all_gather calls per transformer call: per double block and stream the modulation,
    attention proj and MLP output; per single block the modulation and linear2."""
    return 6 * config["num_layers"] + 2 * config["num_single_layers"]


def full_estimate(measured_ratio: float, preset: str) -> str:
    """Per-rank transformer bytes of the 12B model on 2 ranks, from its shapes (built lazily, nothing
    allocated) and the fraction of its weights that is cut, checked against the measured ratio."""
    from types import SimpleNamespace

    from mlx.utils import tree_flatten

    from flux1.configs import TRANSFORMER
    from flux1.distributed.tensor_parallel import cuts
    from flux1.models.transformer import FluxTransformer

    model = FluxTransformer(dict(TRANSFORMER))
    total = sum(a.size for _, a in tree_flatten(model.parameters()))
    layers = dict(model.named_modules())
    cut = sum(
        layers[p].weight.size + layers[p].bias.size
        for p in cuts(model.config, SimpleNamespace(rank=lambda: 0, size=lambda: 2))
    )
    share = (total - cut / 2) / total
    lines = [
        f"12B `full` (estimate, from its shapes): {total / 1e9:.2f} G parameters, {cut / total:.1%} in cut layers; per rank on 2 ranks {share:.1%} of the transformer (measured on {preset}: {measured_ratio:.1%})"
    ]
    for name, bits in (("bf16", 16), ("-q 4 (4.5 bits/weight)", 4.5)):
        whole = total * bits / 8
        lines.append(
            f"  {name}: {whole / 2**30:.1f} GiB in one process, {whole * share / 2**30:.1f} GiB per rank"
        )
    return "\n".join(lines)


def main() -> None:
    parser = fixture_parser(__doc__)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("-q", "--quantize", type=int, help="quantize at load (main.py's -q)")
    parser.add_argument("--modes", nargs="+", default=["tensor", "data"], choices=["tensor", "data"])
    parser.add_argument("--calls", type=int, default=3, help="timed transformer calls (0: memory only)")
    parser.set_defaults(size=256, dtype="bfloat16")
    options = parser.parse_args()
    folder = fixture_folder(options.cache, options.preset, options.dtype)
    common = ["--path", str(folder), "--prompt", "a lighthouse", "--low-ram", "--steps", str(options.steps)]
    common += ["--height", str(options.size), "--width", str(options.size)]
    quantize = [] if options.quantize is None else [str(options.quantize)]
    common += ["-q", *quantize] if quantize else []
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores); {platform.platform()}")
    print(
        f"{options.preset} preset, {options.dtype}{', -q ' + quantize[0] if quantize else ''}, "
        f"{options.size}x{options.size}, {options.steps} steps\n"
    )
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for mode in options.modes:
            for ranks in (1, 2):
                images = 1 if mode == "tensor" else options.images
                seeds = [str(s) for s in range(1, images + 1)]
                flags = ["--tensor-parallel"] if mode == "tensor" and ranks > 1 else []
                run = launch(
                    ranks,
                    [str(MAIN), *common, "--seed", *seeds, *flags, "--output", f"{out}/{mode}{ranks}.png"],
                )
                if run.returncode or "exited with code" in run.stdout + run.stderr:
                    sys.exit(run.stderr[-3000:])
                rows.append((f"{mode} parallel", ranks, images, run.seconds, run.peak_rss_gb))
        probes = {}
        for ranks in (1, 2):
            probe = [__file__, "--probe", str(folder), str(options.size), str(options.calls), *quantize]
            run = launch(ranks, probe)
            if run.returncode or "exited with code" in run.stdout + run.stderr:
                sys.exit(run.stderr[-3000:])
            lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
            probes[ranks] = sorted(lines, key=lambda r: r["rank"])
    print(f"date {time.strftime('%Y-%m-%d')}; timings on a shared machine: medians of the calls, noisy\n")
    print("| mode | ranks | images | wall s | images/min | peak RSS GB (largest rank) |")
    print("|---|---|---|---|---|---|")
    for mode, ranks, images, seconds, rss in rows:
        print(f"| {mode} | {ranks} | {images} | {seconds:.1f} | {60 * images / seconds:.2f} | {rss:.2f} |")
    one, two = probes[1][0], probes[2]
    ratio = max(r["held"] for r in two) / one["held"]
    print(
        f"\ntransformer held: 1 process {one['held'] / 2**30:.2f} GiB; per rank on 2 ranks "
        + ", ".join(f"{r['held'] / 2**30:.2f}" for r in two)
        + f" GiB ({ratio:.1%}); read from disk in part by each rank: "
        + ", ".join(f"{r['shard_read'] / 2**30:.2f}" for r in two)
        + " GiB (the rest, uncut layers, read whole)"
    )
    if options.calls:
        print_scaling(options.size, one, two, [r for r in rows if r[0] == "data parallel"])
    print(full_estimate(ratio, options.preset))


def print_scaling(size: int, one: dict, two: list[dict], data_rows: list) -> None:
    payload, calls = two[0]["exchanged"], two[0]["calls"]
    print(
        f"transformer call ({size}x{size}): 1 process {one['step_s']:.3f} s; 2 ranks "
        f"tensor parallel {two[0]['step_s']:.3f} s (sharing 2 cores); exchanged {payload / 2**20:.1f} MiB "
        f"per rank per call in {calls} all_sum/all_gather calls"
    )
    single = f"n x {60 * data_rows[0][2] / data_rows[0][3]:.2f}" if data_rows else "not run"
    print(
        "model, n machines: data parallel = n x images/min of one (no exchange per step: "
        f"{single}); tensor parallel step = t1/n + calls x latency + 2(n-1)/n x payload / "
        "bandwidth (a ring all_sum sends 2(n-1)/n of its payload per rank), t1 the one-process step"
    )
    for link, gbit, latency in (("10 GbE", 10, 50e-6), ("Thunderbolt 5", 80, 20e-6)):
        comm = calls * latency + payload * 8 / (gbit * 1e9)  # n = 2: 2(n-1)/n = 1
        print(
            f"  {link} ({gbit} Gbit/s, {latency * 1e6:.0f} us per exchange assumed), n=2: "
            f"{one['step_s']:.3f}/2 + {comm:.3f} = {one['step_s'] / 2 + comm:.3f} s per step "
            f"(speed-up {one['step_s'] / (one['step_s'] / 2 + comm):.2f}x)"
        )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--probe"]:
        import flux1  # noqa: F401  (first: loads the BLAS)

        step_probe()
    else:
        main()
