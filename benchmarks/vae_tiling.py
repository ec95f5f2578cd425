"""Decoding one large image whole and in tiles (`--vae-tiling`), flux1 and diffusers (`enable_tiling`)
side by side on the same VAE: seconds and peak resident memory, each row its own process.

Random latents of a fixture's VAE (default `wide`: FLUX.1's real VAE widths, bf16 weights as the hub
has them; flux1 computes at its plan's precision, diffusers in fp32); the pixels of every row are
compared with flux1's whole decode and with the other implementation's same decode (largest
difference in 8-bit levels).

    python benchmarks/vae_tiling.py [--preset wide] [--size 1536] [--repeats 1] [--no-torch]
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import _parser, cpu_model, fixture_folder, run_measured  # noqa: E402

ROWS = ("flux1 whole", "flux1 --vae-tiling", "diffusers whole", "diffusers enable_tiling")


def child(folder: Path, size: int, row: str, out: Path) -> None:
    """Decode in this process and write the 8-bit image to `out` (.npy); print the decode's seconds."""
    import numpy as np

    z = np.random.default_rng(0).standard_normal((1, 16, size // 8, size // 8), dtype=np.float32)
    if row.startswith("flux1"):
        from flux1 import Config, Flux1, latents  # (first: loads the BLAS before mlx)

        # isort: split
        import mlx.core as mx

        flux = Flux1.from_path(folder)
        flux.load("vae")
        config = Config(height=size, width=size, vae_tiling="tiling" in row)
        start = time.perf_counter()
        image = flux.decode(latents.pack(mx.array(z)), config)
    else:
        import torch
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32)
        if "tiling" in row:
            vae.enable_tiling()
        start = time.perf_counter()
        scaled = torch.from_numpy(z) / vae.config.scaling_factor + vae.config.shift_factor  # as Flux1.decode
        with torch.no_grad():
            image = vae.decode(scaled).sample.numpy()[0].transpose(1, 2, 0) / 2 + 0.5
    seconds = time.perf_counter() - start
    np.save(out, np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))
    print(json.dumps({"seconds": seconds}))


def main() -> None:
    parser = _parser(__doc__, 1536)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each row, interleaved")
    parser.add_argument("--no-torch", action="store_true", help="flux1's rows only")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(Path(args.child[0]), args.size, args.child[1], Path(args.child[2]))
    import numpy as np

    folder = fixture_folder(args.cache, args.preset, "bfloat16")
    rows = ROWS[:2] if args.no_torch else ROWS
    runs = {row: [] for row in rows}
    images = {}
    for _ in range(args.repeats):
        for row in rows:
            out = folder.parent / f"vae-tiling-{row.replace(' ', '_')}.npy"
            result = run_measured([__file__, "--size", str(args.size), "--child", str(folder), row, str(out)])
            if result.returncode:
                sys.exit(f"{row} failed:\n{result.stderr[-3000:]}")
            runs[row].append((json.loads(result.stdout.splitlines()[-1])["seconds"], result.peak_rss_gb))
            images[row] = np.load(out).astype(int)
    print(
        f"CPU: {cpu_model()}; {args.preset} VAE, decode to {args.size}x{args.size}, median of {args.repeats}"
    )
    print(
        "| row | decode s | peak RSS GB | 8-bit levels from flux1 whole (most) | from the other's same decode |"
    )
    print("|---|---|---|---|---|")
    for row, other in zip(rows, ROWS[2:] + ROWS[:2]):
        seconds = statistics.median(s for s, _ in runs[row])
        peak = statistics.median(p for _, p in runs[row])
        whole = np.abs(images[row] - images["flux1 whole"]).max()
        same = np.abs(images[row] - images[other]).max() if other in images else "-"
        print(f"| {row} | {seconds:.2f} | {peak:.2f} | {whole} | {same} |")


if __name__ == "__main__":
    main()
