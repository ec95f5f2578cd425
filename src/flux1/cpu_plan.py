"""The CPU compute plan: which GEMM (library and input dtype) the CPU kernels use on this machine,
chosen by timing every candidate, in turn and best of a few rounds, on the model's own GEMM shapes.

No single choice wins everywhere: on 2 Zen 4 cores NumPy's OpenBLAS beats MKL and oneDNN's bf16
GEMM doubles both; on an Intel Xeon without AMX, MKL's fp32 beats everything in bf16. So the
candidates of `nn/gemm.py` are timed (under 10 s, once) and the rates are kept in
`$XDG_CACHE_HOME/flux1/cpu_plan.json` (`~/.cache/flux1`), keyed by the CPU model, its bf16
instructions, the core count and the libraries' versions; a file that does not match, or does not
parse, is measured again with a warning, never trusted.

Attention's two products are narrow (a 128-wide head): they are measured as attention runs them, one
head's q k^T, softmax and probabilities @ v, bf16 rounding of their inputs included, for each pair of
paths of one library (each product in either dtype). One library: where the two products took the
libraries each was fastest through alone (oneDNN, then OpenBLAS), switching between their thread
pools made a head 30% slower than OpenBLAS for both on 2 Zen 1 cores. So are the VAE's
convolutions, whose candidates are oneDNN's convolution primitive and unfolded windows through each
GEMM (`nn/cpu_convolution.py`), the activations (GELU), computed by NumPy or by oneDNN
(`nn/cpu_activations.py`), and the expansion of quantized weights to each GEMM dtype, by NumPy, by
oneDNN or by C compiled for this CPU (`nn/cpu_expansion.py`), and where AMX tiles or AVX512-BF16 vectors
run, how layers of 4-bit codes (MLX's, GGUF Q4_K's) multiply with bf16 GEMMs: expanded for the GEMM, or
from their codes in the tiles or the vectors (flux1's own GEMM, `nn/native_expansion.c`).

The precision decides among them: `fp32` takes the fastest fp32 GEMM, `bf16` the fastest bf16 one
(inputs rounded to bf16, fp32 sums), `auto` bf16 only where it measured faster than fp32 here, for
each kind of product on its own.
Only the GEMMs change: activations, norms, softmax sums and the sampler stay fp32. The default is
`fp32`; activations compute in fp32 at every precision. `Flux1` sets the user's choice with `set_precision`, `use(...)` sets one for a block (also a
GEMM path by name, for tests and benchmarks).
"""

import contextlib
import datetime
import functools
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from flux1 import user_cache
from flux1.metadata import write_json
from flux1.nn import native
from flux1.nn.cpu_activations import ActivationPath, activation_paths, gelu_tanh
from flux1.nn.cpu_attention import EXP_FUSED, NATIVE, attend_head, exp_fused, native_pairs, score_bounds
from flux1.nn.cpu_convolution import ConvolutionPath, convolution_paths, convolve
from flux1.nn.cpu_expansion import (
    EXPANDED,
    FEW_ROWS,
    ExpansionPath,
    QuantizedPath,
    expanded_weight,
    expansion_paths,
    quantized_paths,
    scratch_lock,
    tile_product,
)
from flux1.nn.gemm import NATIVE_KERNELS, GemmPath, available_paths, cpu_flags, gemm
from flux1.nn.numpy_cpu import as_bf16

PRECISIONS = ("auto", "fp32", "bf16")
FORMAT = 7
# Rows x in @ in x out of a FLUX step at 512x512 (1024 image + 256 text tokens): attention and
# modulation 3072 -> 3072, the MLP's 3072 -> 12288 and 12288 -> 3072.
SHAPES = ((1280, 3072, 3072), (1280, 3072, 12288), (1280, 12288, 3072))
# One head of attention at 512x512 (1280 tokens, 128 wide): q @ k^T, then probabilities @ v.
HEAD = (1280, 128)
# The native kernels take a layer's heads at once, split over the cores: timed on FLUX's 24 (on a
# few heads much of the time is starting the threads, which a layer's heads share).
WHOLE_HEADS = 24
# One 3x3 convolution of the VAE decoder's (256 -> 256 channels), on a 48x48 image.
CONVOLUTION = (48, 256, 3)
# GELU over the input of a FLUX MLP's second layer for 256 tokens.
ACTIVATION = (256, 12288)
# A 4-bit weight (group 64) of attention's size, expanded for the GEMM.
EXPANSION = (3072, 3072)
KINDS = ("linear", "attention", "convolution", "activation", "expansion", "quantized")
MEASURE_SECONDS = 5.0  # for the linear layers' GEMMs: a slow machine measures fewer shapes, never longer
PLAN_SECONDS = 9.0  # for all kinds: past it, each of the others is timed in its first round only
ROUNDS = 3  # each GEMM shape timed best of 3, the paths in turn
AUTO_BF16_MARGIN = 1.1  # bf16 rounds the inputs: taken by `auto` only if clearly faster
EXPANDED_MARGIN = 1.1  # 4-bit weights expanded need the scratch buffer: only if clearly faster than tiles

_precision = "fp32"
_override: str | None = None
_plan: list = []  # [Plan] once measured or read


@dataclass
class Plan:
    key: dict
    rates: dict[str, dict[str, float]]  # kind (one of KINDS) -> path name -> GFLOP/s (activation,
    # expansion: G values/s)
    measured: str  # when
    seconds: float  # what measuring took (0 when read from the cache)


def attention_pairs() -> dict[str, tuple[GemmPath, GemmPath]]:
    """(q k^T's path, probabilities @ v's path) of one library, named "<scores> + <values>"; with
    oneDNN's bf16 matmul primitive also its pair with the exponentials in the product
    (`cpu_attention.attend_head`); and NATIVE's, whole heads in C, where they run."""
    available = available_paths()
    paths = available.values()
    # flux1's own GEMMs (one library, two kernels) each with itself
    pairs = {
        f"{s.name} + {v.name}": (s, v)
        for s in paths
        for v in paths
        if s.library == v.library and (s == v or s.name not in NATIVE_KERNELS)
    }
    if "onednn matmul bf16" in available:
        matmul = available["onednn matmul bf16"]
        fused = exp_fused(matmul)
        pairs[f"{fused.name} + {matmul.name}"] = (fused, matmul)
    return pairs | native_pairs()


def candidates(kind: str) -> dict:
    if kind == "attention":
        return attention_pairs()
    if kind == "activation":
        return activation_paths()
    if kind == "expansion":
        return expansion_paths()
    if kind == "quantized":
        return quantized_paths()
    return convolution_paths() if kind == "convolution" else available_paths()


def _library(path) -> str:
    return path[0].library if isinstance(path, tuple) else path.library  # a pair's is one library


def _dtypes(path) -> set[str]:
    return {p.dtype for p in path} if isinstance(path, tuple) else {path.dtype}


def cache_file() -> Path:
    return user_cache.folder() / "cpu_plan.json"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def machine_key() -> dict:
    """What the measured rates depend on: a plan measured under another key is stale."""
    return {
        "format": FORMAT,
        "cpu": cpu_model(),
        "bf16 instructions": sorted({"avx512_bf16", "amx_bf16", "amx_tile"} & cpu_flags()),
        "cores": os.cpu_count(),
        "paths": {kind: {name: _library(path) for name, path in candidates(kind).items()} for kind in KINDS},
    }


def measure(paths: dict[str, GemmPath]) -> dict[str, float]:
    """GFLOP/s of each path over SHAPES, the weight as a transposed [out, in] matrix as Linear has
    it: each shape timed in ROUNDS (`_interleaved`), its best time counted. A shape is started only
    if one round of it fits in what is left of MEASURE_SECONDS at the rates seen so far; after each
    shape a path below half the best rate is no longer timed (it cannot win) and keeps its rate."""
    deadline = time.perf_counter() + MEASURE_SECONDS
    rng = np.random.default_rng(0)
    size = max(rows * inner for rows, inner, _ in SHAPES), max(inner * cols for _, inner, cols in SHAPES)
    inputs = {"fp32": [rng.random(n, np.float32) for n in size]}  # uniform: quicker to draw
    inputs["bf16"] = [as_bf16(x) for x in inputs["fp32"]]
    out = np.empty(max(rows * cols for rows, _, cols in SHAPES), np.float32)
    contenders, rates = dict(paths), {}
    seconds, work = dict.fromkeys(paths, 0.0), 0.0
    for index, (rows, inner, cols) in enumerate(SHAPES):
        flops = 2.0 * rows * inner * cols
        if index and time.perf_counter() + sum(flops / rates[name] / 1e9 for name in contenders) > deadline:
            break
        calls = {}
        for name, path in contenders.items():
            a = inputs[path.dtype][0][: rows * inner].reshape(rows, inner)
            weight = inputs[path.dtype][1][: cols * inner].reshape(cols, inner)
            product = out[: rows * cols].reshape(rows, cols)
            if not index:
                gemm(path, a[:256], weight.T, product[:256])  # first call: the library's start-up
            calls[name] = functools.partial(gemm, path, a, weight.T, product)
        for name, best in _interleaved(calls, ROUNDS, deadline, warm_up=False).items():
            seconds[name] += best
        work += flops
        rates.update({name: work / seconds[name] / 1e9 for name in contenders})
        contenders = {name: p for name, p in contenders.items() if rates[name] >= 0.5 * max(rates.values())}
    return {name: float(f"{rate:.4g}") for name, rate in rates.items()}


def measure_attention(
    pairs: dict[str, tuple[GemmPath, GemmPath]], rounds: int = 3, deadline: float = math.inf
) -> dict[str, float]:
    """GFLOP/s of one head's attention (its two products' work over the time of both and the
    softmax between them) through each pair of paths, as `nn/attention.py` runs it: k transposed,
    v not, a bf16 path's inputs rounded to bf16 (q and the probabilities each call, k and v once).
    Best of `rounds` (`_interleaved`)."""
    tokens, width = HEAD
    rng = np.random.default_rng(0)
    q, k, v = (rng.random((tokens, width), np.float32) for _ in range(3))
    scores, out = np.empty((tokens, tokens), np.float32), np.empty((tokens, width), np.float32)

    def head(scores_path, values_path, k_in, v_in, weights):
        bounds = score_bounds(q, k, 0.1) if scores_path.name.endswith(EXP_FUSED) else None
        q_in = as_bf16(q) if scores_path.dtype == "bf16" else q
        attend_head((scores_path, values_path), q_in, k_in, v_in, 0.1, None, (scores, weights), out, bounds)

    calls, work = {}, dict.fromkeys(pairs, 4.0 * tokens * tokens * width)
    for name, (scores_path, values_path) in pairs.items():
        if name in NATIVE:  # a layer's heads in one call, split over the cores: timed on WHOLE_HEADS
            layer = [np.broadcast_to(x, (1, WHOLE_HEADS, tokens, width)) for x in (q, k, v)]
            heads_out = np.empty(layer[0].shape, np.float32)
            calls[name] = functools.partial(native.attend, *layer, 0.1, heads_out, NATIVE[name])
            work[name] *= WHOLE_HEADS
            continue
        k_in = as_bf16(k) if scores_path.dtype == "bf16" else k
        v_in = as_bf16(v) if values_path.dtype == "bf16" else v
        weights = np.empty(scores.shape, np.uint16) if values_path.dtype == "bf16" else None
        calls[name] = functools.partial(head, scores_path, values_path, k_in, v_in, weights)
    return _rates(calls, work, rounds, deadline)


def measure_convolution(
    paths: dict[str, ConvolutionPath], rounds: int = 3, deadline: float = math.inf
) -> dict[str, float]:
    """GFLOP/s of each path on one of the VAE decoder's convolutions (CONVOLUTION), best of
    `rounds` (`_interleaved`; its first call is oneDNN's choice of kernel)."""
    size, channels, kernel = CONVOLUTION
    rng = np.random.default_rng(0)
    image = rng.random((1, size, size, channels), np.float32)
    weight = rng.random((channels, kernel, kernel, channels), np.float32)
    bias = np.zeros(channels, np.float32)
    calls = {
        name: functools.partial(convolve, path, image, weight, bias, padding=kernel // 2)
        for name, path in paths.items()
    }
    return _rates(calls, 2.0 * size * size * kernel * kernel * channels * channels, rounds, deadline)


def measure_activation(
    paths: dict[str, ActivationPath], rounds: int = 3, deadline: float = math.inf
) -> dict[str, float]:
    """G values/s of GELU through each path over ACTIVATION values, best of `rounds`."""
    x = np.random.default_rng(0).standard_normal(ACTIVATION, np.float32)
    return _rates(
        {name: functools.partial(gelu_tanh, path, x) for name, path in paths.items()},
        x.size,
        rounds,
        deadline,
    )


def measure_expansion(
    paths: dict[str, ExpansionPath], rounds: int = 3, deadline: float = math.inf
) -> dict[str, float]:
    """G values/s of each path expanding a 4-bit weight of EXPANSION's shape, best of `rounds`."""
    from flux1.nn.linear import Linear  # here: it imports the CPU kernels, which import the plan

    rows, cols = EXPANSION
    layer = Linear(cols, rows, bias=False)
    layer.weight = mx.random.normal((rows, cols), key=mx.random.key(0)).astype(mx.bfloat16)
    layer.quantize(4, 64)
    calls = {
        name: functools.partial(expanded_weight, layer, path.dtype, path.kernel)
        for name, path in paths.items()
    }
    with scratch_lock:  # expanded_weight's buffer
        return _rates(calls, rows * cols, rounds, deadline)


def measure_quantized(
    paths: dict[str, QuantizedPath], rates: dict, rounds: int = 3, deadline: float = math.inf
) -> dict[str, float]:
    """GFLOP/s of each way a 4-bit weight of EXPANSION's shape multiplies SHAPES[0]'s rows with bf16
    GEMMs (the fastest bf16 GEMM and expansion to bf16 in `rates`), best of `rounds`; a lone way is
    not timed."""
    from flux1.nn.linear import Linear  # here: it imports the CPU kernels, which import the plan

    if len(paths) == 1:
        return dict.fromkeys(paths, 1.0)
    (rows, *_), (outputs, inputs) = SHAPES[0], EXPANSION
    layer = Linear(inputs, outputs, bias=False)
    layer.weight = mx.random.normal((outputs, inputs), key=mx.random.key(0)).astype(mx.bfloat16)
    layer.quantize(4, 64)
    gemms, expansions = available_paths(), expansion_paths()
    path = gemms[max((n for n in rates["linear"] if gemms[n].dtype == "bf16"), key=rates["linear"].get)]
    kernel = expansions[
        max((n for n in rates["expansion"] if n.endswith("bf16")), key=rates["expansion"].get)
    ]
    x = as_bf16(np.random.default_rng(0).random((rows, inputs), np.float32))
    out = np.empty((rows, outputs), np.float32)

    def expanded():
        with scratch_lock:
            gemm(path, x, expanded_weight(layer, "bf16", kernel.kernel).T, out)

    def from_codes(kernel: str):
        packed = native.pack_tile_rows([(x.ctypes.data, inputs, inputs, False)], rows)
        tile_product(layer, packed, rows, 0, outputs, out, False, None, kernel)

    calls = {
        name: functools.partial(from_codes, p.kernel) for name, p in paths.items() if p.kernel is not None
    }
    return _rates({EXPANDED: expanded} | calls, 2.0 * rows * inputs * outputs, rounds, deadline)


def _rates(
    calls: dict, work: float | dict[str, float], rounds: int, deadline: float = math.inf
) -> dict[str, float]:
    """work (FLOPs or values; or each call's) per second, in billions, over each call's best time
    (`_interleaved`'s, its rounds ending by `deadline`)."""
    each = work if isinstance(work, dict) else dict.fromkeys(calls, work)
    fastest = _interleaved(calls, rounds, deadline, work=each)
    return {name: float(f"{each[name] / best / 1e9:.4g}") for name, best in fastest.items()}


def _interleaved(
    calls: dict, rounds: int, deadline: float = math.inf, warm_up: bool = True, work: dict | None = None
) -> dict[str, float]:
    """The fastest time of each call over `rounds`, every call once per round in turn: on a machine
    whose speed drifts (a shared VM: `benchmarks/profile_step.py` measured oneDNN's bf16 GEMM at 527
    to 872 GFLOP/s between the steps of one run on 2 Intel Xeon cores) a slow spell slows every
    candidate alike instead of the ones timed in it.
    A first untimed call each with `warm_up` (the libraries' start-up for the shapes); after the
    first round, no round that would end past `deadline` at the last round's pace. Given each
    call's `work`, a call below half the best rate after a round is not timed again (it cannot
    win; as `measure` does between shapes)."""
    if warm_up:
        for call in calls.values():
            call()
    best, pace, contenders = dict.fromkeys(calls, math.inf), 0.0, dict(calls)
    for _ in range(rounds):
        started = time.perf_counter()
        if pace and started + pace > deadline:
            break
        for name, call in contenders.items():
            start = time.perf_counter()
            call()
            best[name] = min(best[name], time.perf_counter() - start)
        pace = time.perf_counter() - started
        if work is not None:
            rates = {name: work[name] / best[name] for name in contenders}
            contenders = {
                name: c for name, c in contenders.items() if rates[name] >= 0.5 * max(rates.values())
            }
    return best


def _valid_rates(rates, names) -> bool:
    return (
        isinstance(rates, dict)
        and set(rates) == set(names)
        and all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in rates.values())
    )


def read(file: Path, key: dict) -> Plan | None:
    """The plan in `file` if it is whole and was measured under `key`; None (with a warning saying
    why) if it is corrupt or stale, None silently if there is none."""
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        warnings.warn(f"flux1: ignoring the CPU plan {file} ({error}); measuring again", stacklevel=3)
        return None
    if isinstance(data, dict) and "key" in data and data["key"] != key:
        warnings.warn(
            f"flux1: the CPU plan {file} was measured for another CPU or other libraries "
            f"({data.get('key')}); measuring again",
            stacklevel=3,
        )
        return None
    rates = data.get("rates") if isinstance(data, dict) else None
    if not (
        isinstance(rates, dict)
        and set(rates) == set(KINDS)
        and all(_valid_rates(rates[kind], key["paths"][kind]) for kind in KINDS)
        and isinstance(data.get("measured"), str)
    ):
        warnings.warn(f"flux1: ignoring the CPU plan {file} (not a plan); measuring again", stacklevel=3)
        return None
    floats = {kind: {name: float(rate) for name, rate in rates[kind].items()} for kind in KINDS}
    return Plan(key, floats, data["measured"], 0.0)


def write(file: Path, plan: Plan) -> None:
    """Written whole (`metadata.write_json`): a reader sees the old plan or the new one, never half
    of one."""
    file.parent.mkdir(parents=True, exist_ok=True)
    write_json({"key": plan.key, "rates": plan.rates, "measured": plan.measured}, file)


def plan() -> Plan:
    """This machine's plan: from the cache, or measured now (and cached)."""
    if not _plan:
        paths = available_paths()
        key, file = machine_key(), cache_file()
        kernels = {path.kernel for path in expansion_paths().values()}
        if (
            len(paths)
            == len(convolution_paths())
            == len(activation_paths())
            == len(kernels)
            == 1
            == len(quantized_paths())
        ):
            # nothing to choose
            found = Plan(key, {kind: {name: 1.0 for name in candidates(kind)} for kind in KINDS}, "-", 0.0)
        else:
            found = read(file, key)
        if found is None:
            start = time.perf_counter()
            deadline = start + PLAN_SECONDS
            rates = {
                "linear": measure(paths),
                "attention": measure_attention(attention_pairs(), deadline=deadline),
            }
            rates["convolution"] = measure_convolution(convolution_paths(), deadline=deadline)
            rates["activation"] = measure_activation(activation_paths(), deadline=deadline)
            rates["expansion"] = measure_expansion(expansion_paths(), deadline=deadline)
            rates["quantized"] = measure_quantized(quantized_paths(), rates, deadline=deadline)
            measured = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
            found = Plan(key, rates, measured, time.perf_counter() - start)
            try:
                write(file, found)
            except OSError as error:
                warnings.warn(f"flux1: could not cache the CPU plan in {file}: {error}", stacklevel=2)
        _plan.append(found)
    return _plan[0]


def set_precision(precision: str) -> None:
    """The GEMM precision of the CPU kernels from now on: auto, fp32 or bf16 (`--precision`)."""
    global _precision
    _check(precision, PRECISIONS)
    _precision = precision


@contextlib.contextmanager
def use(choice: str):
    """Inside the block the CPU kernels compute with `choice`: a precision (auto, fp32, bf16) or one
    path by name (e.g. "numpy fp32", "onednn bf16", "onednn convolution fp32", "onednn" for the
    activations and the expansion, "native" for the expansion, "native bf16, AMX tiles" or "native
    bf16, AVX512-BF16" for attention's whole heads in C, `cpu_expansion.TILES`, VECTORS or EXPANDED
    for how 4-bit layers multiply with bf16 GEMMs; a name of one kind's path sets its dtype for the other kinds)."""
    global _override
    kernels = tuple(sorted({path.kernel for path in expansion_paths().values()} - set(activation_paths())))
    whole_heads = tuple(native_pairs())
    quantized = tuple(quantized_paths()) if len(quantized_paths()) > 1 else ()
    _check(
        choice,
        PRECISIONS
        + tuple(convolution_paths())
        + tuple(activation_paths())
        + kernels
        + whole_heads
        + quantized,
    )
    previous, _override = _override, choice
    try:
        yield
    finally:
        _override = previous


def _check(choice: str, allowed: tuple) -> None:
    if choice not in allowed:
        raise ValueError(f"--precision {choice}: expected one of {', '.join(allowed)}")


def active(kind: str = "linear", gemm_pair: bool = False) -> GemmPath | ConvolutionPath:
    """The path the CPU kernels use now for `kind` of product (one of KINDS but expansion:
    `expansion()`); for attention with `gemm_pair`, a pair of GEMM paths (for a mask or the
    gradients, which the native kernels do not take)."""
    choice = _override or _precision
    paths = {name: path for name, path in candidates(kind).items() if not (gemm_pair and name in NATIVE)}
    if kind == "attention" and choice in available_paths():
        choice = f"{choice} + {choice}"
    if choice in paths:
        return paths[choice]
    if choice not in PRECISIONS:  # another kind's path; an expansion kernel's alone: fp32 GEMMs
        other = {**convolution_paths(), **activation_paths()}.get(choice)
        bf16 = choice in NATIVE or choice in quantized_paths()
        choice = "bf16" if bf16 else "fp32" if other is None else other.dtype
    if kind == "activation":
        choice = "fp32"
    rates = plan().rates[kind]

    def fastest(allowed) -> str | None:
        names = [name for name in rates if name in paths and _dtypes(paths[name]) <= allowed]
        return max(names, key=rates.__getitem__) if names else None

    if choice == "bf16":
        require_bf16()
        return paths[fastest({"bf16"})]
    fp32, any_dtype = fastest({"fp32"}), fastest({"fp32", "bf16"})
    if choice == "auto" and rates[any_dtype] > AUTO_BF16_MARGIN * rates[fp32]:
        return paths[any_dtype]
    return paths[fp32]


def expansion() -> ExpansionPath:
    """How quantized weights are expanded for the GEMM in use: to its dtype, by the kernel measured
    fastest at that here, or the one named in `use` ("numpy", "onednn", "native")."""
    choice, dtype = _override or _precision, active().dtype
    paths = {name: path for name, path in expansion_paths().items() if path.dtype == dtype}
    named = [name for name, path in paths.items() if path.kernel == choice]
    return paths[named[0] if named else max(paths, key=plan().rates["expansion"].__getitem__)]


def quantized_product() -> QuantizedPath:
    """How layers of 4-bit codes (MLX's, Q4_K's) multiply: expanded for the GEMM in use, or with bf16 GEMMs
    from their codes in AMX tiles or AVX512-BF16 vectors (whichever measured faster) unless expanding
    measured clearly faster here (EXPANDED_MARGIN; or one is named in `use`)."""
    paths, choice = quantized_paths(), _override or _precision
    if choice in paths:
        return paths[choice]
    if active().dtype != "bf16" or len(paths) == 1:
        return paths[EXPANDED]
    rates = plan().rates["quantized"]
    codes = max((name for name in paths if name != EXPANDED), key=rates.__getitem__)
    return paths[EXPANDED if rates[EXPANDED] > EXPANDED_MARGIN * rates[codes] else codes]


def require_bf16() -> None:
    """Raises where no bf16 GEMM can run here (`--precision bf16` cannot be honoured)."""
    if not any(path.dtype == "bf16" for path in available_paths().values()):
        raise ValueError(
            f"--precision bf16: this CPU ({cpu_model()}) has no bf16 GEMM (it needs AVX512-BF16 or AMX, "
            "and oneDNN or MKL: pip install onednn-cpu-gomp); use --precision fp32 or auto"
        )


def _library_of(path: GemmPath) -> str:
    if path.name in NATIVE_KERNELS:  # which of flux1's own GEMMs
        where = "AMX tiles" if NATIVE_KERNELS[path.name] == "tiles" else "AVX512-BF16 vectors"
        return f"flux1's GEMM in {where}, {path.library}"
    return path.library + ("'s matmul primitive" if " matmul " in path.name else "")


def describe(quantized: bool = False) -> str:
    """One line for the generation record and --verbose: the library, the GEMM dtype and its rate
    (for a quantized model also how its weights are expanded)."""
    from flux1 import backend

    if not backend.numpy_kernels():
        return f"MLX's own kernels on the {'CPU' if backend.on_cpu() else 'GPU'}"
    path, current = active(), plan()
    dtype = "bf16 inputs, fp32 sums" if path.dtype == "bf16" else "fp32"
    rate = current.rates["linear"].get(path.name)
    measured = f", {rate:.0f} GFLOP/s measured" if rate and current.measured != "-" else ""
    line = f"CPU GEMMs {dtype} through {_library_of(path)}{measured} on {cpu_model()}"
    heads = active("attention")
    if heads[0].name in NATIVE:
        line += f"; attention: whole heads bf16 in {heads[0].name.split(', ')[1]} through {heads[0].library}"
    elif any(head != path for head in heads):
        exponentials = " and its exponentials" if heads[0].name.endswith(EXP_FUSED) else ""
        line += f"; attention: q k^T{exponentials} " + " and probabilities @ v ".join(
            f"{head.dtype} through {_library_of(head)}" for head in heads
        )
    convolution = active("convolution")
    how = "oneDNN's convolution" if convolution.gemm is None else "unfolded windows through a GEMM"
    if convolution.gemm != path:
        line += f"; convolutions: {how}, {convolution.dtype} through {convolution.library}"
    activation = active("activation")
    if activation.library != path.library:
        line += f"; activations through {activation.library}"
    expanding = expansion()
    if quantized and expanding.library != path.library:
        line += f"; quantized weights expanded through {expanding.library}"
    codes = quantized_product() if quantized else None
    if codes is not None and codes.kernel is not None:
        where = codes.name.removeprefix("4-bit codes in ")
        line += f"; 4-bit weights multiplied from their codes in {where} through {codes.library}"
    if quantized and native.library() is not None:
        line += f"; products of up to {FEW_ROWS} rows (the modulations) fp32 from the codes through {native.description()}"
    return line
