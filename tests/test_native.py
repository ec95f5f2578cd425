"""The native kernels' build: compiled once per machine into flux1's cache folder, re-made when the
file is damaged, and simply not offered (the plan measures without them) where there is no compiler
or the build fails. The expansion's values are tested with every expansion kernel's, the attention's
with the other attention paths (`test_cpu_kernels.py`)."""

import ctypes
import itertools
import os
import re
import stat
import subprocess
import sys

import numpy as np
import pytest

from flux1.gguf.blocks import LAYOUTS, block_size, cpu_form
from flux1.nn import cpu_attention, cpu_expansion, native
from flux1.nn.gemm import cpu_flags


@pytest.fixture
def fresh_native(tmp_path, monkeypatch):
    """An empty cache folder and no kernels loaded yet; the process's own afterwards."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    caches = (
        native.compiler,
        native.library,
        native.attention_kernels,
        native.gemm_kernels,
        cpu_expansion.expansion_paths,
        cpu_expansion.quantized_paths,
    )
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
    monkeypatch.setattr(native, "build", lambda *args: pytest.fail("built again"))
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
    assert native.gemm_kernels() == () and list(cpu_expansion.quantized_paths()) == [cpu_expansion.EXPANDED]
    assert not fresh_native.exists()


def test_a_failed_build_warns_and_leaves_nothing(fresh_native, tmp_path, monkeypatch):
    monkeypatch.setenv("CC", fake_compiler(tmp_path, 1, "no such instruction set"))
    assert native.compiler()[1] == "fake-cc 1.0"
    with pytest.warns(
        UserWarning,
        match=r"no native kernels \(.*fake-cc failed on native_expansion.c, native_attention.c and native_tiles.c: no",
    ):
        assert native.library() is None
    assert os.listdir(fresh_native) == []
    assert "native" not in {path.kernel for path in cpu_expansion.expansion_paths().values()}


def test_every_gguf_type_has_a_block_kernel():
    """The native expansion decodes every GGUF type's blocks itself (as the CPU kernels hold them)."""
    assert set(native.BLOCKS) == {cpu_form(qtype) for qtype in LAYOUTS}


@needs_compiler
@pytest.mark.skipif("avx512bw" not in cpu_flags(), reason="no AVX-512 here: the kernels are the plain C")
def test_the_avx512_expansion_writes_the_bits_of_the_plain_c(tmp_path):
    """MLX's 4-bit codes and Q4_K's are expanded with AVX-512 where the CPU has it (looked up in
    their group's 16 values); CPUs without it run the plain C of the same file,
    built here with AVX-512 turned off. Both write the same bits for every kernel, with scales and
    offsets that are zero, subnormal, huge, infinite or NaN among ordinary ones (a NaN for a NaN:
    which of two NaNs a sum keeps, and so its sign, is the compiler's choice). The AVX-512 kernels
    write the same bits past the cache (`stream`, into 64-byte aligned rows) as through it. bf16 values
    widen to exactly their bits shifted (signed zeros, infinities, NaNs, subnormals among them), 1006
    of them: a tail past the last 16 too."""
    portable = tmp_path / "portable.so"
    source = native.SOURCES[0]
    command = [native.compiler()[0], *native.FLAGS, "-mno-avx512f", "-o", str(portable), str(source)]
    subprocess.run(command, check=True, capture_output=True)
    builds = [native.library(), ctypes.CDLL(str(portable))]
    rng = np.random.default_rng(0)
    special = np.array([0.0, 1e-40, -3e-39, 3e38, np.inf, -np.inf, np.nan], np.float32)
    rows, cols = 12, 384
    for bits, group, dtype in itertools.product(native.BITS, (32, 64, 128), (np.float32, np.uint16)):
        codes = rng.integers(0, 256, (rows, cols * bits // 8), dtype=np.uint8)
        scales, offsets = (rng.standard_normal((rows, cols // group)).astype(np.float32) for _ in range(2))
        scales.flat[: len(special)], offsets.flat[-len(special) :] = special, special
        outs = [aligned((rows, cols), dtype) for _ in range(3)]
        for build, out, stream in zip([*builds, builds[0]], outs, (0, 0, 1), strict=True):
            kernel = getattr(build, f"expand_{bits}_{'bf16' if dtype == np.uint16 else 'fp32'}")
            kernel.argtypes = [ctypes.c_void_p, *[ctypes.c_int64] * 3, *[ctypes.c_void_p] * 2, ctypes.c_int64,
                               ctypes.c_void_p, ctypes.c_int]  # fmt: skip
            kernel(codes.ctypes.data, rows, cols, codes.shape[1], scales.ctypes.data, offsets.ctypes.data, group,
                   out.ctypes.data, stream)  # fmt: skip
        assert same_bits(*outs[:2]) and same_bits(*outs[::2]), (bits, group, dtype)
    for qtype, dtype in itertools.product(native.BLOCKS, (np.float32, np.uint16)):
        values, nbytes = block_size(qtype)
        blocks = rng.integers(0, 256, (40, nbytes), dtype=np.uint8)  # f16 scales of every kind among them
        outs = [aligned((40 * values,), dtype) for _ in range(3)]
        for build, out, stream in zip([*builds, builds[0]], outs, (0, 0, 1), strict=True):
            kernel = getattr(
                build, f"expand_{native.BLOCKS[qtype]}_{'bf16' if dtype == np.uint16 else 'fp32'}"
            )
            kernel.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
            kernel(blocks.ctypes.data, len(blocks), nbytes, out.ctypes.data, stream)
        assert same_bits(*outs[:2]) and same_bits(*outs[::2]), (qtype, dtype)
    values = np.concatenate([rng.integers(0, 65536, 1000), [0, 0x8000, 0x7F80, 0xFF80, 0x7FC1, 1]]).astype(
        np.uint16
    )
    outs = [aligned(values.shape, np.float32) for _ in range(3)]
    for build, out, stream in zip([*builds, builds[0]], outs, (0, 0, 1), strict=True):
        build.widen_bf16.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
        build.widen_bf16(values.ctypes.data, len(values), out.ctypes.data, stream)
    assert all(np.array_equal(out.view(np.uint32), values.astype(np.uint32) << 16) for out in outs)


def aligned(shape: tuple, dtype) -> np.ndarray:
    """An empty array whose data starts on a 64-byte boundary."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(size + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start : start + size].view(dtype).reshape(shape)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """The same bits, or NaN in both (fp32, or bf16 bits as uint16)."""
    wide = [
        np.left_shift(x, 16, dtype=np.uint32).view(np.float32) if x.dtype == np.uint16 else x for x in (a, b)
    ]
    nan = np.isnan(wide[0])
    return np.array_equal(nan, np.isnan(wide[1])) and np.array_equal(
        a[~nan].view(np.uint8), b[~nan].view(np.uint8)
    )


def test_the_attentions_exponential_polynomial_is_within_its_stated_error():
    """The polynomial native_attention.c's exp2_nonpositive evaluates for 2^f (its coefficients read
    from the source, Horner's rule in fp32 as the kernel computes it, fused multiply-adds widened to
    float64 and rounded once) is within 3e-6 of 2^f relatively over |f| <= 1/2, and exactly 1 at 0."""
    source = native.SOURCES[1].read_text()
    body = source[source.index("static inline __m512 exp2_nonpositive") :]
    body = body[: body.index("\n}\n")]
    terms = re.findall(r"_mm512_set1_ps\(([-0-9.e]+)f\)", body[body.index("__m512 p =") :])
    coefficients = [np.float32(float(term)) for term in terms]  # highest degree first
    assert len(coefficients) == 5 and coefficients[-1] == 1.0
    f = np.linspace(-0.5, 0.5, 100001).astype(np.float32)
    p = np.full_like(f, coefficients[0])
    for c in coefficients[1:]:
        p = (p.astype(np.float64) * f + c).astype(np.float32)  # one rounding, as an FMA
    exact = 2.0 ** f.astype(np.float64)
    assert np.max(np.abs(p - exact) / exact) < 3e-6 and p[len(f) // 2] == 1.0
