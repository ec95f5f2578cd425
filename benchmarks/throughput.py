"""Images per minute at batch 1, 2 and 4: flux1's `generate_images(batch_size=N)` against diffusers'
FluxPipeline with `num_images_per_prompt=N`, on the same fixture weights, prompt, size and steps.

Each (row, batch) is its own process (its peak resident memory is its own), runs alternate so drift in
the machine's speed shows, and the table gives the median seconds of one batch after loading
(encoding, the steps and decoding of N images), images per minute, the seconds of one denoising step
of the batch, and the peak RSS: batching adds activations only, the weights are loaded once.

    python benchmarks/throughput.py [--preset wide] [--size 512] [--steps 4] [--batches 1 2 4] [--repeats 2]
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import cpu_model, fixture_folder, run_measured, runs_parser  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
ROWS = {  # name -> (implementation, fixture dtype)
    "flux1 default": ("flux1", "bfloat16"),
    "flux1 --precision fp32": ("flux1", "float32"),
    "diffusers fp32": ("diffusers", "float32"),
    "diffusers bf16": ("diffusers", "bfloat16"),
}
DEFAULT_ROWS = ["flux1 default", "diffusers fp32"]


def worker_flux1(fixture: Path, size: int, steps: int, batch: int, precision: str) -> dict:
    import flux1  # noqa: F401  (first: loads the BLAS before mlx)
    from flux1 import Config, Flux1, cpu_plan

    flux = Flux1.from_path(fixture, precision=precision)
    for name in ("clip", "t5", "transformer", "vae"):
        flux.load(name)
    start = time.perf_counter()
    images = flux.generate_images(
        list(range(batch)), PROMPT, Config(steps, size, size), batch, progress=False
    )
    seconds = time.perf_counter() - start
    with cpu_plan.use(precision):
        plan = cpu_plan.describe(quantized=flux.quantization_bits is not None)
    return {"seconds": seconds, "step": statistics.median(images[0].timings.step_seconds), "plan": plan}


def worker_diffusers(fixture: Path, size: int, steps: int, batch: int, dtype: str) -> dict:
    import torch
    from diffusers import FluxPipeline

    torch.set_num_threads(2)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    pipe = FluxPipeline.from_pretrained(fixture, dtype=torch_dtype)
    stamps = []

    def on_step(pipe, i, t, kwargs):
        stamps.append(time.perf_counter())
        return kwargs

    with torch.no_grad():
        start = time.perf_counter()
        stamps.append(start)
        pipe(
            PROMPT,
            height=size,
            width=size,
            num_inference_steps=steps,
            num_images_per_prompt=batch,
            max_sequence_length=256,  # flux1's schnell length
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            callback_on_step_end=on_step,
        )
        seconds = time.perf_counter() - start
    steps_seconds = [b - a for a, b in zip(stamps[1:-1], stamps[2:])] or [stamps[-1] - stamps[0]]
    return {"seconds": seconds, "step": statistics.median(steps_seconds)}


def main() -> None:
    parser = runs_parser(__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=list(ROWS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        implementation, dtype = ROWS[args.worker]
        fixture = fixture_folder(args.cache, args.preset, dtype)
        if implementation == "flux1":
            precision = "fp32" if "fp32" in args.worker else "auto"
            result = worker_flux1(fixture, args.size, args.steps, args.batch, precision)
        else:
            result = worker_diffusers(fixture, args.size, args.steps, args.batch, dtype)
        args.out.write_text(json.dumps(result))
        return

    args.cache.mkdir(parents=True, exist_ok=True)
    for dtype in {ROWS[r][1] for r in args.rows}:
        fixture_folder(args.cache, args.preset, dtype)
    results: dict[tuple[str, int], list[dict]] = {(r, b): [] for r in args.rows for b in args.batches}
    for repeat in range(args.repeats):
        for batch in args.batches:
            for row in args.rows:
                out = args.cache / f"throughput-{row.replace(' ', '_')}-{batch}.json"
                command = [__file__, "--worker", row, "--batch", str(batch), "--out", str(out)]
                command += ["--preset", args.preset, "--size", str(args.size), "--steps", str(args.steps)]
                measured = run_measured([*command, "--cache", str(args.cache)])
                if measured.returncode:
                    sys.exit(f"{row} batch {batch} failed:\n{measured.stderr[-3000:]}")
                result = json.loads(out.read_text()) | {"peak_gb": measured.peak_rss_gb}
                results[(row, batch)].append(result)
                print(f"run {repeat + 1} {row} batch {batch}: {result['seconds']:.1f}s", flush=True)

    print(
        f"\n{args.preset} preset, {args.size}x{args.size}, {args.steps} steps, median of {args.repeats} "
        f"runs each; CPU: {cpu_model()}"
    )
    for row in args.rows:
        first = results[(row, args.batches[0])][0]
        if "plan" in first:
            print(f"{row}: {first['plan']}")
    print(f"{'row':<24}{'batch':>6}{'batch s':>9}{'images/min':>12}{'step s':>8}{'peak GB':>9}")
    for (row, batch), runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        step = statistics.median(r["step"] for r in runs)
        peak = statistics.median(r["peak_gb"] for r in runs)
        print(f"{row:<24}{batch:>6}{seconds:>9.1f}{60 * batch / seconds:>12.2f}{step:>8.2f}{peak:>9.2f}")


if __name__ == "__main__":
    main()
