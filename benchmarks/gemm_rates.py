"""GEMM rates on FLUX's own shapes: every GEMM path of the CPU plan against torch's, on this CPU.

The plan chooses among the libraries flux1 loads (NumPy's BLAS, MKL, oneDNN from PyPI); the reference
implementations run on torch, which bundles its own oneDNN. This prints, shape by shape, the GFLOP/s
of each (the operands already in the product's dtype: the pure product, no rounding or bias), and one
head of attention each way: flux1's (`attend_heads` through the plan's pair of GEMM paths, and where
they run, each native kernel: a head's average over all heads of a layer) and torch's
`scaled_dot_product_attention`. torch runs in a child process (its
own OpenMP runtime, as in compare.py), with as many threads as there are cores.

    python benchmarks/gemm_rates.py [--size 512] [--text-tokens 256] [--repeats 5] [--no-torch]
"""

import argparse
import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import HEAD_DIM, HEADS, cpu_model, linear_shapes  # noqa: E402  (no flux1: the torch child imports this module too)


def best_seconds(call, repeats: int) -> float:
    call()  # the library's start-up for this shape
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def torch_rates(size: int, text_tokens: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    rates = {}
    for dtype, name in ((torch.bfloat16, "torch bf16"), (torch.float32, "torch fp32")):
        for what, m, k, n in linear_shapes((size // 16) ** 2, text_tokens):
            x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
            with torch.no_grad():
                seconds = best_seconds(partial(torch.nn.functional.linear, x, w), repeats)
            rates[f"{name}|{what}"] = 2.0 * m * k * n / seconds / 1e9
        tokens = (size // 16) ** 2 + text_tokens
        q, k, v = (torch.randn(1, HEADS, tokens, HEAD_DIM, dtype=dtype) for _ in range(3))
        with torch.no_grad():
            attend = partial(torch.nn.functional.scaled_dot_product_attention, q, k, v)
            seconds = best_seconds(attend, repeats)
        rates[f"{name}|attention head"] = 4.0 * HEADS * tokens * tokens * HEAD_DIM / seconds / 1e9
    dnnl = next((line.strip() for line in torch.__config__.show().splitlines() if "DNN" in line), "?")
    return {"rates": rates, "library": f"torch {torch.__version__} ({dnnl.lstrip('- ')})"}


def flux1_rates(size: int, text_tokens: int, repeats: int) -> tuple[dict, list[str], list[str]]:
    """(rates, their columns, the libraries of the plan's GEMM paths)."""
    import flux1  # noqa: F401  (first: loads the BLAS before mlx)
    from flux1 import cpu_plan
    from flux1.nn.attention import attend_heads
    from flux1.nn.cpu_attention import NATIVE
    from flux1.nn.gemm import available_paths, gemm, operand

    rng = np.random.default_rng(0)
    rates, names = {}, list(available_paths())
    for what, m, k, n in linear_shapes((size // 16) ** 2, text_tokens):
        x, w = rng.standard_normal((m, k), np.float32), rng.standard_normal((n, k), np.float32)
        out = np.empty((m, n), np.float32)
        for name, path in available_paths().items():
            a, b = operand(x, path), operand(w, path).T  # the weight as Linear holds it, [out, in]
            seconds = best_seconds(partial(gemm, path, a, b, out=out), repeats)
            rates[f"{name}|{what}"] = 2.0 * m * k * n / seconds / 1e9
    tokens = (size // 16) ** 2 + text_tokens
    q, k, v = (rng.standard_normal((1, HEADS, tokens, HEAD_DIM), np.float32) for _ in range(3))
    out = np.empty_like(q)
    bf16 = any(p.dtype == "bf16" for p in available_paths().values())
    for precision in (
        ["fp32"] + ["bf16"] * bf16 + [name for name in NATIVE if name in cpu_plan.attention_pairs()]
    ):
        gemm_pair = precision not in NATIVE
        with cpu_plan.use(precision):
            pair = " + ".join(p.name for p in cpu_plan.active("attention", gemm_pair))
            attend = partial(attend_heads, q, k, v, HEAD_DIM**-0.5, None, out, gemm_pair)
            seconds = best_seconds(attend, repeats)
        name = f"flux1 attention {precision} ({pair})" if gemm_pair else f"flux1 attention ({precision})"
        rates[f"{name}|attention head"] = 4.0 * HEADS * tokens * tokens * HEAD_DIM / seconds / 1e9
        names.append(name)
    return rates, names, sorted({path.library for path in available_paths().values()})


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--text-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-torch", action="store_true", help="only flux1's paths")
    parser.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_child:
        print(json.dumps(torch_rates(args.size, args.text_tokens, args.repeats)))
        return
    torch = {"rates": {}, "library": None}
    if not args.no_torch:
        child = [sys.executable, str(Path(__file__).resolve()), "--torch-child"]
        child += [
            "--size",
            str(args.size),
            "--text-tokens",
            str(args.text_tokens),
            "--repeats",
            str(args.repeats),
        ]
        result = subprocess.run(child, capture_output=True, text=True)
        if result.returncode:
            sys.exit(f"torch's rates failed:\n{result.stderr[-3000:]}")
        torch = json.loads(result.stdout.splitlines()[-1])
    rates, columns, libraries = flux1_rates(args.size, args.text_tokens, args.repeats)
    rates.update(torch["rates"])
    columns += sorted({key.split("|")[0] for key in torch["rates"]})

    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; {'; '.join(libraries)}")
    if torch["library"]:
        print(f"torch: {torch['library']}")
    print(f"{args.size}x{args.size}, {args.text_tokens} text tokens; GFLOP/s, best of {args.repeats}")
    rows = [what for what, *_ in linear_shapes((args.size // 16) ** 2, args.text_tokens)] + ["attention head"]
    print("| shape | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for what in rows:
        cells = [f"{rates[f'{c}|{what}']:.0f}" if f"{c}|{what}" in rates else "" for c in columns]
        print(f"| {what} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
