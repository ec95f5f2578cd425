"""Smoke tests of the benchmark scripts on the tiny preset: they run and print every row (no timing
is asserted: speed is the benchmarks' business, not the tests')."""

import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flux1.nn import cpu_expansion, native
from flux1.nn.gemm import available_paths
from flux1.sheet import LINE_HEIGHT

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_compare_prints_every_row(tmp_path):
    out = _run(
        "compare.py",
        "--preset",
        "tiny",
        "--size",
        "32",
        "--steps",
        "2",
        "--repeats",
        "1",
        "--cache",
        str(tmp_path),
    )
    table = out[out.index("tiny preset, 32x32, 2 steps") :].splitlines()
    if sys.platform == "linux" and platform.machine() == "x86_64":  # requirements.txt installs MKL there
        assert "BLAS loaded first: MKL" in table[1], table[1]
    assert table[1].startswith("flux1 default: CPU GEMMs"), table[1]
    rows = {line[:24].strip(): line.split() for line in table[4:]}
    assert list(rows) == ["flux1 default", "flux1 --precision fp32", "diffusers fp32", "diffusers bf16"]
    assert rows["diffusers fp32"][-1] == "inf"
    for cells in rows.values():  # 2 steps: their sum is twice their median (each printed to 0.01 s)
        assert abs(float(cells[-6]) - 2 * float(cells[-7])) <= 0.015, cells
    # same noise, the weights rounded to bf16 (diffusers fp32 runs the fp32 fixture): the images agree
    assert float(rows["flux1 --precision fp32"][-1]) > 45


def test_quantized_memory_prints_every_row(tmp_path):
    out = _run(
        "quantized_memory.py",
        "--preset",
        "tiny",
        "--size",
        "32",
        "--steps",
        "1",
        "--bits",
        "4",
        "8",
        "--runtime",
        "--gguf",
        "Q8_0",
        "--cache",
        str(tmp_path),
    )
    table = out[out.index("FLUX.1-schnell, tiny preset") :].splitlines()
    assert re.match(
        r"step floor: [\d.]+ TFLOP \(4 image \+ 256 text tokens\) at the (\w+ )+(fp32|bf16) GEMM's rate around "
        r"each run \(/ floor\), and at the plan's own [\d.]+ GFLOP/s, measured .* \(/ plan\)$",
        table[2],
    )
    assert "s/step  GFLOP/s  / floor  / plan" in table[3]
    for line in table[4:]:  # the GEMM's rate around the run, the step over its floor and over the plan's
        rate, ratio, plan_ratio = (float(value) for value in line[24:].split()[5:8])
        assert rate > 0 and ratio > 0 and plan_ratio > 0
    assert [line[:24].strip() for line in table[4:]] == [
        "saved -q 4",
        "bf16 + -q 4 at load",
        "saved -q 8",
        "bf16 + -q 8 at load",
        "gguf Q8_0, text -q 4",
    ]


def test_quantization_quality_prints_every_level(tmp_path):
    out = _run(
        "quantization_quality.py",
        "--preset",
        "tiny",
        "--size",
        "32",
        "--steps",
        "1",
        "--cache",
        str(tmp_path),
    )
    table = out[out.index("tiny preset (float32 weights)") :].splitlines()[2:]
    rows = {int(line.split()[0]): [float(v) for v in line.split()[1:]] for line in table}
    assert list(rows) == [8, 6, 5, 4, 3]
    errors, psnrs = [rows[b][0] for b in rows], [rows[b][1] for b in rows]
    # Fewer bits, more error: each level strictly worse than the one above it.
    assert errors == sorted(errors) and len(set(errors)) == 5
    assert psnrs == sorted(psnrs, reverse=True)


VECTORS = cpu_expansion.VECTORS


@pytest.mark.parametrize(
    "compact",
    [
        ("--quantize", "4", "-q 4"),
        ("--gguf", "Q4_K", "GGUF Q4_K"),
        pytest.param(
            ("--quantize", "4", "-q 4", "--path", VECTORS),
            marks=pytest.mark.skipif(
                VECTORS not in cpu_expansion.quantized_paths(), reason="no AVX512-BF16 here"
            ),
        ),
    ],
)
def test_profile_step_prints_every_part(tmp_path, compact):
    """Every part of a step, the floor at the plan's GEMM; with --path, through the path named."""
    option, value, weights, *path = compact
    out = _run(
        "profile_step.py", "--preset", "tiny", "--size", "32", "--repeats", "1", "--cache", str(tmp_path),
        option, value, *path,
    )  # fmt: skip
    named = f", --path {path[1]}" if path else ""
    table = out[
        out.index(
            f"tiny preset (float32 weights, {weights}), 32x32, 256 text tokens, --precision auto{named}\n"
        ) :
    ].splitlines()
    if path:
        assert (
            "; 4-bit weights multiplied from their codes in AVX512-BF16 vectors through C compiled by " in out
        )
    parts = {line[:34].strip() for line in table[3 : table.index("")]}
    # The native attention (where the plan takes it) normalizes and rotates q and k itself.
    native = "attention: whole heads" in out
    attention = ["attention + q/k RMS norm + RoPE"] if native else ["attention (q k^T, softmax, @ v)"]
    attention += [] if native else ["q/k RMS norm + RoPE + head split"]
    assert parts == {
        "linear layers (+ bias, MLP GELU)",
        "of which weight expansion",
        *attention,
        "layer norm + modulation",
        "gated residual sums",  # the blocks on the CPU kernels: in NumPy
        "everything else",
        "profiled step",
        "unprofiled step (median)",
    }
    assert re.match(
        r"achieved fraction of the floor .*: [\d.]+s at [\d.]+ GFLOP/s: \d+%; median \d+%$", table[-2]
    )
    assert re.match(
        r"at the plan's own rate \([\d.]+ GFLOP/s, measured .*\): floor [\d.]+s, the steps \d+%$", table[-1]
    )
    # The FLOP formula that quantized_memory.py uses counts what the instrumented step counted.
    counted, formula = re.search(
        r"step work ([\d.e+-]+) GFLOP \(measure.transformer_flops: ([\d.e+-]+)\)", table[-3]
    ).groups()
    assert float(counted) > 0 and counted == formula


def test_profile_decode_times_every_part(tmp_path):
    """The decode's parts, the blocks the decoder calls on NumPy arrays among them, each path named."""
    out = _run(
        "profile_decode.py", "--preset", "tiny", "--size", "32", "--cache", str(tmp_path),
        "--paths", "auto", "numpy",
    )  # fmt: skip
    lines = out[out.index("CPU: ") :].splitlines()
    assert lines[1] == "tiny VAE (float32 weights), decode to 32x32"
    for line, path in zip(lines[2:], ["auto", "numpy"], strict=True):
        head, parts = line.split(" s; ", 1)
        assert re.match(rf"--paths {path} \(convolutions: .+; activations: .+\): decode [\d.]+$", head)
        timed = dict(part.rsplit(" ", 1) for part in parts.split(", "))
        assert set(timed) == {
            "convolutions",
            "GroupNorm (+ SiLU)",
            "ResnetBlock blocks",
            "AttentionBlock blocks",
            "Upsample blocks",
        }
        assert all(float(seconds) >= 0 for seconds in timed.values())  # 2 decimals: a tiny part prints 0.00


def test_vae_tiling_prints_every_row(tmp_path):
    """128x128 is 3 x 3 of the tiny VAE's 64-pixel tiles: each implementation's tiled decode differs
    from its whole one, and flux1's decodes agree with diffusers' same decodes (bf16 weights: a few
    levels on this random VAE, which amplifies every rounding)."""
    out = _run("vae_tiling.py", "--preset", "tiny", "--size", "128", "--cache", str(tmp_path))
    table = out[out.index("| row |") :].splitlines()[2:]
    cells = {line.split(" | ")[0].strip("| "): line.strip("|").split(" | ") for line in table}
    assert list(cells) == ["flux1 whole", "flux1 --vae-tiling", "diffusers whole", "diffusers enable_tiling"]
    for row, (_, seconds, peak, from_whole, from_other) in cells.items():
        assert float(seconds) > 0 and float(peak) > 0
        assert int(from_other) <= 4
        assert (int(from_whole) > 8) == ("til" in row)


def test_lora_overhead_prints_every_row(tmp_path):
    out = _run(
        "lora_overhead.py", "--preset", "tiny", "--size", "32", "--repeats", "1", "--cache", str(tmp_path)
    )
    table = out[out.index("tiny preset (float32 weights), 32x32, LoRA rank 16") :].splitlines()[2:]
    # tiny schnell: 2 double blocks x 10 linears + 2 single x 3 + img_in, txt_in, 2 time, 2 vector, 2 final
    assert [[line[:8].strip(), line[8:32].strip()] for line in table] == [
        ["dense", "no LoRA"],
        ["dense", "34 runtime adapters"],
        ["dense", "merged"],
        ["4-bit", "no LoRA"],
        ["4-bit", "34 runtime adapters"],
    ]


def test_suite_writes_sheet_and_tables(tiny_schnell, tmp_path):
    out = tmp_path / "suite"
    stdout = _run("suite.py", "--path", str(tiny_schnell), "--size", "32", "--steps", "1", "--out", str(out))
    summary = json.loads((out / "suite.json").read_text())
    titles = ["text rendering", "photorealism", "spatial reasoning", "artistic style", "composition"]
    titles += ["1 step", "2 steps", "4 steps", "8 steps"]
    assert [row["title"] for row in summary["images"]] == titles
    assert [row["steps"] for row in summary["images"]] == [1, 1, 1, 1, 1, 1, 2, 4, 8]
    assert all(row["seconds"] > 0 for row in summary["images"])
    assert list(summary["memory_gb"]) == ["start", "after load", "after generation", "after release"]
    assert summary["cpu"] in stdout and summary["base_model"] == "schnell"
    table = (out / "suite.md").read_text().splitlines()
    assert [line.split(" | ")[0].lstrip("| ") for line in table[4:13]] == titles
    # Two rows of five cells, each the 32x32 image over a two-line title; the first cell is the image.
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.size[1] == 2 * (32 + 6 + 2 * LINE_HEIGHT) and sheet.size[0] % 5 == 0
        cell = sheet.size[0] // 5
        first = np.asarray(sheet)[:32, (cell - 32) // 2 : (cell - 32) // 2 + 32]
    with Image.open(out / "text_rendering.png") as image:
        assert np.array_equal(first, np.asarray(image))
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    assert (out / "seconds_per_step_count.png").is_file() == has_matplotlib


def test_train_step_prints_every_row(tmp_path):
    out = _run(
        "train_step.py", "--preset", "tiny", "--size", "32", "--steps", "1", "--repeats", "1",
        "--cache", str(tmp_path), "--rows", "flux1", "flux1-mlx", "diffusers",
    )  # fmt: skip
    table = out[out.index("LoRA training step, tiny preset (float32), 32x32, rank 16") :].splitlines()
    assert table[1].startswith("CPU: ") and len(table[1]) > len("CPU: ")
    rows = [line.rsplit(maxsplit=2) for line in table[3:]]
    assert [row[0] for row in rows] == ["flux1", "flux1, FLUX1_COMPUTE=mlx", "diffusers + peft"]
    assert all(float(row[1]) > 0 and float(row[2]) > 0 for row in rows)


def test_gemm_rates_prints_every_path_and_torch():
    out = _run("gemm_rates.py", "--size", "64", "--text-tokens", "16", "--repeats", "1")
    lines = out.splitlines()
    assert lines[0].startswith("CPU: ") and lines[1].startswith("torch: torch ")
    table = [line.strip("|").split("|") for line in lines if line.startswith("| ")]
    columns = [c.strip() for c in table[0][1:]]
    assert columns[: len(available_paths())] == list(available_paths())
    assert columns[-2:] == ["torch bf16", "torch fp32"]
    rows = {row[0].strip(): [c.strip() for c in row[1:]] for row in table[1:]}
    assert len(rows) == 11 and "single linear1" in rows and "attention head" in rows
    for what, cells in rows.items():
        filled = [c for c in cells if c]
        if what == "attention head":  # flux1's attention at each precision, and torch's
            assert len(filled) == len(columns) - len(available_paths())
        else:  # every GEMM path and torch in both dtypes
            assert len(filled) == len(available_paths()) + 2
        assert all(float(c) > 0 for c in filled), (what, cells)


def test_core_share_times_each_core_alone_and_all_of_them():
    """Each round: every core this process may use, alone, then all of them, the process pinned each
    time (the summary's ranges are those of the rounds' rates)."""
    cores = sorted(os.sched_getaffinity(0))
    out = _run("core_share.py", "--rounds", "2")
    lines = out.splitlines()
    assert lines[0].startswith("CPU: ") and f"cores {cores}; GEMM: " in lines[0]
    header, _, *rounds = [line.strip("|").split("|") for line in lines if line.startswith("|")]
    assert [c.strip() for c in header] == [
        "round",
        *(f"core {c} alone" for c in cores),
        "all cores",
        "all / sum alone",
    ]
    assert [int(row[0]) for row in rounds] == [1, 2]
    rates = [[float(c) for c in row[1:-1]] for row in rounds]
    assert all(rate > 0 for row in rates for rate in row)
    for row, cells in zip(rates, rounds, strict=True):
        assert abs(float(cells[-1]) - row[-1] / sum(row[:-1])) < 0.01
    summary = lines[-1 - len(cores) :]
    for at, core in enumerate(cores):
        alone = [row[at] for row in rates]
        assert summary[at].startswith(f"core {core} alone: {min(alone):.0f}-{max(alone):.0f} (median ")
    together = [row[-1] for row in rates]
    assert summary[-1].startswith(f"all cores: {min(together):.0f}-{max(together):.0f} (median ")


@pytest.mark.parametrize("kernel", native.gemm_kernels())
def test_native_kernels_times_another_trees_build_against_this_one(tmp_path, kernel):
    """The other tree: this one's C files with the tile kernel's weight blocks of 64 rows, compiled
    and timed case for case beside this build, the products in AMX tiles or AVX512-BF16 vectors;
    a folder without them is refused by name."""
    nn = tmp_path / "src" / "flux1" / "nn"
    nn.mkdir(parents=True)
    for source in (*native.SOURCES, native.HEADER):
        text = source.read_text()
        if source.name == "native_expansion.c":
            assert "#define TILE_ROWS 128\n" in text
            text = text.replace("#define TILE_ROWS 128\n", "#define TILE_ROWS 64\n")
        (nn / source.name).write_text(text)
    out = _run(
        "native_kernels.py", "--before", str(tmp_path / "src"), "--calls", "1", "--size", "64", "--text-tokens", "16",
        "--kernel", kernel,
    )  # fmt: skip
    lines = out.strip().splitlines()
    assert f"16 image + 16 text tokens; products in {kernel};" in lines[0] and "CPU: " in lines[0]
    assert lines[1].split() == ["case", "GFLOP", "before", "after", "after/before"]
    rows = [line.rsplit(maxsplit=4) for line in lines[2:]]
    layers = ["single linear1", "single linear2", "double qkv, image", "double mlp up, text"]
    names = [f"{layer}, {weight}" for layer in layers for weight in ("bf16", "4-bit")]
    assert [row[0] for row in rows] == [*names, "attention"]
    assert all(float(value) > 0 for row in rows for value in row[1:])
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "native_kernels.py"), "--before", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    missing = ", ".join(str(tmp_path / "flux1" / "nn" / source.name) for source in native.SOURCES)
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == f"--before {tmp_path}: expected the src folder of a flux1 tree; missing {missing}"
    )


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() != "x86_64", reason="Linux on x86-64 only"
)
def test_without_amx_refuses_the_tiles_to_the_command_and_its_children():
    """The command, and a process it starts, are refused the tiles' state (EPERM), so flux1's own
    kernels offer no AMX (the vectors where the CPU has AVX512-BF16); other arch_prctl calls pass."""
    child = (
        "import ctypes; libc = ctypes.CDLL(None, use_errno=True); features = ctypes.c_ulong(); "
        "print(libc.syscall(158, 0x1023, 18), ctypes.get_errno(), libc.syscall(158, 0x1021, ctypes.byref(features)) == 0)"
    )
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"
    kernels = "from flux1.nn import native; print(native.gemm_kernels(), native.attention_kernels())"
    out = _run("without_amx.py", sys.executable, "-c", f"{child}; {parent}; {kernels}")
    refused, refused_in_child, found = out.strip().splitlines()
    assert refused == refused_in_child == "-1 1 True"  # EPERM; ARCH_GET_XCOMP_SUPP still answered
    assert "tiles" not in found
    usage = subprocess.run(
        [sys.executable, str(BENCHMARKS / "without_amx.py")], capture_output=True, text=True
    )
    assert usage.returncode == 1 and usage.stderr.startswith("Runs a command as on a CPU whose AMX tiles")
