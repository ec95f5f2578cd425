"""Cost of the generation modes against text to image, flux1 and diffusers side by side: the seconds
of one denoising step with true CFG (both prompts as one batch of 2) over a plain step, and the
denoising seconds of img2img at S = 0.5 (half the steps) over text to image.

    python benchmarks/modes.py --preset wide --size 256 --steps 4 --repeats 2
"""

import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import flux1  # (first: loads the BLAS)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import fixture_folder, runs_parser  # noqa: E402

PROMPT, NEGATIVE = "Luxury food photograph", "blurry, low quality"
ROWS = {
    "text to image": {},
    "true CFG 4.0": {"negative_prompt": NEGATIVE, "true_cfg_scale": 4.0},
    "img2img S=0.5": {"image_strength": 0.5},
}


def run_flux1(flux, config, image, noise, options: dict) -> tuple[float, int]:
    """(denoising seconds, steps run)."""
    extra = {**options, "image": image} if "image_strength" in options else options
    result = flux.generate_image(0, PROMPT, config, latents=noise, progress=False, **extra)
    return result.timings.denoise, result.timings.steps


def run_diffusers(pipes: dict, size: int, steps: int, image, noise, options: dict) -> tuple[float, int]:
    import torch

    times = []

    def on_step(_pipe, _i, _t, tensors):
        times.append(time.perf_counter())
        return tensors

    call = dict(
        height=size, width=size, num_inference_steps=steps, output_type="latent", callback_on_step_end=on_step
    )
    packed = torch.from_numpy(np.array(flux1.latents.pack(noise)))
    if "image_strength" in options:
        pipe, call = pipes["img2img"], {**call, "image": image, "strength": 1 - options["image_strength"]}
    else:
        pipe = pipes["text"]
        call = {**call, "latents": packed, "negative_prompt": options.get("negative_prompt")}
        call["true_cfg_scale"] = options.get("true_cfg_scale", 1.0)
    with torch.no_grad():
        pipe(PROMPT, generator=torch.Generator().manual_seed(0), **call)
    # callbacks mark the end of each step: n - 1 intervals, scaled to n steps (the prompt encoding
    # before the first step is not denoising)
    return (times[-1] - times[0]) * len(times) / (len(times) - 1), len(times)


def main() -> None:
    parser = runs_parser(__doc__, size=256)
    args = parser.parse_args()
    import torch
    from diffusers import FluxImg2ImgPipeline, FluxPipeline
    from PIL import Image

    from flux1 import Config, Flux1, latents

    torch.set_num_threads(2)
    folder = fixture_folder(args.cache, args.preset, "float32")
    flux = Flux1.from_path(folder)
    text = FluxPipeline.from_pretrained(folder, dtype=torch.float32)
    pipes = {"text": text, "img2img": FluxImg2ImgPipeline.from_pipe(text)}
    config = Config(num_inference_steps=args.steps, height=args.size, width=args.size)
    noise = latents.noise(0, args.size, args.size)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (args.size // 8, args.size // 8, 3), np.uint8)).resize(
        (args.size, args.size)
    )
    seconds = {(row, who): [] for row in ROWS for who in ("flux1", "diffusers")}
    steps = {}
    for round_ in range(args.repeats + 1):  # the first round warms up and is dropped
        print(f"round {round_} of {args.repeats}", file=sys.stderr, flush=True)
        for row, options in ROWS.items():
            seconds[row, "flux1"].append(run_flux1(flux, config, image, noise, options)[0])
            took, steps[row] = run_diffusers(pipes, args.size, args.steps, image, noise, options)
            seconds[row, "diffusers"].append(took)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), "?")
    print(
        f"\n{args.preset} preset, {args.size}x{args.size}, {args.steps} steps, median of {args.repeats}; CPU: {model}"
    )
    print(f"{'mode':16} {'steps':>5} {'flux1 s':>8} {'x plain':>8} {'diffusers s':>12} {'x plain':>8}")
    plain = {who: statistics.median(seconds["text to image", who][1:]) for who in ("flux1", "diffusers")}
    for row in ROWS:
        f, d = (statistics.median(seconds[row, who][1:]) for who in ("flux1", "diffusers"))
        print(
            f"{row:16} {steps[row]:>5} {f:>8.2f} {f / plain['flux1']:>8.2f} {d:>12.2f} {d / plain['diffusers']:>8.2f}"
        )


if __name__ == "__main__":
    main()
