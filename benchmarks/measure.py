"""Helpers of the benchmarks: run a child process measuring its wall time and peak resident memory;
build (or reuse) a fixture."""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

WIDTH, HIDDEN, HEADS, HEAD_DIM = 3072, 12288, 24, 128  # FLUX.1's transformer


def linear_shapes(image_tokens: int, text_tokens: int) -> list[tuple[str, int, int, int]]:
    """(what, rows, in, out) of a FLUX step's linear layers."""
    layers = [
        ("qkv", WIDTH, 3 * WIDTH),
        ("proj", WIDTH, WIDTH),
        ("mlp up", WIDTH, HIDDEN),
        ("mlp down", HIDDEN, WIDTH),
    ]
    rows = [(f"double {name}, image", image_tokens, k, n) for name, k, n in layers]
    rows += [(f"double {name}, text", text_tokens, k, n) for name, k, n in layers]
    joint = image_tokens + text_tokens
    rows += [
        ("single linear1", joint, WIDTH, 3 * WIDTH + HIDDEN),
        ("single linear2", joint, WIDTH + HIDDEN, WIDTH),
    ]
    return rows


@dataclass
class Measured:
    seconds: float
    peak_rss_gb: float
    stdout: str
    stderr: str
    returncode: int


def run_measured(args: list[str], env: dict | None = None) -> Measured:
    """Run `args` (with this Python when they start with a .py file, -m or -c); the peak RSS is the
    child's own, from the rusage that wait4 returns for it."""
    if args[0].endswith(".py") or args[0] in ("-m", "-c"):
        args = [sys.executable, *args]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen(args, stdout=out, stderr=err, text=True, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Measured(seconds, usage.ru_maxrss * 1024 / 2**30, out.read(), err.read(), process.returncode)


def cpu_model() -> str:
    """The CPU's model name, as `lscpu` gives it (benchmarks print it with every table)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        import platform

        return platform.processor() or platform.machine()


def fixture_folder(cache: Path, preset: str, dtype: str) -> Path:
    folder = cache / f"{preset}-schnell-{dtype}"
    if not (folder / "model_index.json").is_file():
        print(f"building {folder} ...", flush=True)
        result = run_measured(
            [
                "-m",
                "flux1.fixtures",
                "--preset",
                preset,
                "--variant",
                "schnell",
                "--dtype",
                dtype,
                "--out",
                str(folder),
            ]
        )
        if result.returncode:
            sys.exit(result.stderr[-3000:])
    return folder


def _parser(doc: str, size: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="wide", choices=["tiny", "wide", "full"])
    parser.add_argument("--size", type=int, default=size)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "flux1-bench")
    return parser


def gguf_fixture(fixture: Path, qtype: str) -> Path:
    """The transformer of the `fixture` folder as a GGUF file of `qtype` beside it, written by the
    fixture builder if missing (`<preset>-schnell-<qtype>.gguf` for a bf16 fixture)."""
    out = fixture.parent / f"{fixture.name.removesuffix('-bfloat16')}-{qtype}.gguf"
    if not out.is_file():
        print(f"writing {out} ...", flush=True)
        script = "import sys; from flux1.fixtures.gguf import write_gguf; write_gguf(*sys.argv[1:])"
        result = run_measured(["-c", script, str(fixture / "transformer"), str(out), qtype])
        if result.returncode:
            sys.exit(f"writing {out} failed:\n{result.stderr[-3000:]}")
        print(f"  {result.seconds:.0f}s, peak {result.peak_rss_gb:.1f} GB", flush=True)
    return out


def fixture_parser(doc: str) -> argparse.ArgumentParser:
    """The options every in-process benchmark shares: which fixture, at which image size."""
    parser = _parser(doc, 512)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    return parser


def runs_parser(doc: str, size: int = 512) -> argparse.ArgumentParser:
    """The options of the benchmarks that run whole generations, each in its own process, rows
    interleaved: which fixture, image size, steps and runs of each row."""
    parser = _parser(doc, size)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each row, interleaved A B A B")
    return parser


def gemm_rate() -> float:
    """FLOP/s of the GEMM the CPU kernels use now (`cpu_plan.active()`) on a 4096 x 3072 x 3072
    product, the weight transposed as Linear passes it; best of 3 after a first call."""
    import numpy as np

    from flux1 import cpu_plan
    from flux1.nn.gemm import gemm, operand

    path = cpu_plan.active()
    a = operand(np.ones((4096, 3072), np.float32), path)
    b = operand(np.ones((3072, 3072), np.float32), path)
    out = np.empty((4096, 3072), np.float32)
    gemm(path, a, b.T, out)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        gemm(path, a, b.T, out)
        best = min(best, time.perf_counter() - start)
    return 2.0 * 4096 * 3072 * 3072 / best


def plan_rate() -> tuple[float, str]:
    """(FLOP/s, when it was measured) of the GEMM the CPU kernels use now as the CPU plan measured it
    on FLUX's linear shapes: the rate issue 15's floors are defined by."""
    from flux1 import cpu_plan

    plan = cpu_plan.plan()
    return plan.rates["linear"][cpu_plan.active().name] * 1e9, plan.measured


def transformer_flops(config: dict, image_tokens: int, text_tokens: int) -> float:
    """Floating-point work of one FLUX transformer call at batch 1, from its diffusers config: 2 * rows
    * in * out per linear layer (rows: the tokens it sees, 1 for the per-image embedders and
    modulations), 4 * heads * tokens^2 * head_dim per attention; what profile_step.py counts."""
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    dim = heads * head_dim
    hidden = int(dim * 4.0)  # FLUX's MLP ratio
    tokens = image_tokens + text_tokens
    in_channels = config.get("in_channels", 64)
    embedders = (256 + dim) + (config["pooled_projection_dim"] + dim)
    if config.get("guidance_embeds"):
        embedders += 256 + dim
    per_image = dim * embedders + dim * (
        config["num_layers"] * 12 * dim + config["num_single_layers"] * 3 * dim
    )
    per_image += dim * 2 * dim  # the last layer's modulation
    # Per token: a double block's stream and a single block each multiply by dim * (4 dim + 2 hidden).
    per_token = dim * (4 * dim + 2 * hidden) * (config["num_layers"] + config["num_single_layers"])
    edges = image_tokens * in_channels * dim + text_tokens * config["joint_attention_dim"] * dim
    edges += image_tokens * dim * (config.get("out_channels") or in_channels)
    attention = 4.0 * heads * tokens**2 * head_dim * (config["num_layers"] + config["num_single_layers"])
    return 2.0 * (per_image + tokens * per_token + edges) + attention


def transformer_inputs(transformer, size: int, text_tokens: int = 256) -> list:
    """Evaluated inputs of one transformer call at `size` x `size` (random text states, sigma 1)."""
    import mlx.core as mx  # the caller imported flux1 first (it loads the BLAS)

    from flux1 import latents

    inputs = [
        latents.pack(latents.noise(0, size, size)),
        latents.image_ids(size, size),
        mx.random.normal((1, text_tokens, transformer.txt_in.input_dims)),
        mx.zeros((1, text_tokens, 3)),
        mx.array([1.0]),
        mx.random.normal((1, transformer.vector_in.in_layer.input_dims)),
        *([mx.array([3.5])] if transformer.guidance_embeds else []),
    ]
    mx.eval(inputs)
    return inputs
