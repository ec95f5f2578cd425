"""Two ranks on this machine under `mlx.launch --backend ring` against one process: peak RSS per rank
with --tensor-parallel, bytes each rank exchanges per denoising step, images per minute of data
parallel; and the model of how each scales across machines from the measured compute and exchange.

    python benchmarks/distributed.py [--preset wide] [--size 256] [--steps 2] [--images 4]

Two ranks on one 2-core machine share its cores (one BLAS thread each), so data parallel cannot be
faster here; what it shows is that the work is split and costs nothing extra.
"""

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import fixture_folder, fixture_parser, run_measured  # noqa: E402

MAIN = Path(__file__).resolve().parent.parent / "main.py"


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line), "?")


def launch(ranks: int, args: list[str]):
    """`args` (a script and its flags) on `ranks` ranks, or as one plain process for 1 rank; the peak
    RSS is that of the largest process (rusage of the launcher's descendants)."""
    if ranks == 1:
        return run_measured(args)
    command = [shutil.which("mlx.launch"), "-n", str(ranks), "--backend", "ring", "--env"]
    command += [f"OPENBLAS_NUM_THREADS={max(1, (os.cpu_count() or 1) // ranks)}", "--python", sys.executable]
    return run_measured([*command, *args])


def step_probe() -> None:
    """Under mlx.launch (or alone): one transformer call, its seconds and this rank's exchanged bytes."""
    import time

    import mlx.core as mx

    from flux1.distributed import tensor_parallel
    from flux1.distributed.ranks import world
    from flux1.pipeline import Flux1
    from measure import transformer_inputs

    folder, size = sys.argv[2], int(sys.argv[3])
    group = world()
    flux = Flux1.from_path(folder, group=group, tensor_parallel=group.size() > 1)
    transformer = flux.load("transformer")
    inputs = transformer_inputs(transformer, size)
    mx.eval(transformer(*inputs))  # warm
    seconds = []
    for _ in range(3):
        before = tensor_parallel.exchanged_bytes
        start = time.perf_counter()
        mx.eval(transformer(*inputs))
        seconds.append(time.perf_counter() - start)
    if group.rank() == 0:
        step = sorted(seconds)[1]
        print(json.dumps({"step_s": step, "exchanged": tensor_parallel.exchanged_bytes - before}), flush=True)


def main() -> None:
    parser = fixture_parser(__doc__)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--images", type=int, default=4)
    parser.set_defaults(size=256, dtype="bfloat16")
    options = parser.parse_args()
    folder = fixture_folder(options.cache, options.preset, options.dtype)
    common = ["--path", str(folder), "--prompt", "a lighthouse", "--low-ram", "--steps", str(options.steps)]
    common += ["--height", str(options.size), "--width", str(options.size)]
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores); {platform.platform()}")
    print(f"{options.preset} preset, {options.dtype}, {options.size}x{options.size}, {options.steps} steps\n")
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for ranks, mode in (
            (1, "tensor parallel"),
            (2, "tensor parallel"),
            (1, "data parallel"),
            (2, "data parallel"),
        ):
            images = 1 if mode == "tensor parallel" else options.images
            seeds = [str(s) for s in range(1, images + 1)]
            flags = ["--tensor-parallel"] if mode == "tensor parallel" and ranks > 1 else []
            run = launch(
                ranks,
                [str(MAIN), *common, "--seed", *seeds, *flags, "--output", f"{out}/{mode[0]}{ranks}.png"],
            )
            if run.returncode or "exited with code" in run.stdout + run.stderr:
                sys.exit(run.stderr[-3000:])
            rows.append((mode, ranks, images, run.seconds, run.peak_rss_gb))
        probes = {}
        for ranks in (1, 2):
            run = launch(ranks, [__file__, "--probe", str(folder), str(options.size)])
            if run.returncode or "exited with code" in run.stdout + run.stderr:
                sys.exit(run.stderr[-3000:])
            probes[ranks] = json.loads(run.stdout.strip().splitlines()[-1])
    print("| mode | ranks | images | wall s | images/min | peak RSS GB (largest rank) |")
    print("|---|---|---|---|---|---|")
    for mode, ranks, images, seconds, rss in rows:
        print(f"| {mode} | {ranks} | {images} | {seconds:.1f} | {60 * images / seconds:.2f} | {rss:.2f} |")
    one, two = probes[1], probes[2]
    payload = two["exchanged"]
    wire = payload * 2 * (2 - 1) / 2  # a ring all_sum sends 2 (n-1)/n of the payload per rank
    print(
        f"\ntransformer call: 1 rank {one['step_s']:.3f} s, 2 ranks tensor parallel {two['step_s']:.3f} s; "
        f"payload of the all_sums/all_gathers {payload / 2**20:.1f} MiB per rank per step "
        f"(ring: about {wire / 2**20:.1f} MiB sent per rank)"
    )
    for gbit in (10, 40):
        comm = wire * 8 / (gbit * 1e9)
        print(
            f"model, n machines at {gbit} Gbit/s: tensor parallel step = {one['step_s']:.3f}/n + "
            f"{comm:.3f} s of exchange (n=2: {one['step_s'] / 2 + comm:.3f} s, ignoring latency); "
            f"data parallel = n x {60 * rows[2][2] / rows[2][3]:.2f} images/min (no exchange per step)"
        )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--probe"]:
        import flux1  # noqa: F401  (first: loads the BLAS)

        step_probe()
    else:
        main()
