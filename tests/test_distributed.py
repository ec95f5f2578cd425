"""Several ranks, launched as users launch them: `mlx.launch -n 2 --backend ring` on localhost over the
tiny fixture (32x32 images, 2 steps). Data parallel must give the single process's images bit for bit;
tensor parallel sums each row-split layer's partial products in another order (fp32, relative
difference about 1e-7 per sum), which may move a pixel by one 8-bit level: the bound is 1 level."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from tests import lora_files

from flux1.distributed.tensor_parallel import cuts
from flux1.fixtures.gguf import write_gguf
from flux1.generation import Config
from flux1.metadata import read_record
from flux1.model_files import resolve
from flux1.pipeline import Flux1

MAIN = Path(__file__).resolve().parent.parent / "main.py"
SMALL = ["--height", "32", "--width", "32", "--steps", "2"]


def _free_port() -> int:
    """A loopback port whose successor is free too (the ring backend listens on port + rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free loopback ports")


def launch(script: Path, *args: str) -> subprocess.CompletedProcess:
    """Two ranks on this machine, one BLAS thread each (two ranks share its 2 cores)."""
    command = [
        shutil.which("mlx.launch"),
        "-n",
        "2",
        "--backend",
        "ring",
        "--starting-port",
        str(_free_port()),
        "--env",
        "OPENBLAS_NUM_THREADS=1",
        "--python",
        sys.executable,
        str(script),
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int16)


def test_data_parallel_writes_the_single_process_images(tiny_schnell, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na lighthouse at night\n")
    args = ["--path", str(tiny_schnell), "--prompt-file", str(prompts), "--seed", "3", "4", "5", *SMALL]
    for folder in ("one", "two"):  # a name taken already: the free-name search runs once, on rank 0
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "img_1_seed_3.png").write_bytes(b"taken")
    # The ranks get one OpenBLAS thread each (launch): so does the one process, since OpenBLAS's sums
    # depend on its thread count on some CPUs (up to 1 level apart on a Zen 1 EPYC, AVX2).
    single = subprocess.run(
        [sys.executable, str(MAIN), *args, "--output", str(tmp_path / "one" / "img.png"), "--metadata"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
    )
    assert single.returncode == 0, single.stderr[-2000:]
    result = launch(MAIN, *args, "--output", str(tmp_path / "two" / "img.png"), "--metadata")
    assert result.returncode == 0 and "exited with code" not in result.stdout + result.stderr, result.stderr
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert len(names) == 13 and "img_1_seed_3_1.png" in names
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == names
    for name in names:
        if name.endswith(".png") and name != "img_1_seed_3.png":
            assert np.array_equal(pixels(tmp_path / "one" / name), pixels(tmp_path / "two" / name)), name
            ours, theirs = read_record(tmp_path / "two" / name), read_record(tmp_path / "one" / name)
            for varying in ("generation_seconds", "created"):
                ours.pop(varying), theirs.pop(varying)
            assert ours == theirs
    # each rank wrote its own share (rank r: items r, r + 2, ...) and rank 0 printed the summary
    assert result.stdout.count("saved ") == 6
    assert result.stdout.count("6 images on 2 ranks (data parallel)") == 1


@pytest.fixture(scope="module")
def variants(tiny_schnell, tmp_path_factory):
    """Model options of each tensor-parallel case, as CLI flags and as Flux1 arguments."""
    folder = tmp_path_factory.mktemp("tp")
    gguf = folder / "flux1-schnell-Q4_0.gguf"
    write_gguf(tiny_schnell / "transformer", gguf, "Q4_0")
    lora = folder / "style.safetensors"
    lora_files.write(lora, "peft")
    # group 32: each rank's 32 attention columns (1 head of 32) are whole groups
    saved = Flux1(resolve(path=tiny_schnell), quantize=4, group_size=32).save(folder / "saved-q4")
    files = resolve(path=tiny_schnell)
    return {
        "dense + LoRA": (
            ["--lora-paths", str(lora), "--lora-scales", "0.8"],
            files,
            dict(lora_paths=[lora], lora_scales=[0.8]),
        ),
        "-q 4": (["-q", "4", "--group-size", "32"], files, dict(quantize=4, group_size=32)),
        "saved -q 4": (["--path", str(saved)], resolve(path=saved), {}),
        "GGUF Q4_0": (["--gguf", str(gguf)], resolve(path=tiny_schnell, gguf=gguf), {}),
    }


@pytest.mark.parametrize("case", ["dense + LoRA", "-q 4", "saved -q 4", "GGUF Q4_0"])
def test_tensor_parallel_matches_a_single_process(case, variants, tiny_schnell, tmp_path):
    """At fp32 GEMMs (bf16 ones, `auto` on a CPU with them, differ by a few levels more)."""
    flags, files, options = variants[case]
    result = launch(
        MAIN, "--path", str(tiny_schnell), "--prompt", "a red fox", "--seed", "7", *SMALL, *flags,
        "--precision", "fp32", "--tensor-parallel", "--output", str(tmp_path / "tp.png"),
    )  # fmt: skip
    assert result.returncode == 0 and "exited with code" not in result.stdout + result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tp.png"]  # rank 0 alone writes
    flux = Flux1(files, **options, precision="fp32")
    single = flux.generate_image(7, "a red fox", Config(num_inference_steps=2, height=32, width=32))
    difference = np.abs(pixels(tmp_path / "tp.png") - single.pixels.astype(np.int16))
    assert difference.max() <= 1, (case, difference.max())


READ_PROBE = """\
import json, sys
from flux1.distributed.ranks import world
from flux1.model_files import resolve
from flux1.pipeline import Flux1
from flux1.weights import slices

def rchar():
    return int(next(line for line in open("/proc/self/io") if line.startswith("rchar")).split()[1])

group = world()
gguf = sys.argv[2] if len(sys.argv) > 2 else None
flux = Flux1(resolve(path=sys.argv[1], gguf=gguf), group=group, tensor_parallel=group.size() > 1)
before = rchar()
flux.load("transformer")
print(json.dumps({"rchar": rchar() - before, "shard": slices.bytes_read}), flush=True)
"""


@pytest.mark.parametrize("case", ["dense + LoRA", "GGUF Q4_0"])
def test_each_rank_reads_only_its_shard(case, variants, tiny_schnell, tmp_path):
    """Each rank reads half of every cut weight from disk (counted as read, and for safetensors in the
    process's read() bytes: /proc/self/io rchar), not the whole tensor."""
    files = variants[case][1]
    script = tmp_path / "probe.py"
    script.write_text(READ_PROBE)
    args = [str(tiny_schnell), *([str(files.transformer)] if case == "GGUF Q4_0" else [])]
    result = launch(script, *args)
    assert result.returncode == 0 and "exited with code" not in result.stdout + result.stderr, result.stderr
    ranks = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    model = Flux1(files).load("transformer")
    layers = dict(model.named_modules())
    rank0 = SimpleNamespace(rank=lambda: 0, size=lambda: 2)
    cut_bytes = sum(layers[path].weight.nbytes for path in cuts(model.config, rank0))
    assert len(ranks) == 2 and all(rank["shard"] == cut_bytes // 2 for rank in ranks), (ranks, cut_bytes)
    if case != "GGUF Q4_0":  # GGUF is memory-mapped: its reads are page faults, not read() calls
        single = subprocess.run(
            [sys.executable, str(script), *args], capture_output=True, text=True, timeout=300
        )
        whole = json.loads(single.stdout.splitlines()[-1])["rchar"]
        assert all(rank["rchar"] < whole - 0.45 * cut_bytes for rank in ranks), (ranks, whole, cut_bytes)


def test_ranks_with_different_settings_are_refused(tiny_schnell, tmp_path):
    """Rank 1 asks for 3 steps, rank 0 for 2: both refuse at start, before any image."""
    script = tmp_path / "per_rank.py"
    script.write_text(
        "import os, sys\n"
        "from flux1.cli.generate import main\n"
        "steps = '3' if os.environ['MLX_RANK'] == '1' else '2'\n"
        "sys.exit(main(sys.argv[1:] + ['--steps', steps]))\n"
    )
    result = launch(
        script, "--path", str(tiny_schnell), "--prompt", "fox", "--height", "32", "--width", "32",
        "--seed", "1", "2", "--output", str(tmp_path / "img.png"),
    )  # fmt: skip
    message = (
        "error: the ranks were started with different inputs: rank 1's settings differ from rank 0's "
        "(every rank must see the same model files, options and settings)"
    )
    assert result.stderr.count(message) == 2, result.stderr[-2000:]
    # rank 0 exits 2 after its message, unless mlx.launch stops it first (-15) once rank 1 has ended
    assert re.search(r"Node with rank 0 exited with code (2|-15)\b", result.stdout + result.stderr)
    assert not list(tmp_path.glob("*.png"))


def test_a_failing_rank_stops_every_rank(tiny_schnell, tmp_path):
    """Rank 1 cannot find its model: rank 0 loses its peer and exits non-zero too; no image."""
    script = tmp_path / "per_rank.py"
    script.write_text(
        "import os, sys\n"
        "from flux1.cli.generate import main\n"
        "path = sys.argv[1] + ('-missing' if os.environ['MLX_RANK'] == '1' else '')\n"
        "sys.exit(main(['--path', path] + sys.argv[2:]))\n"
    )
    result = launch(
        script, str(tiny_schnell), "--prompt", "fox", *SMALL, "--output", str(tmp_path / "img.png")
    )
    output = result.stdout + result.stderr
    assert "Node with rank 1 exited with code 2" in output, output[-2000:]
    rank0 = [line for line in output.splitlines() if "Node with rank 0 exited with code" in line]
    assert rank0 and not rank0[0].rstrip().endswith("code 0"), output[-2000:]
    assert not list(tmp_path.glob("*.png"))


def test_a_rank_failing_mid_step_stops_the_others_in_one_line(tiny_schnell, tmp_path):
    """Tensor parallel: rank 1 fails inside a denoising step; rank 0's next exchange finds the peer
    gone and says so in one line (MLX's own `[ring]` lines aside), not with a traceback."""
    script = tmp_path / "per_rank.py"
    script.write_text(
        "import os, sys\n"
        "from flux1.cli.generate import main\n"
        "from flux1.distributed import tensor_parallel\n"
        "if os.environ['MLX_RANK'] == '1':\n"
        "    calls, original = [0], tensor_parallel.RowParallel.__call__\n"
        "    def failing(self, x):\n"
        "        calls[0] += 1\n"
        "        if calls[0] > 8:\n"
        "            raise ValueError('rank 1 broke down')\n"
        "        return original(self, x)\n"
        "    tensor_parallel.RowParallel.__call__ = failing\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    result = launch(
        script, "--path", str(tiny_schnell), "--prompt", "fox", *SMALL, "--tensor-parallel",
        "--output", str(tmp_path / "img.png"),
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert "error: rank 1 broke down" in output, output[-2000:]
    line = "error: another rank stopped during a tensor-parallel step (its error is above); stopping"
    assert output.count(line) == 1 and "Traceback" not in output, output[-2000:]
    assert not [line for line in output.splitlines() if "exited with code 0" in line], output[-2000:]
    assert not list(tmp_path.glob("*.png"))


def test_a_tensor_parallel_flux1_is_not_saved(tiny_schnell, tmp_path):
    flux = Flux1(resolve(path=tiny_schnell), tensor_parallel=True)
    with pytest.raises(
        ValueError, match="cannot save a tensor-parallel Flux1: each rank holds only its shard"
    ):
        flux.save(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
