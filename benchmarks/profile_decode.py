"""Where a VAE decode's time goes, through each convolution path of the CPU plan.

Decodes random latents of a fixture's VAE (default `wide`, 512x512) once per path named with
`--paths` (default: the plan's choice), after a warm-up decode, with every convolution, GroupNorm,
resnet block, upsampling block and attention block timed on its own (each evaluated before and
after; resnet and upsampling blocks include their convolutions and norms; on the CPU kernels these blocks
pass NumPy arrays between them, `nn/cpu_vae.py`).

    python benchmarks/profile_decode.py [--preset wide] [--dtype bfloat16] [--size 512]
        [--paths "onednn convolution fp32" "numpy fp32" ... | numpy onednn (the activations' paths)]
"""

import sys
import time
from collections import defaultdict
from pathlib import Path

import flux1  # noqa: F401  (first: loads the BLAS before mlx)

# isort: split
import mlx.core as mx

from flux1 import cpu_plan
from flux1.loaders.vae import load_vae
from flux1.models import vae as vae_module
from flux1.nn import cpu_vae

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import cpu_model, fixture_folder, fixture_parser  # noqa: E402

seconds: dict[str, float] = defaultdict(float)
running: set[str] = set()  # parts being timed: a call nested in its own part counts once


def timed(part: str, function):
    def wrapper(*args, **kwargs):
        if part in running:
            return function(*args, **kwargs)
        mx.eval([a for a in args if isinstance(a, mx.array)])
        running.add(part)
        start = time.perf_counter()
        try:
            result = function(*args, **kwargs)
            mx.eval(result if isinstance(result, mx.array) else [])
        finally:
            running.discard(part)
        seconds[part] += time.perf_counter() - start
        return result

    return wrapper


def main() -> None:
    parser = fixture_parser(__doc__)
    parser.add_argument("--paths", nargs="+", default=["auto"])
    args = parser.parse_args()
    vae = load_vae(fixture_folder(args.cache, args.preset, args.dtype) / "vae")
    plan = cpu_plan.plan()
    took = f", took {plan.seconds:.1f} s" if plan.seconds else ""
    print(f"CPU: {cpu_model()}; plan measured {plan.measured}{took}: convolution {plan.rates['convolution']}")
    z = mx.random.normal((1, args.size // 8, args.size // 8, 16), key=mx.random.key(0))
    mx.eval(vae.decode(z))  # warm-up: the libraries' start-up for these shapes
    vae_module.conv2d = timed("convolutions", vae_module.conv2d)
    vae_module.group_norm = timed("GroupNorm (+ SiLU)", vae_module.group_norm)
    # Inside the resnet and upsampling blocks on the CPU kernels (nn/cpu_vae.py) the same, on NumPy
    # arrays; there the decoder's up blocks call the NumPy blocks themselves.
    cpu_vae.convolve = timed("convolutions", cpu_vae.convolve)
    cpu_vae.normalized = timed("GroupNorm (+ SiLU)", cpu_vae.normalized)
    cpu_vae.numpy_resnet_block = timed("ResnetBlock blocks", cpu_vae.numpy_resnet_block)
    cpu_vae.numpy_upsampled = timed("Upsample blocks", cpu_vae.numpy_upsampled)
    for block in (vae_module.ResnetBlock, vae_module.Upsample, vae_module.AttentionBlock):
        block.__call__ = timed(f"{block.__name__} blocks", block.__call__)
    print(f"{args.preset} VAE ({args.dtype} weights), decode to {args.size}x{args.size}")
    for path in args.paths:
        seconds.clear()
        with cpu_plan.use(path):
            start = time.perf_counter()
            mx.eval(vae.decode(z))
            total = time.perf_counter() - start
            names = cpu_plan.active("convolution").name, cpu_plan.active("activation").name
        parts = ", ".join(f"{part} {value:.2f}" for part, value in seconds.items())
        print(
            f"--paths {path} (convolutions: {names[0]}; activations: {names[1]}): decode {total:.2f} s; {parts}"
        )


if __name__ == "__main__":
    main()
