"""The GEMM paths of the CPU plan and the plan's cache.

Bounds (normwise relative error, K up to 300): fp32 GEMMs against the float64 product: 1e-6 (fp32
sums of K products, about sqrt(K) * 2^-24). bf16 GEMMs against the float64 product of the
bf16-rounded inputs: 1e-6 too (proves bf16 inputs with fp32 sums, nothing rounded further); against
fp32 NumPy: 4e-3 (each input rounded by up to 2^-9 relative, about 2^-9 * sqrt(2) on the product).
"""

import json
import time
import warnings

import mlx.core as mx
import numpy as np
import pytest
from tests.conftest import relative_error

from flux1 import backend, cpu_plan
from flux1.nn import native, onednn
from flux1.nn.cpu_activations import activation_paths
from flux1.nn.cpu_attention import EXP_FUSED, NATIVE
from flux1.nn.cpu_convolution import convolution_paths
from flux1.nn.cpu_expansion import EXPANDED, TILES, VECTORS, expansion_paths, quantized_paths
from flux1.nn.gemm import NATIVE_KERNELS, available_paths, gemm
from flux1.nn.numpy_cpu import as_bf16, as_float32

PATHS = list(available_paths())
CONVOLUTION_PATHS = list(convolution_paths())
BF16_PATHS = [name for name in PATHS if name.endswith("bf16")]


def widened(bits: np.ndarray) -> np.ndarray:
    return as_float32(mx.array(bits).view(mx.bfloat16))


def test_bf16_rounding_is_mlx_round_to_nearest_even(monkeypatch):
    """Through oneDNN's reorder where it is installed, and through NumPy: the same bits."""
    x = np.random.default_rng(0).standard_normal(10_001).astype(np.float32)
    # exact ties (the dropped half is 0x8000) on both sides of an even and an odd kept bit
    x[:4] = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x7F7FFFFF], np.uint32).view(np.float32)
    x[4:7] = [np.inf, -np.inf, 0.0]
    expected = np.array(mx.array(x).astype(mx.bfloat16).view(mx.uint16))
    assert np.array_equal(as_bf16(x), expected)
    if onednn.available():  # also the probabilities of bf16 attention (nn/cpu_attention.py)
        rounded = onednn.round_to_bf16((1, x.size))(x.reshape(1, -1), np.empty((1, x.size), np.uint16))
        assert np.array_equal(rounded[0], expected)
    monkeypatch.setattr(onednn, "available", lambda: False)
    assert np.array_equal(as_bf16(x), expected)


@pytest.mark.parametrize("name", PATHS)
@pytest.mark.parametrize("m, k, n", [(37, 129, 53), (1, 300, 7), (65, 3, 1), (37, 3200, 64)])
def test_gemm_path_equals_float64_product(name, m, k, n):
    """Row-major and transposed operands, a row slice of a wider matrix (leading dimension > width),
    alpha, and a second product added to the first; the output written into a slice of a wider
    buffer. The last shape is one flux1's own GEMM in AMX tiles takes (the second product, with the
    weight's rows as Linear holds them, past one slice of its K), the others go to a library's."""
    path = available_paths()[name]
    rng = np.random.default_rng(m)
    a = rng.standard_normal((m, k + 5), np.float32)[:, :k]
    w = rng.standard_normal((n, k), np.float32)
    wide = np.full((m, n + 3), 7.0, np.float32)
    for x, b in ((a, w.T), (np.ascontiguousarray(a.T).T, np.ascontiguousarray(w.T))):
        gemm(path, x, b, out=wide[:, :n], alpha=0.5)
        got = gemm(path, x, b, out=wide[:, :n], accumulate=True)
        assert np.all(wide[:, n:] == 7.0)  # nothing written outside the output
        if path.dtype == "fp32":
            assert relative_error(got, 1.5 * (a.astype(np.float64) @ b)) < 1e-6
        else:
            rounded = widened(as_bf16(a)).astype(np.float64) @ widened(as_bf16(b.T)).T
            assert relative_error(got, 1.5 * rounded) < 1e-6
            assert relative_error(got, 1.5 * (a @ b)) < 4e-3


@pytest.fixture
def fresh_plan(tmp_path, monkeypatch):
    """An empty cache folder and no plan in memory; real measurements on small shapes (quick)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_plan, "_plan", [])
    monkeypatch.setattr(cpu_plan, "SHAPES", ((96, 160, 128), (64, 96, 80)))
    monkeypatch.setattr(cpu_plan, "CONVOLUTION", (12, 16, 3))
    monkeypatch.setattr(cpu_plan, "EXPANSION", (64, 128))  # multiples of 32: AMX tiles take it
    return tmp_path / "flux1" / "cpu_plan.json"


def measured_again(file, edit=None) -> cpu_plan.Plan:
    """The plan after `edit` changed the cached file (and the process forgot its plan)."""
    if edit:
        edit(file)
    cpu_plan._plan.clear()
    return cpu_plan.plan()


def test_plan_is_measured_once_and_cached(fresh_plan):
    first = cpu_plan.plan()
    assert set(first.rates) == set(cpu_plan.KINDS)
    for kind, rates in first.rates.items():
        assert set(rates) == set(cpu_plan.candidates(kind)) and min(rates.values()) > 0
    assert set(CONVOLUTION_PATHS) >= set(PATHS)
    assert first.seconds > 0 and fresh_plan.is_file()
    assert [f for f in fresh_plan.parent.iterdir() if f.is_file()] == [fresh_plan]  # no temporary file left
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = measured_again(fresh_plan)
    assert again.seconds == 0 and again.rates == first.rates  # read, not measured


def edit_key(field, value):
    def edit(file):
        data = json.loads(file.read_text())
        data["key"][field] = value
        file.write_text(json.dumps(data))

    return edit


@pytest.mark.parametrize(
    "edit",
    [
        edit_key("cpu", "Intel(R) Xeon(R) Platinum 8488C"),
        edit_key("paths", {name: "an older version" for name in PATHS}),
        edit_key("cores", 64),
    ],
    ids=["other CPU", "other library versions", "other core count"],
)
def test_stale_plan_is_measured_again_with_a_warning(fresh_plan, edit):
    cpu_plan.plan()
    with pytest.warns(UserWarning, match="measured for another CPU or other libraries"):
        again = measured_again(fresh_plan, edit)
    assert again.seconds > 0
    assert json.loads(fresh_plan.read_text())["key"] == cpu_plan.machine_key()


@pytest.mark.parametrize(
    "content, reason",
    [
        ("{not json", "Expecting property name"),
        ('{"rates": {"linear": {"numpy fp32": -1}}}', "not a plan"),
        ("[]", "not a plan"),
    ],
)
def test_corrupt_plan_is_ignored_with_a_warning(fresh_plan, content, reason):
    fresh_plan.parent.mkdir(parents=True)
    fresh_plan.write_text(content)
    with pytest.warns(UserWarning, match=f"ignoring the CPU plan {fresh_plan} .*{reason}"):
        plan = cpu_plan.plan()
    assert plan.seconds > 0 and json.loads(fresh_plan.read_text())["rates"] == plan.rates


def test_plan_file_is_replaced_whole_or_not_at_all(fresh_plan, monkeypatch):
    cpu_plan.plan()
    before = fresh_plan.read_text()

    def interrupted(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(cpu_plan.os, "replace", interrupted)
    with pytest.raises(OSError, match="disk full"):
        cpu_plan.write(fresh_plan, cpu_plan.Plan({}, {"linear": {"numpy fp32": 1.0}}, "now", 1.0))
    assert fresh_plan.read_text() == before
    assert list(fresh_plan.parent.iterdir()) == [fresh_plan]


class SlowSpellClock:
    """A clock for `cpu_plan.time` that calls advance: a call costs its own time, three times that
    while the clock is before `spell_ends` (a shared machine's slow spell)."""

    def __init__(self, spell_ends: float):
        self.now, self.spell_ends, self.order = 0.0, spell_ends, []

    def perf_counter(self) -> float:
        return self.now

    def call(self, name: str, cost: float):
        def run():
            self.order.append(name)
            self.now += cost * (3 if self.now < self.spell_ends else 1)

        return run


def test_candidates_are_timed_in_turn_so_a_slow_spell_slows_them_alike(monkeypatch):
    """One after the other (3 calls of a, then of b), a spell lasting a's calls would make the
    slower b look faster; timed in turn, each has calls after the spell and a wins."""
    clock = SlowSpellClock(spell_ends=10.0)
    monkeypatch.setattr(cpu_plan, "time", clock)
    calls = {"a": clock.call("a", 1.0), "b": clock.call("b", 1.2)}
    best = cpu_plan._interleaved(calls, rounds=3)
    assert clock.order == ["a", "b"] * 4  # a first untimed call each, then 3 rounds
    assert best == {"a": pytest.approx(1.0), "b": pytest.approx(1.2)}


def test_a_call_below_half_the_best_rate_is_not_timed_again(monkeypatch):
    """Given the work of each call: b (a third of a's rate after the first round) is timed once, c
    (two thirds of a's, the same work in 1.5 s) every round."""
    clock = SlowSpellClock(spell_ends=0.0)
    monkeypatch.setattr(cpu_plan, "time", clock)
    calls = {"a": clock.call("a", 1.0), "b": clock.call("b", 3.0), "c": clock.call("c", 1.5)}
    best = cpu_plan._interleaved(calls, rounds=3, warm_up=False, work=dict.fromkeys(calls, 1.0))
    assert clock.order == ["a", "b", "c", "a", "c", "a", "c"]
    assert best == {"a": 1.0, "b": 3.0, "c": 1.5}


def test_no_round_starts_that_would_end_past_the_deadline(monkeypatch):
    clock = SlowSpellClock(spell_ends=0.0)
    monkeypatch.setattr(cpu_plan, "time", clock)
    calls = {"a": clock.call("a", 1.0), "b": clock.call("b", 2.0)}
    # rounds of 3: the first always (past the deadline or not), then while one more ends by 7
    best = cpu_plan._interleaved(calls, rounds=5, deadline=7.0, warm_up=False)
    assert clock.order == ["a", "b"] * 2 and best == {"a": 1.0, "b": 2.0}
    clock.order.clear()
    cpu_plan._interleaved(calls, rounds=5, deadline=0.0, warm_up=False)
    assert clock.order == ["a", "b"]


def test_linear_gemms_measure_fewer_shapes_rather_than_run_long(monkeypatch):
    """With no time left the plan still times every path once on the first shape (after a start-up
    call) and on no other; with time, every shape in rounds."""
    monkeypatch.setattr(cpu_plan, "SHAPES", ((48, 64, 32), (16, 32, 24)))
    shapes = []

    def counted(path, a, b, out):
        shapes.append((path.name, a.shape[0], b.shape[1]))
        return gemm(path, a, b, out)

    monkeypatch.setattr(cpu_plan, "gemm", counted)
    monkeypatch.setattr(cpu_plan, "MEASURE_SECONDS", 0.0)
    rates = cpu_plan.measure(available_paths())
    assert set(rates) == set(PATHS) and min(rates.values()) > 0
    assert sorted(shapes) == sorted([(name, 48, 32) for name in PATHS] * 2)
    shapes.clear()
    monkeypatch.setattr(cpu_plan, "MEASURE_SECONDS", 60.0)
    cpu_plan.measure(available_paths())
    first = [name for name, rows, _ in shapes if rows == 48]
    second = [name for name, rows, _ in shapes if rows == 16]
    assert sorted(first) == sorted(PATHS * (1 + cpu_plan.ROUNDS))
    assert set(second) <= set(PATHS) and len(second) == cpu_plan.ROUNDS * len(set(second)) > 0


def test_the_other_kinds_stop_their_rounds_at_the_plans_deadline(monkeypatch):
    """Past PLAN_SECONDS each path of another kind (here GELU's) is timed once after its start-up
    call; before it, the fastest in every round (a path below half its rate drops out)."""
    calls = []
    gelu = cpu_plan.gelu_tanh
    monkeypatch.setattr(cpu_plan, "gelu_tanh", lambda path, x: calls.append(path.name) or gelu(path, x))
    paths = activation_paths()
    past = cpu_plan.measure_activation(paths, deadline=time.perf_counter())
    assert set(past) == set(paths) and min(past.values()) > 0
    assert sorted(calls) == sorted(list(paths) * 2)
    calls.clear()
    cpu_plan.measure_activation(paths)
    assert max(calls.count(name) for name in paths) == 1 + 3


def cached_rates(file, rates: dict, others: dict | None = None) -> None:
    """A plan for this machine with the given linear rates, as if it had measured them; the other
    kinds' rates follow unless `others` gives them (oneDNN's convolution and the native attention: half
    the slowest; a pair of attention paths: its slower one's; activations and expansions: oneDNN
    twice NumPy; 4-bit layers: expanded twice as fast as from their codes in AMX tiles)."""
    others = others or {}
    convolution = {name: rates.get(name, min(rates.values()) / 2) for name in CONVOLUTION_PATHS}
    pairs = {
        name: min(rates[s.name.removesuffix(EXP_FUSED)], rates[v.name])
        if name not in NATIVE
        else min(rates.values()) / 2
        for name, (s, v) in cpu_plan.attention_pairs().items()
    }
    activation = {name: 1.0 + (name == "onednn") for name in activation_paths()}
    expansion = {name: 1.0 + (path.kernel == "onednn") for name, path in expansion_paths().items()}
    quantized = {name: 2.0 if name == EXPANDED else 1.0 for name in quantized_paths()}
    defaults = {
        "attention": pairs,
        "convolution": convolution,
        "activation": activation,
        "expansion": expansion,
        "quantized": quantized,
    }
    all_rates = {"linear": rates} | {kind: others.get(kind, defaults[kind]) for kind in cpu_plan.KINDS[1:]}
    cpu_plan.write(file, cpu_plan.Plan(cpu_plan.machine_key(), all_rates, "then", 0.0))
    cpu_plan._plan.clear()


@pytest.mark.parametrize("kind", ["attention", "convolution", "activation", "expansion", "quantized"])
def test_a_plan_without_a_kind_of_product_is_measured_again(fresh_plan, kind):
    cpu_plan.plan()
    data = json.loads(fresh_plan.read_text())
    del data["rates"][kind]
    fresh_plan.write_text(json.dumps(data))
    cpu_plan._plan.clear()
    with pytest.warns(UserWarning, match="not a plan"):
        again = cpu_plan.plan()
    assert again.seconds > 0 and kind in json.loads(fresh_plan.read_text())["rates"]


def test_an_older_plan_format_is_measured_again(fresh_plan):
    cpu_plan.plan()
    data = json.loads(fresh_plan.read_text())
    data["key"]["format"] = 2
    data["rates"] = data["rates"]["linear"]  # format 2 kept the linear rates at the top
    fresh_plan.write_text(json.dumps(data))
    cpu_plan._plan.clear()
    with pytest.warns(UserWarning, match="measured for another CPU or other libraries"):
        again = cpu_plan.plan()
    assert again.seconds > 0 and json.loads(fresh_plan.read_text())["key"]["format"] == cpu_plan.FORMAT


@pytest.mark.skipif("onednn convolution fp32" not in CONVOLUTION_PATHS, reason="oneDNN is not installed")
@pytest.mark.parametrize("onednn_speedup", [2.0, 0.5])
def test_convolutions_take_the_path_measured_fastest_for_them(fresh_plan, onednn_speedup):
    rates = {name: 100.0 + i for i, name in enumerate(PATHS)}
    fastest_fp32 = max((name for name in PATHS if name.endswith("fp32")), key=rates.get)
    convolution = rates | {name: onednn_speedup * 200.0 for name in CONVOLUTION_PATHS if name not in rates}
    cached_rates(fresh_plan, rates, {"convolution": convolution})
    with cpu_plan.use("fp32"):
        picked = cpu_plan.active("convolution")
        if onednn_speedup > 1:
            assert picked.name == "onednn convolution fp32" and picked.gemm is None
            assert "; convolutions: oneDNN's convolution, fp32 through oneDNN" in cpu_plan.describe()
        else:
            assert picked.name == fastest_fp32 and picked.gemm == cpu_plan.active()
            assert "convolutions:" not in cpu_plan.describe()
    with cpu_plan.use("numpy fp32"):  # a GEMM path by name: the convolutions unfold windows through it
        assert cpu_plan.active("convolution").gemm == available_paths()["numpy fp32"]
    with cpu_plan.use("onednn convolution fp32"):  # a convolution path by name: fp32 GEMMs elsewhere
        assert cpu_plan.active().dtype == "fp32" and cpu_plan.active("convolution").gemm is None


def test_attention_pairs_keep_one_library():
    pairs = cpu_plan.attention_pairs()
    assert all(s.library == v.library for s, v in pairs.values())
    assert {f"{name} + {name}" for name in PATHS} <= set(pairs)
    with cpu_plan.use("numpy fp32"):  # a GEMM path by name: both products through it
        assert cpu_plan.active("attention") == (available_paths()["numpy fp32"],) * 2


def test_attention_takes_the_pair_measured_fastest_for_a_head(fresh_plan):
    """The linear layers' fastest path is not attention's: each kind takes its own."""
    rates = {name: 100.0 + i for i, name in enumerate(PATHS)}
    fp32 = [name for name in PATHS if name.endswith("fp32")]
    chosen = f"{fp32[0]} + {fp32[0]}"
    pairs = {name: 50.0 for name in cpu_plan.attention_pairs()} | {chosen: 500.0}
    cached_rates(fresh_plan, rates, {"attention": pairs})
    with cpu_plan.use("fp32"):
        assert cpu_plan.active("attention") == cpu_plan.attention_pairs()[chosen]
        if len(fp32) > 1:
            assert cpu_plan.active().name != fp32[0]
            library = available_paths()[fp32[0]].library
            line = f"; attention: q k^T fp32 through {library} and probabilities @ v fp32 through {library}"
            assert line in cpu_plan.describe()


@pytest.mark.skipif("onednn matmul bf16" not in PATHS, reason="no bf16 matmul primitive here")
def test_attention_with_exponentials_in_the_product_is_a_candidate_named_in_the_record(fresh_plan):
    """Measured like every pair (on a head, as attention runs it); taken where fastest, and named."""
    pairs = cpu_plan.attention_pairs()
    fused = "onednn matmul bf16" + EXP_FUSED + " + onednn matmul bf16"
    assert pairs[fused][0].dtype == "bf16" and pairs[fused][1] == available_paths()["onednn matmul bf16"]
    assert fused in cpu_plan.plan().rates["attention"]
    rates = {name: 100.0 if name.endswith("fp32") else 200.0 for name in PATHS}
    cached_rates(fresh_plan, rates, {"attention": dict.fromkeys(pairs, 50.0) | {fused: 500.0}})
    with cpu_plan.use("auto"):
        assert cpu_plan.active("attention") == pairs[fused]
        assert "; attention: q k^T and its exponentials bf16 through oneDNN" in cpu_plan.describe()


@pytest.mark.parametrize("native", [name for name in NATIVE if name in cpu_plan.attention_pairs()])
def test_native_attention_is_a_candidate_taken_without_a_mask_and_named_in_the_record(fresh_plan, native):
    """Each native kernel that runs here: measured on a layer's heads; taken where fastest, and
    named; where a mask or the gradients need a pair of GEMMs, the fastest of those."""
    pairs = cpu_plan.attention_pairs()
    assert pairs[native][0].dtype == pairs[native][1].dtype == "bf16"
    assert cpu_plan.plan().rates["attention"][native] > 0
    second = next(
        name for name, (scores, _) in pairs.items() if scores.dtype == "bf16" and name not in NATIVE
    )
    rates = {name: 100.0 if name.endswith("fp32") else 200.0 for name in PATHS}
    cached_rates(fresh_plan, rates, {"attention": dict.fromkeys(pairs, 50.0) | {native: 500.0, second: 90.0}})
    with cpu_plan.use("auto"):
        assert cpu_plan.active("attention") == pairs[native]
        assert cpu_plan.active("attention", gemm_pair=True) == pairs[second]
        how = "AMX tiles" if NATIVE[native] == "tiles" else "AVX512-BF16"
        assert f"; attention: whole heads bf16 in {how} through C compiled by" in cpu_plan.describe()
    with cpu_plan.use(native):  # by name, as the tests take it; the GEMMs then in bf16
        assert cpu_plan.active("attention") == pairs[native] and cpu_plan.active().dtype == "bf16"
    with cpu_plan.use("fp32"):
        assert cpu_plan.active("attention") != pairs[native]


@pytest.mark.skipif(not BF16_PATHS, reason="no bf16 GEMM on this CPU")
def test_each_attention_product_takes_its_own_dtype(fresh_plan):
    """bf16 scores with fp32 values measured fastest: auto takes that pair; fp32 and bf16 take the
    pairs of one dtype; the attention is then within the bf16 bound of fp32's."""
    rates = {name: 100.0 if name.endswith("fp32") else 200.0 for name in PATHS}
    mixed = f"{BF16_PATHS[0]} + {BF16_PATHS[0].replace('bf16', 'fp32')}"
    pairs = {name: 100.0 for name in cpu_plan.attention_pairs()} | {mixed: 300.0}
    cached_rates(fresh_plan, rates, {"attention": pairs})
    with cpu_plan.use("auto"):
        assert [path.dtype for path in cpu_plan.active("attention")] == ["bf16", "fp32"]
        assert "attention: q k^T bf16 through" in cpu_plan.describe()
        assert "probabilities @ v fp32 through" in cpu_plan.describe()
    with cpu_plan.use("bf16"):
        assert [path.dtype for path in cpu_plan.active("attention")] == ["bf16", "bf16"]
    with cpu_plan.use("fp32"):
        assert [path.dtype for path in cpu_plan.active("attention")] == ["fp32", "fp32"]
    from flux1.nn.attention import attention

    q, k, v = (mx.random.normal((1, 2, 40, 16), key=mx.random.key(i)) for i in range(3))
    with cpu_plan.use("fp32"):
        reference = np.array(attention(q, k, v, 0.25))
    with cpu_plan.use("auto"):
        got = np.array(attention(q, k, v, 0.25))
    assert 0 < relative_error(got, reference) < 4e-3


@pytest.mark.skipif(not BF16_PATHS, reason="no bf16 GEMM on this CPU")
@pytest.mark.parametrize("bf16_speedup, picked", [(2.0, "bf16"), (1.05, "fp32"), (0.5, "fp32")])
def test_auto_takes_bf16_only_where_it_measured_clearly_faster(fresh_plan, bf16_speedup, picked):
    rates = {name: 100.0 + i for i, name in enumerate(PATHS) if name.endswith("fp32")}
    fastest_fp32 = max(rates, key=rates.get)
    rates |= {name: bf16_speedup * rates[fastest_fp32] - i for i, name in enumerate(BF16_PATHS)}
    cached_rates(fresh_plan, rates)
    with cpu_plan.use("auto"):
        assert cpu_plan.active().name == (BF16_PATHS[0] if picked == "bf16" else fastest_fp32)
    with cpu_plan.use("fp32"):
        assert cpu_plan.active().name == fastest_fp32
    with cpu_plan.use("bf16"):
        assert cpu_plan.active().name == BF16_PATHS[0]
        assert "bf16 inputs, fp32 sums" in cpu_plan.describe()
        assert available_paths()[BF16_PATHS[0]].library in cpu_plan.describe()


def test_precision_and_path_choices_are_checked():
    with pytest.raises(ValueError, match=r"^--precision fp16: expected one of auto, fp32, bf16$"):
        cpu_plan.set_precision("fp16")
    with (
        pytest.raises(ValueError, match="--precision fast: expected one of auto, fp32, bf16, numpy fp32"),
        cpu_plan.use("fast"),
    ):
        pass
    with cpu_plan.use("numpy fp32"):
        assert cpu_plan.active().name == "numpy fp32"
        assert "fp32 through NumPy" in cpu_plan.describe()


def test_cpu_kernels_keep_fp32_activations_at_every_precision():
    if not backend.numpy_kernels():
        pytest.skip("the CPU kernels are not in use")
    assert backend.compute_dtype(mx.bfloat16, "fp32") == mx.float32
    assert backend.compute_dtype(mx.bfloat16, "auto") == mx.float32
    if BF16_PATHS:
        assert backend.compute_dtype(mx.bfloat16, "bf16") == mx.float32
    else:
        with pytest.raises(ValueError, match="--precision bf16: this CPU .* has no bf16 GEMM"):
            backend.compute_dtype(mx.bfloat16, "bf16")


@pytest.mark.skipif("onednn" not in activation_paths(), reason="oneDNN is not installed")
@pytest.mark.parametrize("onednn_speedup", [2.0, 0.5])
def test_activations_take_the_path_measured_fastest_at_every_precision(fresh_plan, onednn_speedup):
    rates = {name: 100.0 + i for i, name in enumerate(PATHS)}
    cached_rates(fresh_plan, rates, {"activation": {"numpy": 1.0, "onednn": onednn_speedup}})
    expected = "onednn" if onednn_speedup > 1 else "numpy"
    for precision in ("auto", "fp32"):
        with cpu_plan.use(precision):
            assert cpu_plan.active("activation").name == expected
            mentioned = (
                f"; activations through {cpu_plan.active('activation').library}" in cpu_plan.describe()
            )
            assert mentioned == (cpu_plan.active("activation").library != cpu_plan.active().library)
    with cpu_plan.use("numpy"):  # an activation path by name: fp32 GEMMs elsewhere
        assert cpu_plan.active("activation").name == "numpy" and cpu_plan.active().dtype == "fp32"


@pytest.mark.parametrize(
    "to_bf16, to_fp32", [("onednn", "numpy"), ("numpy", "onednn"), ("native", "numpy"), ("onednn", "native")]
)
def test_quantized_weights_expand_to_the_gemms_dtype_by_the_kernel_measured_fastest_at_it(
    fresh_plan, to_bf16, to_fp32
):
    """The kernel is chosen per target dtype (oneDNN won to bf16 and lost to fp32 on the Intel Xeon
    with AMX), the dtype by the GEMM in use."""
    winners = {"bf16": to_bf16, "fp32": to_fp32}
    kernels = {path.kernel for path in expansion_paths().values()}
    if not set(winners.values()) <= kernels:
        pytest.skip(f"the kernels here are {sorted(kernels)}")
    rates = {name: 100.0 + i for i, name in enumerate(PATHS)}
    expansion = {
        name: 2.0 if path.kernel == winners[path.dtype] else 1.0 for name, path in expansion_paths().items()
    }
    cached_rates(fresh_plan, rates, {"expansion": expansion})
    for precision in ("fp32", *(["bf16"] if BF16_PATHS else [])):
        with cpu_plan.use(precision):
            picked = cpu_plan.expansion()
            assert picked.dtype == cpu_plan.active().dtype == precision
            assert picked.kernel == winners[precision]
            line = f"; quantized weights expanded through {picked.library}"
            assert (line in cpu_plan.describe(quantized=True)) == (
                picked.library != cpu_plan.active().library
            )
            assert line not in cpu_plan.describe()  # a dense model's record does not mention it
    for kernel in sorted(kernels):  # by name: fp32 GEMMs, the named kernel
        with cpu_plan.use(kernel):
            assert cpu_plan.expansion() == expansion_paths()[f"{kernel} to fp32"]


FROM_CODES = [name for name in (TILES, VECTORS) if name in quantized_paths()]


@pytest.mark.parametrize("codes", FROM_CODES)
@pytest.mark.parametrize("codes_speedup", [2.0, 0.95, 0.5])
def test_4bit_layers_multiply_from_their_codes_with_bf16_gemms_unless_expanding_is_clearly_faster(
    fresh_plan, codes, codes_speedup
):
    """Expanding needs the scratch buffer (a layer's weight in bf16): taken only where it measured
    more than EXPANDED_MARGIN (1.1) times as fast as the faster of the codes' kernels (AMX tiles,
    AVX512-BF16 vectors; the other one here measured slower)."""
    rates = {name: 100.0 + i for i, name in enumerate(PATHS)}
    quantized = {EXPANDED: 100.0} | {name: 50.0 for name in FROM_CODES} | {codes: 100.0 * codes_speedup}
    cached_rates(fresh_plan, rates, {"quantized": quantized})
    where = {TILES: "AMX tiles", VECTORS: "AVX512-BF16 vectors"}[codes]
    line = f"; 4-bit weights multiplied from their codes in {where} through C compiled by "
    from_codes = codes_speedup * cpu_plan.EXPANDED_MARGIN >= 1
    with cpu_plan.use("bf16"):
        assert cpu_plan.quantized_product().name == (codes if from_codes else EXPANDED)
        assert (line in cpu_plan.describe(quantized=True)) == from_codes
        assert line not in cpu_plan.describe()  # a dense model's record does not mention it
    with cpu_plan.use("fp32"):  # the codes multiply in bf16: never under fp32 GEMMs
        assert cpu_plan.quantized_product().name == EXPANDED
        assert line not in cpu_plan.describe(quantized=True)
    for name in (*FROM_CODES, EXPANDED):  # named: that way, with bf16 GEMMs
        with cpu_plan.use(name):
            assert cpu_plan.quantized_product().name == name and cpu_plan.active().dtype == "bf16"


@pytest.mark.parametrize("name", [name for name in NATIVE_KERNELS if name in PATHS])
@pytest.mark.parametrize("m", [37, 64])
def test_the_own_gemm_takes_the_products_of_linear_layers(monkeypatch, name, m):
    """flux1's own GEMM in AMX tiles or AVX512-BF16 vectors computes a @ W^T with W's bf16 rows in
    memory as `Linear` holds them (here rows and columns of a wider weight, K past one 3072-wide slice), x a column slice of
    a wider matrix, added to a slice of a wider output: within gamma_n (sum |a w| + |out|), n = k +
    1, of the float64 product of the bf16 operands; a product it does not take (W's columns
    contiguous) goes to a library's bf16 GEMM."""
    path = available_paths()[name]
    where = "AMX tiles" if NATIVE_KERNELS[name] == "tiles" else "AVX512-BF16 vectors"
    with cpu_plan.use(name):  # the record names the kernel
        assert cpu_plan.describe().startswith(
            f"CPU GEMMs bf16 inputs, fp32 sums through flux1's GEMM in {where}, C "
        )
    rng = np.random.default_rng(m)
    k, n = 3200, 64
    a = as_bf16(rng.standard_normal((m, k + 32), np.float32))[:, 32:]
    w = as_bf16(rng.standard_normal((n + 32, k + 64), np.float32))[16 : 16 + n, 64:]
    wide = rng.standard_normal((m, n + 3)).astype(np.float32)
    start = wide[:, :n].astype(np.float64)
    calls, tile_products = [], native.tile_products
    monkeypatch.setattr(
        native,
        "tile_products",
        lambda *args, kernel: calls.append(kernel) or tile_products(*args, kernel=kernel),
    )
    gemm(path, a, w.T, out=wide[:, :n], accumulate=True)
    x64, w64 = (widened(np.ascontiguousarray(bits)).astype(np.float64) for bits in (a, w))
    terms = k + 1
    bound = terms * 2.0**-24 / (1 - terms * 2.0**-24) * (np.abs(x64) @ np.abs(w64).T + np.abs(start))
    assert calls == [NATIVE_KERNELS[name]] and np.all(np.abs(wide[:, :n] - (start + x64 @ w64.T)) <= bound)
    gemm(path, a, np.ascontiguousarray(w.T), out=wide[:, :n])
    assert len(calls) == 1 and relative_error(wide[:, :n], x64 @ w64.T) < 1e-6
