"""Helpers of the benchmarks: run a child process measuring its wall time and peak resident memory;
build (or reuse) a fixture."""

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


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
