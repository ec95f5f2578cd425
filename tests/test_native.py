"""The native kernels' build: compiled once per machine into flux1's cache folder, re-made when the
file is damaged, and simply not offered (the plan measures without them) where there is no compiler
or the build fails. The expansion's values are tested with every expansion kernel's, the attention's
with the other attention paths (`test_cpu_kernels.py`)."""

import os
import stat
import subprocess
import sys

import pytest

from flux1.gguf.blocks import LAYOUTS, cpu_form
from flux1.nn import cpu_attention, cpu_expansion, native


@pytest.fixture
def fresh_native(tmp_path, monkeypatch):
    """An empty cache folder and no kernels loaded yet; the process's own afterwards."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    caches = (native.compiler, native.library, native.attention_kernels, cpu_expansion.expansion_paths)
    for cached in caches:
        cached.cache_clear()
    yield tmp_path / "flux1" / "native"
    monkeypatch.undo()
    for cached in caches:
        cached.cache_clear()


def fake_compiler(folder, exit_code: int, message: str = "") -> str:
    """A `cc` that prints a version, then on a build writes `message` to stderr and exits."""
    script = folder / "fake-cc"
    script.write_text(
        '#!/bin/sh\nif [ "$1" = --version ]; then echo "fake-cc 1.0"; exit 0; fi\n'
        f'echo "{message}" >&2\nexit {exit_code}\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


needs_compiler = pytest.mark.skipif(native.compiler() is None, reason="no C compiler here")


@needs_compiler
def test_kernels_are_built_once_into_the_cache_and_reused(fresh_native, monkeypatch):
    assert native.library() is not None
    (built,) = fresh_native.iterdir()  # one file, no temporary one left
    assert built.name.startswith("kernels-") and built.suffix == ".so"
    made = built.stat().st_mtime_ns
    native.library.cache_clear()
    monkeypatch.setattr(native, "_build", lambda *args: pytest.fail("built again"))
    assert native.library() is not None and built.stat().st_mtime_ns == made
    assert {path.kernel for path in cpu_expansion.expansion_paths().values()} >= {"numpy", "native"}
    library = cpu_expansion.expansion_paths()["native to bf16"].library
    assert library == f"C compiled by {native.compiler()[1]}"


@needs_compiler
def test_a_damaged_build_is_made_again_with_a_warning(fresh_native):
    """In a new process, as a damaged file is met (this one has the build loaded: the loader would
    hand back the loaded one by its name)."""
    assert native.library() is not None
    (built,) = fresh_native.iterdir()
    built.unlink()  # a new file: never write over a library a process has mapped
    built.write_bytes(b"not a shared library")
    code = "from flux1.nn import native; print(native.library() is not None)"
    environment = {**os.environ, "XDG_CACHE_HOME": str(fresh_native.parent.parent)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment)
    assert result.stdout.strip() == "True" and "rebuilding the native kernels" in result.stderr
    assert built.read_bytes()[:4] == b"\x7fELF"


def test_without_a_compiler_no_native_kernel_is_offered(fresh_native, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert native.compiler() is None and native.library() is None
    assert "native" not in {path.kernel for path in cpu_expansion.expansion_paths().values()}
    assert native.attention_kernels() == () and cpu_attention.native_pairs() == {}
    assert not fresh_native.exists()


def test_a_failed_build_warns_and_leaves_nothing(fresh_native, tmp_path, monkeypatch):
    monkeypatch.setenv("CC", fake_compiler(tmp_path, 1, "no such instruction set"))
    assert native.compiler()[1] == "fake-cc 1.0"
    with pytest.warns(
        UserWarning,
        match=r"no native kernels \(.*fake-cc failed on native_expansion.c and native_attention.c: no",
    ):
        assert native.library() is None
    assert os.listdir(fresh_native) == []
    assert "native" not in {path.kernel for path in cpu_expansion.expansion_paths().values()}


def test_every_gguf_type_has_a_block_kernel():
    """The native expansion decodes every GGUF type's blocks itself (as the CPU kernels hold them)."""
    assert set(native.BLOCKS) == {cpu_form(qtype) for qtype in LAYOUTS}
