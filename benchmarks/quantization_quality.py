"""What each quantization level costs in quality, on the `wide` preset (real widths, random weights).

For each bit width (group size 64): the relative error ||v_q - v|| / ||v|| of the transformer's
velocity against the unquantized transformer on the same inputs (the prompt's text states from the
unquantized encoders, the initial noise of seed 0, sigma 1), and the PSNR of the whole pipeline's
image (every network quantized as `-q N` does it) against the unquantized image of the same seed.

    python benchmarks/quantization_quality.py [--preset wide] [--size 512] [--steps 4] [--bits 8 6 5 4 3]
"""

import sys
from pathlib import Path

import flux1  # noqa: F401  (first: loads the BLAS before mlx)

# isort: split
import mlx.core as mx
import numpy as np

from flux1 import Config, Flux1, latents
from flux1.loaders.transformer import load_transformer
from flux1.quantize import quantize_linears

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import fixture_folder, fixture_parser  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
GROUP_SIZE = 64


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def velocity(transformer_folder: Path, bits: int | None, inputs: tuple) -> np.ndarray:
    transformer = load_transformer(transformer_folder)
    if bits is not None:
        quantize_linears(transformer, bits, GROUP_SIZE)
    v = transformer(*inputs)
    mx.eval(v)
    return np.array(v, dtype=np.float64)


def main() -> None:
    parser = fixture_parser(__doc__)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 6, 5, 4, 3])
    args = parser.parse_args()
    fixture = fixture_folder(args.cache, args.preset, args.dtype)
    config = Config(args.steps, args.size, args.size)

    reference = Flux1.from_path(fixture)
    hidden, pooled = reference.encode_prompt(PROMPT, 256)
    x = latents.pack(latents.noise(0, args.size, args.size))
    inputs = (
        x,
        latents.image_ids(args.size, args.size),
        hidden,
        mx.zeros((1, hidden.shape[1], 3)),
        mx.array([1.0]),
        pooled,
    )
    v_reference = velocity(reference.files.transformer, None, inputs)
    image_reference, _, _ = reference.generate_array(0, PROMPT, config, progress=False)
    del reference

    print(
        f"\n{args.preset} preset ({args.dtype} weights), {args.size}x{args.size}, {args.steps} steps, "
        f"seed 0, group size {GROUP_SIZE}"
    )
    print(f"{'bits':>4}{'velocity rel. error':>21}{'image PSNR dB':>15}")
    for bits in args.bits:
        v = velocity(fixture / "transformer", bits, inputs)
        error = np.linalg.norm(v - v_reference) / np.linalg.norm(v_reference)
        image, _, _ = Flux1.from_path(fixture, quantize=bits, group_size=GROUP_SIZE).generate_array(
            0, PROMPT, config, progress=False
        )
        print(f"{bits:>4}{error:>21.4f}{psnr(image, image_reference):>15.1f}", flush=True)


if __name__ == "__main__":
    main()
