"""flux1 against diffusers' FluxPipeline on the same weights, prompt and initial noise.

Each run is its own process (so peak memory is its own), runs alternate A B A B so drift in the
machine's speed shows, and the table gives seconds for text encoding, the median denoising step, all
the steps (flux1's first computes every step's modulations, which a quantized model expands once: the
median step leaves that out, the denoise total does not), decoding and the whole run, peak resident
memory, each step over the faster diffusers step (fp32 or bf16), and the PSNR of each image against
diffusers fp32's. flux1 rows name their precision (`auto` = the CPU plan's choice on this machine,
`fp32` = fp32 GEMMs) and the plan they ran.

    python benchmarks/compare.py [--preset wide] [--size 512] [--steps 4] [--repeats 2] [--rows ...]
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import cpu_model, fixture_folder, run_measured, runs_parser  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
ROWS = {  # name -> (implementation, fixture dtype, extra options)
    "flux1 default": ("flux1", "bfloat16", {"precision": "auto"}),
    "flux1 --precision fp32": ("flux1", "bfloat16", {"precision": "fp32"}),
    "flux1 fp32 weights": ("flux1", "float32", {"precision": "fp32"}),
    "flux1 -q 8": ("flux1", "bfloat16", {"quantize": 8, "precision": "auto"}),
    "flux1 -q 4": ("flux1", "bfloat16", {"quantize": 4, "precision": "auto"}),
    "diffusers fp32": ("diffusers", "float32", {}),
    "diffusers bf16": ("diffusers", "bfloat16", {}),
}
DEFAULT_ROWS = ["flux1 default", "flux1 --precision fp32", "diffusers fp32", "diffusers bf16"]


def worker_flux1(fixture: Path, noise: np.ndarray, size: int, steps: int, options: dict) -> dict:
    import flux1  # noqa: F401  (first: loads the BLAS before mlx)

    # isort: split
    import mlx.core as mx

    from flux1 import Config, Flux1, cpu_plan

    flux = Flux1.from_path(fixture, **options)  # computes at options["precision"]
    config = Config(steps, size, size)
    image, _, t = flux.generate_array(0, PROMPT, config, mx.array(noise), progress=False)
    with cpu_plan.use(flux.precision):
        plan = cpu_plan.describe(quantized=flux.quantization_bits is not None)
    return {
        "plan": plan,
        "load": t.load,
        "encode": t.encode,
        "steps": t.step_seconds,
        "decode": t.decode,
        "image": image,
        "blas": flux1._blas.loaded or "MLX's own (Accelerate on macOS, reference BLAS on Linux)",
    }


def worker_diffusers(
    fixture: Path, noise: np.ndarray, size: int, steps: int, options: dict, dtype: str
) -> dict:
    import torch
    from diffusers import FluxPipeline

    torch.set_num_threads(2)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    start = time.perf_counter()
    pipe = FluxPipeline.from_pretrained(fixture, dtype=torch_dtype)
    load = time.perf_counter() - start
    with torch.no_grad():
        start = time.perf_counter()
        prompt_embeds, pooled, _ = pipe.encode_prompt(PROMPT, None, max_sequence_length=256)
        encode = time.perf_counter() - start
        stamps = [time.perf_counter()]

        def on_step(pipe, i, t, kwargs):
            stamps.append(time.perf_counter())
            return kwargs

        latents = torch.from_numpy(noise).to(torch_dtype)
        packed = FluxPipeline._pack_latents(latents, 1, 16, size // 8, size // 8)
        out = pipe(
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled,
            height=size,
            width=size,
            num_inference_steps=steps,
            latents=packed,
            output_type="latent",
            callback_on_step_end=on_step,
        )
        start = time.perf_counter()
        z = pipe._unpack_latents(out.images, size, size, pipe.vae_scale_factor)
        z = z / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        image = pipe.vae.decode(z).sample
        image = (image / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).float().numpy()
        decode = time.perf_counter() - start
    return {"load": load, "encode": encode, "steps": list(np.diff(stamps)), "decode": decode, "image": image}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def main() -> None:
    parser = runs_parser(__doc__)
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=list(ROWS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    noise_file = args.cache / f"noise-{args.size}.npy"
    if args.worker:
        implementation, dtype, options = ROWS[args.worker]
        fixture, noise = fixture_folder(args.cache, args.preset, dtype), np.load(noise_file)
        if implementation == "flux1":
            result = worker_flux1(fixture, noise, args.size, args.steps, options)
        else:
            result = worker_diffusers(fixture, noise, args.size, args.steps, options, dtype)
        np.save(args.out.with_suffix(".npy"), result.pop("image"))
        args.out.write_text(json.dumps(result))
        return

    args.cache.mkdir(parents=True, exist_ok=True)
    np.save(
        noise_file,
        np.random.default_rng(0).standard_normal((1, 16, args.size // 8, args.size // 8)).astype(np.float32),
    )
    for dtype in {ROWS[r][1] for r in args.rows}:
        fixture_folder(args.cache, args.preset, dtype)
    results: dict[str, list[dict]] = {r: [] for r in args.rows}
    for repeat in range(args.repeats):
        for row in args.rows:
            out = args.cache / f"result-{row.replace(' ', '_')}.json"
            measured = run_measured(
                [
                    __file__,
                    "--worker",
                    row,
                    "--out",
                    str(out),
                    "--preset",
                    args.preset,
                    "--size",
                    str(args.size),
                    "--steps",
                    str(args.steps),
                    "--cache",
                    str(args.cache),
                ]
            )
            if measured.returncode:
                sys.exit(f"{row} failed:\n{measured.stderr[-3000:]}")
            result = json.loads(out.read_text())
            result.update(
                total=measured.seconds, peak_gb=measured.peak_rss_gb, image=np.load(out.with_suffix(".npy"))
            )
            results[row].append(result)
            print(  # each run's figures as it ends: an interrupted comparison keeps what it measured
                f"run {repeat + 1} {row}: encode {result['encode']:.2f} s, median step "
                f"{statistics.median(result['steps']):.2f} s, denoise {sum(result['steps']):.2f} s, "
                f"decode {result['decode']:.2f} s, total "
                f"{result['total']:.1f} s, peak {result['peak_gb']:.2f} GB",
                flush=True,
            )

    def median(row: str, key: str) -> float:
        """Over the row's runs; "steps": each run's median step, "denoise": each run's steps summed."""
        per_run = {"steps": statistics.median, "denoise": sum}
        values = [per_run[key](r["steps"]) if key in per_run else r[key] for r in results[row]]
        return statistics.median(values)

    base = "diffusers fp32" if "diffusers fp32" in results else None
    diffusers = [row for row in results if row.startswith("diffusers")]
    fastest = min(diffusers, key=lambda row: median(row, "steps")) if diffusers else None
    print(
        f"\n{args.preset} preset, {args.size}x{args.size}, {args.steps} steps, median of {args.repeats} runs each; "
        f"CPU: {cpu_model()}"
    )
    for row in args.rows:
        for plan in sorted({r["plan"] for r in results[row] if "plan" in r}):
            print(f"{row}: {plan}; BLAS loaded first: {results[row][0]['blas']}")
    print(
        f"{'row':<24}{'encode s':>9}{'step s':>8}{'denoise s':>10}{'decode s':>9}{'total s':>9}{'peak GB':>9}"
        f"{'step / fastest diffusers':>26}{'PSNR dB':>9}"
    )
    for row in args.rows:
        ratio = f"{median(row, 'steps') / median(fastest, 'steps'):.2f}" if fastest else "-"
        quality = f"{psnr(results[row][0]['image'], results[base][0]['image']):.1f}" if base else "-"
        print(
            f"{row:<24}{median(row, 'encode'):>9.2f}{median(row, 'steps'):>8.2f}{median(row, 'denoise'):>10.2f}"
            f"{median(row, 'decode'):>9.2f}"
            f"{median(row, 'total'):>9.1f}{median(row, 'peak_gb'):>9.2f}{ratio:>26}{quality:>9}"
        )


if __name__ == "__main__":
    main()
