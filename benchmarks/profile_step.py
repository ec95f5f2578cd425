"""Where one denoising step's time goes, and how far it is from the BLAS floor.

Runs the transformer of a fixture (default `wide`, 512x512) once to warm up, then once with every
linear layer (an MLP's first with its GELU), attention, RoPE and adaptive norm timed on its own (each evaluated before and
after, so the parts are separated; the sum is a little above an unprofiled step, which is also
timed). The floor is the step's floating-point work (2 * tokens * in * out per linear layer,
4 * heads * tokens^2 * head_dim per attention) divided by the rate of the GEMM the CPU plan uses at
this precision (`cpu_plan.active()`), measured here on a 4096 x 3072 x 3072 product through it
(best of 3, right before each step), and at the rate the plan itself measured on FLUX's linear
shapes when it was made (issue 15's "plan's own GEMM rate": one moment of this machine's speed), and where
this run measured the plan, how long that took.

With `--quantize BITS` the transformer is quantized as `main.py -q BITS` does, with `--gguf TYPE`
loaded from the fixture's transformer as a GGUF file of that type (written beside the fixture if
missing), and expanding the compact weights before each GEMM (part of the linear layers' time) is
also timed on its own. `--path` names one GEMM path of the plan (`cpu_plan.use`) for the whole
step, e.g. flux1's own GEMM in AVX512-BF16 vectors where the plan takes another.

    python benchmarks/profile_step.py [--preset wide] [--dtype float32] [--size 512] [--repeats 3]
        [--precision auto|fp32|bf16] [--path GEMM] [--quantize BITS | --gguf TYPE]
"""

import contextlib
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import flux1  # noqa: F401  (first: loads the BLAS before mlx)

# isort: split
import mlx.core as mx

from flux1 import cpu_plan
from flux1.gguf.blocks import DENSE, SUPPORTED
from flux1.loaders.gguf import load_transformer_gguf
from flux1.loaders.transformer import load_transformer
from flux1.models import flux_blocks
from flux1.nn import cpu_flux_blocks, cpu_linear, cpu_rope_attention
from flux1.nn.cpu_expansion import quantized_paths
from flux1.nn.gemm import available_paths
from flux1.nn.linear import Linear
from flux1.quantize import BITS, quantize_linears

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import (  # noqa: E402
    cpu_model,
    fixture_folder,
    fixture_parser,
    gemm_rate,
    gguf_fixture,
    plan_rate,
    transformer_flops,
    transformer_inputs,
)

seconds: dict[str, float] = defaultdict(float)
flops: dict[str, float] = defaultdict(float)


running: set[str] = set()  # categories being timed: a call nested in its own category counts once


def timed(category: str, function, count_flops=None):
    def wrapper(*args, **kwargs):
        if category in running:
            return function(*args, **kwargs)
        mx.eval([a for a in args if isinstance(a, (mx.array, list))])
        start = time.perf_counter()
        running.add(category)
        try:
            out = function(*args, **kwargs)
            mx.eval(out)
        finally:
            running.discard(category)
        seconds[category] += time.perf_counter() - start
        if count_flops:
            flops[category] += count_flops(*args)
        return out

    return wrapper


def linear_flops(layer: Linear, x: mx.array | list[mx.array], *_) -> float:
    first = x[0] if isinstance(x, list) else x  # the parts of a concatenation share its rows
    return 2.0 * first.size // first.shape[-1] * layer.input_dims * layer.output_dims


def numpy_linear_flops(x: list, layer: Linear, *_) -> float:
    return linear_flops(layer, x)


def attention_flops(q: mx.array, k: mx.array, *_) -> float:
    batch, heads, length, head_dim = q.shape
    return 4.0 * batch * heads * length * k.shape[2] * head_dim


def rope_attention_flops(streams: list[tuple], heads: int, *_) -> float:
    batch, tokens = streams[0][0].shape[0], sum(qkv.shape[1] for qkv, _, _ in streams)
    return 4.0 * batch * tokens * tokens * streams[0][0].shape[2] // 3


LINEAR, EXPANSION = "linear layers (+ bias, MLP GELU)", "  of which weight expansion"
ATTENTION = "attention (q k^T, softmax, @ v)"
MODULATION = "layer norm + modulation"


def instrument() -> None:
    # An MLP's GELU is computed with its first layer (`Linear.gelu_tanh`, `Linear.split_gelu_tanh`).
    for method in ("__call__", "gelu_tanh", "split_gelu_tanh"):
        setattr(Linear, method, timed(LINEAR, getattr(Linear, method), linear_flops))
    cpu_linear.numpy_linear = timed(LINEAR, cpu_linear.numpy_linear, numpy_linear_flops)
    cpu_linear.expanded_weight = timed(EXPANSION, cpu_linear.expanded_weight)
    flux_blocks.attention = timed(ATTENTION, flux_blocks.attention, attention_flops)
    flux_blocks.apply_rope = timed("RoPE", flux_blocks.apply_rope)
    flux_blocks.modulate = timed(MODULATION, flux_blocks.modulate)
    # The blocks on the CPU kernels (nn/cpu_flux_blocks.py) call these between NumPy arrays.
    cpu_flux_blocks.modulated = timed(MODULATION, cpu_flux_blocks.modulated)
    cpu_flux_blocks.gated_sum = timed("gated residual sums", cpu_flux_blocks.gated_sum)
    flux_blocks.split_heads = timed("q/k RMS norm + head split", flux_blocks.split_heads)
    # The CPU kernels' path of the same (nn/cpu_rope_attention.py): q/k norms, RoPE and head split in one.
    heads = timed("q/k RMS norm + RoPE + head split", cpu_rope_attention.normed_rotated_heads)
    cpu_rope_attention.normed_rotated_heads = heads
    cpu_rope_attention.attend_heads = timed(ATTENTION, cpu_rope_attention.attend_heads, attention_flops)
    # The native attention normalizes and rotates q and k as it packs them: timed as one.
    native = timed(
        "attention + q/k RMS norm + RoPE", cpu_rope_attention.native_rope_attention, rope_attention_flops
    )
    cpu_rope_attention.native_rope_attention = native


def main() -> None:
    parser = fixture_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="unprofiled steps timed (median)")
    parser.add_argument("--precision", default="auto", choices=cpu_plan.PRECISIONS)
    parser.add_argument(
        "--path",
        choices=[*available_paths(), *quantized_paths()],
        help="this GEMM path, or way of multiplying 4-bit layers (cpu_plan.use), in place of the plan's choice",
    )
    compact = parser.add_mutually_exclusive_group()
    compact.add_argument("--quantize", type=int, choices=BITS, help="quantize as main.py -q does")
    types = [t.name for t in SUPPORTED if t not in DENSE]
    compact.add_argument("--gguf", choices=types, help="load as a GGUF file of this type")
    args = parser.parse_args()
    cpu_plan.set_precision(args.precision)
    with cpu_plan.use(args.path) if args.path else contextlib.nullcontext():
        profile(args)


def profile(args) -> None:
    fixture = fixture_folder(args.cache, args.preset, args.dtype)
    if args.gguf:
        transformer = load_transformer_gguf(gguf_fixture(fixture, args.gguf))
    else:
        transformer = load_transformer(fixture / "transformer")
    if args.quantize:
        quantize_linears(transformer, args.quantize, 64)
    mx.eval(transformer.parameters())
    text_tokens = 256
    inputs = transformer_inputs(transformer, args.size, text_tokens)

    def step() -> float:
        start = time.perf_counter()
        mx.eval(transformer(*inputs))
        return time.perf_counter() - start

    step()
    work = transformer_flops(transformer.config, inputs[0].shape[1], text_tokens)
    # Each unprofiled step right after a measurement of the GEMM's rate: where this machine's speed
    # drifts (a shared VM), a step is set against the rate of its own moment.
    timed_steps = [(gemm_rate(), step()) for _ in range(args.repeats)]
    step_seconds = statistics.median(seconds for _, seconds in timed_steps)
    instrument()
    profiled = step()
    counted = sum(flops.values())
    others = profiled - sum(seconds.values()) + seconds.get(EXPANSION, 0.0)  # inside LINEAR

    plan = cpu_plan.plan()
    for kind in cpu_plan.KINDS:
        unit, digits = ("G values/s", 2) if kind in ("activation", "expansion") else ("GFLOP/s", 0)
        rates = ", ".join(f"{name} {rate:.{digits}f}" for name, rate in plan.rates[kind].items())
        print(f"plan, {kind} ({unit}, measured {plan.measured}): {rates}")
    if plan.seconds:  # measured in this process, not read from the cache
        print(f"plan measured in this run in {plan.seconds:.1f} s")
    compact = f", -q {args.quantize}" if args.quantize else f", GGUF {args.gguf}" if args.gguf else ""
    weights = f"{args.dtype} weights{compact}"
    print(
        f"\n{args.preset} preset ({weights}), {args.size}x{args.size}, {text_tokens} text tokens, "
        f"--precision {args.precision}" + (f", --path {args.path}" if args.path else "")
    )
    print(f"CPU: {cpu_model()}; {cpu_plan.describe(quantized=bool(args.quantize or args.gguf))}")
    print(f"{'part':<34}{'seconds':>9}{'share':>8}{'GFLOP':>9}{'GFLOP/s':>9}")
    parts = sorted((name for name in seconds if name != EXPANSION), key=lambda name: -seconds[name])
    if EXPANSION in seconds:
        parts.insert(parts.index(LINEAR) + 1, EXPANSION)
    for name in parts:
        value = seconds[name]
        gflop = flops.get(name, 0.0) / 1e9
        speed = f"{gflop / value:>9.1f}" if gflop else f"{'-':>9}"
        print(f"{name:<34}{value:>9.3f}{value / profiled:>8.1%}{gflop:>9.1f}{speed}")
    print(f"{'everything else':<34}{others:>9.3f}{others / profiled:>8.1%}")
    print(f"{'profiled step':<34}{profiled:>9.3f}")
    print(f"{'unprofiled step (median)':<34}{step_seconds:>9.3f}")
    print(f"\nstep work {counted / 1e9:.6g} GFLOP (measure.transformer_flops: {work / 1e9:.6g})")
    fractions = [work / rate / seconds for rate, seconds in timed_steps]
    each = ", ".join(
        f"{seconds:.2f}s at {rate / 1e9:.1f} GFLOP/s: {work / rate / seconds:.0%}"
        for rate, seconds in timed_steps
    )
    print(
        f"achieved fraction of the floor (the step's work at the {cpu_plan.active().name} GEMM's rate "
        f"measured just before each step): {each}; median {statistics.median(fractions):.0%}"
    )
    rate, measured = plan_rate()
    at_plan = ", ".join(f"{work / rate / seconds:.0%}" for _, seconds in timed_steps)
    print(
        f"at the plan's own rate ({rate / 1e9:.1f} GFLOP/s, measured {measured}): floor {work / rate:.2f}s, "
        f"the steps {at_plan}"
    )


if __name__ == "__main__":
    main()
