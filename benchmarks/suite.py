"""The seed notebook's benchmark suite on any model flux1 loads (a hub alias, a diffusers folder, a
folder saved by save.py, a BFL single file or a GGUF): five prompts, one per category (text rendering,
photorealism, spatial reasoning, artistic style, composition), then one prompt at 1, 2, 4 and 8 steps;
seconds per image, resident memory at load, after generating and after releasing the models; a contact
sheet (the images in a grid, each titled with its category or step count and seconds), the table as
Markdown and JSON, each image as a PNG, and, only if matplotlib is installed, a plot of seconds per
step count.

    python benchmarks/suite.py --model schnell -q 8 --out suite-schnell-q8
    python benchmarks/suite.py --gguf flux1-schnell-Q4_K_S.gguf --out suite-q4ks
    python benchmarks/suite.py --path ~/models/schnell-q4 --size 1024 --steps 2
"""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import cpu_model  # noqa: E402

PROMPTS = {  # category -> prompt (the step counts use the photorealism prompt)
    "text rendering": 'A hand-painted wooden sign on a beach that reads "OPEN ALL NIGHT" in bold red letters',
    "photorealism": "A photorealistic portrait of an old beekeeper at golden hour, 85mm lens, shallow depth of field",
    "spatial reasoning": "A blue cube on top of a red sphere, to the left of a green pyramid, on a white table",
    "artistic style": "A fox in a snowy pine forest as a Japanese woodblock print, ukiyo-e, flat colours",
    "composition": "A rainy night market: a noodle stall in front, paper lanterns above, a cat under a table",
}
STEP_COUNTS = (1, 2, 4, 8)
STEP_PROMPT = "photorealism"


def rss_gb() -> tuple[float, float]:
    """(resident now, peak so far) in GB, of this process."""
    import psutil  # requirements-dev.txt; the peak is the kernel's own count

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak *= 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return psutil.Process().memory_info().rss / 1e9, peak / 1e9


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "-m", help="schnell, dev or a hub repo id")
    p.add_argument("--path", help="a diffusers folder, a save.py folder or a BFL .safetensors file")
    p.add_argument("--gguf", help="a GGUF transformer (other parts from --path, --model or its base model)")
    p.add_argument("--base-model", choices=["schnell", "dev"])
    p.add_argument("--quantize", "-q", type=int)
    p.add_argument("--low-ram", action="store_true")
    p.add_argument("--size", type=int, default=512, help="height and width (default 512, as the notebook)")
    p.add_argument("--steps", type=int, help="steps of the category images (default: the model's)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", type=Path, default=Path("suite"), help="a new or empty folder")
    args = p.parse_args()
    if not (args.model or args.path or args.gguf):
        p.error("give --model, --path or --gguf")
    if args.out.exists() and any(args.out.iterdir()):
        p.error(f"--out {args.out}: not empty (nothing is overwritten)")
    return args


def main() -> None:
    args = parse()
    import flux1  # noqa: F401  (first: loads the BLAS before mlx)
    from flux1 import Config, Flux1, cpu_plan
    from flux1.model_files import resolve
    from flux1.pipeline import NETWORKS
    from flux1.sheet import titled_grid

    if args.path:
        files = resolve(path=args.path, base_model=args.base_model or args.model, gguf=args.gguf)
    else:
        files = resolve(model=args.model, base_model=args.base_model, gguf=args.gguf)
    flux = Flux1(files, quantize=args.quantize, low_ram=args.low_ram)
    memory = {"start": rss_gb()}
    start = time.perf_counter()
    if not args.low_ram:  # low RAM loads each model when it is used
        for name in NETWORKS:
            flux.load(name)
    load_seconds = time.perf_counter() - start
    memory["after load"] = rss_gb()
    steps = args.steps or Config().steps_for(files.base_model)
    jobs = [(category, category, prompt, steps) for category, prompt in PROMPTS.items()]
    jobs += [(f"{n} step{'s' * (n > 1)}", STEP_PROMPT, PROMPTS[STEP_PROMPT], n) for n in STEP_COUNTS]
    args.out.mkdir(parents=True, exist_ok=True)
    rows, pictures = [], []
    for title, category, prompt, n in jobs:
        config = Config(num_inference_steps=n, height=args.size, width=args.size)
        start = time.perf_counter()
        image = flux.generate_image(args.seed, prompt, config, progress=False)
        seconds = time.perf_counter() - start
        name = title.replace(" ", "_") + ".png"
        image.save(args.out / name)
        t = image.timings
        rows.append(
            {
                "title": title,
                "category": category,
                "prompt": prompt,
                "steps": n,
                "seconds": round(seconds, 3),
                "encode": round(t.encode, 3),
                "denoise": round(t.denoise, 3),
                "decode": round(t.decode, 3),
                "load": round(t.load, 3),
                "image": name,
            }
        )
        pictures.append(image.pixels)
        print(f"{title:<18} {seconds:8.2f} s", flush=True)
    memory["after generation"] = rss_gb()
    flux.release()
    memory["after release"] = rss_gb()

    scale = min(1.0, 256 / args.size)
    titles = [(row["title"], f"{row['seconds']:.1f} s") for row in rows]
    titled_grid(pictures, titles, columns=len(PROMPTS), scale=scale).save(args.out / "contact_sheet.png")
    summary = {
        "cpu": cpu_model(),
        "compute": cpu_plan.describe(quantized=flux.quantization_bits is not None),
        "model": files.name,
        "base_model": files.base_model,
        "quantize": flux.quantization_bits,
        "low_ram": args.low_ram,
        "size": args.size,
        "seed": args.seed,
        "load_seconds": round(load_seconds, 3),
        "images": rows,
        "memory_gb": {k: {"rss": round(v[0], 3), "peak_rss": round(v[1], 3)} for k, v in memory.items()},
    }
    (args.out / "suite.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "suite.md").write_text(markdown(summary))
    print(markdown(summary))
    plot(rows, args.out / "seconds_per_step_count.png")


def markdown(summary: dict) -> str:
    lines = [
        f"FLUX.1-{summary['base_model']} ({summary['model']}, quantize {summary['quantize']}), "
        f"{summary['size']}x{summary['size']}, seed {summary['seed']}; CPU: {summary['cpu']}; "
        f"{summary['compute']}; load {summary['load_seconds']:.1f} s",
        "",
        "| image | steps | seconds | encode s | denoise s | decode s |",
        "|---|---|---|---|---|---|",
    ]
    for row in summary["images"]:
        lines.append(
            f"| {row['title']} | {row['steps']} | {row['seconds']:.2f} | {row['encode']:.2f} "
            f"| {row['denoise']:.2f} | {row['decode']:.2f} |"
        )
    lines += ["", "| memory | RSS GB | peak RSS GB |", "|---|---|---|"]
    for point, value in summary["memory_gb"].items():
        lines.append(f"| {point} | {value['rss']:.2f} | {value['peak_rss']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Seconds per step count, drawn only where matplotlib is installed (an optional extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (the contact sheet and tables stand alone)")
        return
    counts = [row for row in rows if row["title"].endswith(("step", "steps"))]
    figure, axes = plt.subplots(figsize=(5, 3.5))
    axes.plot([r["steps"] for r in counts], [r["seconds"] for r in counts], marker="o")
    axes.set_xlabel("steps")
    axes.set_ylabel("seconds per image")
    axes.set_xticks(list(STEP_COUNTS))
    figure.tight_layout()
    figure.savefig(path)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
