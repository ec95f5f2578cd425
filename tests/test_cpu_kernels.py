"""The NumPy CPU paths (attention, GELU, convolution, group and layer norms, linear) compute what MLX's own ops
or the reference compute, through every GEMM path of the CPU plan (forced by name, so the tests do
not depend on the plan this machine picks).

Bounds: fp32 GEMMs 1e-5 (another summation order). bf16 GEMMs against the same computation on
bf16-rounded inputs in float64: 1e-6 (only the inputs are rounded; sums and bias in fp32), 1e-3 in
attention (a probability that lies within fp32 noise of a bf16 midpoint rounds the other way in the
reference: 2^-8 of that probability); against fp32: 8e-3 (two roundings of 2^-9 chained)."""

import subprocess
import sys

import gguf
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from tests.conftest import relative_error
from tests.test_gguf import FILE_TYPES, random_blocks

from flux1 import backend, cpu_plan
from flux1.gguf.blocks import LAYOUTS, block_size, cpu_form, decode
from flux1.models.embeddings import rope_frequencies
from flux1.models.flux_blocks import DoubleStreamBlock, QKNorm, SingleStreamBlock, joint_attention, modulate
from flux1.models.vae import Decoder, ResnetBlock, Upsample, _phase_kernel
from flux1.nn import attention as attention_module
from flux1.nn import cpu_attention, cpu_expansion, cpu_flux_blocks, cpu_linear, cpu_vae, native, onednn
from flux1.nn import gemm as gemm_module
from flux1.nn.activations import gelu_tanh, nn_gelu_tanh
from flux1.nn.attention import attention
from flux1.nn.convolution import conv2d
from flux1.nn.cpu_activations import activation_paths
from flux1.nn.cpu_attention import EXP_FUSED
from flux1.nn.cpu_convolution import convolution_paths
from flux1.nn.cpu_expansion import expanded_weight, expansion_paths
from flux1.nn.gemm import available_paths
from flux1.nn.group_norm import group_norm
from flux1.nn.layer_norm import layer_norm
from flux1.nn.linear import Linear, LowRankAdapter
from flux1.nn.numpy_cpu import as_bf16, as_numpy

PATHS = list(available_paths())
CONVOLUTION_PATHS = list(convolution_paths())


def bf16_rounded(x) -> np.ndarray:
    """x rounded to bf16, as float64."""
    return (as_bf16(np.asarray(x, np.float32)).astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def reference_attention(q, k, v, scale, mask, round_inputs, round_weights=True) -> np.ndarray:
    """softmax(scale q k^T + mask) v in float64; with round_inputs, q, k, v and (round_weights) the
    probabilities rounded to bf16 first, as the bf16 GEMMs take them."""
    rounded = bf16_rounded if round_inputs else (lambda a: np.asarray(a, np.float64))
    scores = scale * (rounded(q) @ np.swapaxes(rounded(k), -1, -2))
    if mask is not None:
        scores = scores + np.asarray(mask, np.float64)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return (rounded(weights) if round_weights else weights) @ rounded(v)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("scores_values", [None, 5 * 17])
def test_cpu_attention_equals_mlx_kernel(with_mask, path, scores_values, monkeypatch):
    """Whole heads, and heads in blocks of 5 query rows (the last one 2)."""
    blocks = []
    if scores_values:
        monkeypatch.setattr(attention_module, "SCORES_VALUES", scores_values)
        head = cpu_attention.head_attention
        monkeypatch.setattr(cpu_attention, "head_attention", lambda *a: blocks.append(len(a[2])) or head(*a))
    shape = (2, 3, 17, 8)
    q, k, v = (mx.random.normal(shape, key=mx.random.key(i)) for i in range(3))
    mask = mx.random.normal((1, 3, 17, 17), key=mx.random.key(9)) if with_mask else None
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=mask)
    with cpu_plan.use(path):
        got = attention(q, k, v, 0.3, mask)
    bf16 = path.endswith("bf16")
    assert relative_error(got, expected) < (8e-3 if bf16 else 1e-5)
    assert relative_error(got, reference_attention(q, k, v, 0.3, mask, bf16)) < (1e-3 if bf16 else 1e-5)
    assert blocks == ([5, 5, 5, 2] * 6 if scores_values else [])


NATIVE_PAIRS = cpu_attention.native_pairs()  # each native attention kernel that runs here


@pytest.mark.parametrize("path", PATHS + list(NATIVE_PAIRS))
@pytest.mark.parametrize("lengths", [(13,), (5, 9)])
@pytest.mark.parametrize(("head_dim", "axes"), [(8, (2, 2, 4)), (40, (8, 16, 16))])
def test_cpu_rope_attention_equals_mlx_graph(lengths, path, head_dim, axes):
    """FLUX's joint attention from the fused qkv projections (head split, q/k RMS norms, RoPE, merged
    heads) on the CPU kernels against MLX's graph of it on MLX's kernels: one stream (single blocks)
    and two (double blocks: text, then image), a batch of 2 with their own positions; the bounds of
    the attention test above. With bf16 GEMMs the output comes rounded to bf16, as the output
    projections take it (2^-9 more, within the bound). The native attention normalizes and rotates
    q and k itself as it packs them: a head_dim not a multiple of 16 there too."""
    heads = 3
    streams = []
    for i, length in enumerate(lengths):
        qkv = 2 * mx.random.normal((2, length, 3 * heads * head_dim), key=mx.random.key(20 + i))
        norm = QKNorm(head_dim)
        norm.query_norm.scale, norm.key_norm.scale = (
            mx.random.normal((head_dim,), key=mx.random.key(30 + 2 * i + j)) for j in range(2)
        )
        streams.append((qkv, norm))
    ids = mx.random.randint(0, 64, (2, sum(lengths), 3), key=mx.random.key(40))
    rope = rope_frequencies(ids, axes, 10000.0)
    with backend.use("mlx"):
        expected = joint_attention(streams, heads, rope)
    with cpu_plan.use(path):
        got = joint_attention(streams, heads, rope)
    assert got.shape == expected.shape == (2, sum(lengths), heads * head_dim)
    bf16 = "bf16" in path  # a bf16 GEMM path's name, or a native kernel's
    assert got.dtype == (mx.bfloat16 if bf16 else mx.float32)
    assert relative_error(got.astype(mx.float32), expected) < (8e-3 if bf16 else 1e-5)


FUSED_PAIR = next((pair for name, pair in cpu_plan.attention_pairs().items() if EXP_FUSED in name), None)
needs_fused = pytest.mark.skipif(FUSED_PAIR is None, reason="no bf16 matmul primitive (oneDNN, AVX512-BF16)")


def with_attention_pair(monkeypatch, pair) -> None:
    """`pair` as the plan's attention (the native one only where it is taken: no mask, no gradients)."""
    active = cpu_plan.active
    monkeypatch.setattr(
        cpu_plan,
        "active",
        lambda kind="linear", gemm_pair=False: (
            pair
            if kind == "attention" and not (gemm_pair and pair[0].name in cpu_attention.NATIVE)
            else active(kind, gemm_pair)
        ),
    )


@needs_fused
@pytest.mark.parametrize("scores_values", [None, 5 * 17])
def test_attention_with_exponentials_in_the_product_equals_the_reference(monkeypatch, scores_values):
    """exp(scale q k^T - bound) written in bf16 by the product, each row divided by the sum of its
    own bf16 weights. Against the float64 attention of the bf16-rounded q, k, v with unrounded
    probabilities: 3e-3 (2^-9 per weight; 1.4e-3 to 1.6e-3 measured, as for the usual bf16 path,
    which rounds the probabilities after normalizing), and no further from it than the usual path
    (within 25%). Whole heads and blocks of 5 rows; a mask takes the usual path."""
    if scores_values:
        monkeypatch.setattr(attention_module, "SCORES_VALUES", scores_values)
    with_attention_pair(monkeypatch, FUSED_PAIR)
    fused = []
    exp_attention = cpu_attention._exp_attention
    monkeypatch.setattr(
        cpu_attention, "_exp_attention", lambda *a: fused.append(len(a[1])) or exp_attention(*a)
    )
    q, k, v = (mx.random.normal((2, 3, 17, 8), key=mx.random.key(i)) for i in range(3))
    got = attention(q, k, v, 0.3)
    assert relative_error(got, mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3)) < 8e-3
    exact_weights = reference_attention(q, k, v, 0.3, None, True, round_weights=False)
    assert fused == ([5, 5, 5, 2] * 6 if scores_values else [17] * 6)
    with_attention_pair(monkeypatch, (FUSED_PAIR[1], FUSED_PAIR[1]))
    usual = attention(q, k, v, 0.3)
    assert relative_error(got, exact_weights) < min(3e-3, 1.25 * relative_error(usual, exact_weights))
    fused.clear()
    with_attention_pair(monkeypatch, FUSED_PAIR)
    mask = mx.random.normal((1, 3, 17, 17), key=mx.random.key(9))
    assert relative_error(attention(q, k, v, 0.3, mask), reference_attention(q, k, v, 0.3, mask, True)) < 1e-3
    assert fused == []


@pytest.mark.parametrize(
    "name", list(NATIVE_PAIRS) or [pytest.param("-", marks=pytest.mark.skip("no native attention here"))]
)
@pytest.mark.parametrize(
    ("shape", "keys", "magnitude"),
    [
        ((2, 3, 17, 8), 17, 1.0),
        ((1, 2, 45, 40), 70, 1.0),
        ((1, 2, 64, 128), 96, 8.0),
        ((1, 2, 300, 64), 2100, 4.0),
    ],
)
def test_native_attention_equals_the_reference(monkeypatch, name, shape, keys, magnitude):
    """Whole heads in C (`native.attend`), each kernel that runs here (AMX tiles, AVX512-BF16 vectors;
    a compiler without AMX, or without AVX512-BF16, builds fewer): q k^T and p v from bf16 with fp32 sums, each
    row's exponentials rounded to bf16 and its output divided by their sum. Rows, keys and head_dim
    not multiples of 32 (padded with zeros), more keys than queries, peaked probabilities (q times
    8: most exponentials underflow), and keys in three chunks for groups of query blocks (2100 keys
    for 300 rows: where a row's largest score grows from chunk to chunk, what came before is
    rescaled). Against the float64 attention of the bf16-rounded q, k, v with
    unrounded probabilities: 3e-3 (2^-9 per probability, as for the exponentials in the product)
    and no further than the usual bf16 path (within 25%). The same on strided NumPy views (k and v
    slices of one projection, the output a transposed view, as the transformer's attention passes
    them); a mask takes a pair of GEMMs."""
    batch, heads, queries, dim = shape
    q = magnitude * mx.random.normal(shape, key=mx.random.key(0))
    k, v = (mx.random.normal((batch, heads, keys, dim), key=mx.random.key(i)) for i in (1, 2))
    cpu_plan.plan()  # measured (where it is not cached) before the kernel's calls are counted
    with_attention_pair(monkeypatch, NATIVE_PAIRS[name])
    attend = native.attend
    calls = []
    monkeypatch.setattr(native, "attend", lambda *a: calls.append(a[0].shape) or attend(*a))
    got = attention(q, k, v, 0.3)
    assert calls == [shape]
    exact_weights = reference_attention(q, k, v, 0.3, None, True, round_weights=False)
    with cpu_plan.use("bf16"):
        usual_pair = cpu_plan.active("attention", gemm_pair=True)
    with_attention_pair(monkeypatch, usual_pair)
    usual = attention(q, k, v, 0.3)
    assert relative_error(got, exact_weights) < min(3e-3, 1.25 * relative_error(usual, exact_weights))

    projection = np.stack([np.array(k), np.array(v)], axis=3)  # [b, h, keys, 2, d]: k and v strided
    out = np.full((batch, queries, heads, dim), np.nan, np.float32)
    kernel = cpu_attention.NATIVE[name]
    attend(
        np.array(q), projection[:, :, :, 0], projection[:, :, :, 1], 0.3, out.transpose(0, 2, 1, 3), kernel
    )
    assert np.array_equal(out.transpose(0, 2, 1, 3), np.array(got))

    with_attention_pair(monkeypatch, NATIVE_PAIRS[name])
    mask = mx.random.normal((1, heads, queries, keys), key=mx.random.key(9))
    assert relative_error(attention(q, k, v, 0.3, mask), reference_attention(q, k, v, 0.3, mask, True)) < 1e-3
    assert calls == [shape]


@pytest.mark.skipif(not NATIVE_PAIRS, reason="no native attention here")
def test_attention_operands_are_packed_in_the_products_layout():
    """The packing kernels, exactly: q as rows, k with each row's feature pairs side by side 32 keys at a
    time, v with each pair of rows' values side by side 32 features at a time, from two sources (a
    text and an image stream, each [B, heads, tokens, features] strided as in the fused projections),
    rounded to bf16 as `as_bf16` rounds, rows and features past the real ones zeros; the rows are
    split over the cores by blocks of 32 (two here) and a token's heads packed in turn."""
    rng = np.random.default_rng(0)
    batch, heads, dim, lengths = 2, 3, 40, (7, 50)
    streams = [rng.standard_normal((batch, length, 3, heads, dim), np.float32) for length in lengths]
    rows, padded = 64, 64  # 57 tokens and 40 features, padded to multiples of 32
    kernels = native.library()
    for at, (pack, layout) in enumerate(
        [
            (kernels.pack_rows, lambda x: x),
            (
                kernels.pack_feature_pairs,
                lambda x: x.reshape(-1, rows // 32, 32, padded // 2, 2).transpose(0, 1, 3, 2, 4),
            ),
            (
                kernels.pack_row_pairs,
                lambda x: x.reshape(-1, rows // 2, 2, padded // 32, 32).transpose(0, 3, 1, 4, 2),
            ),
        ]
    ):
        sources = [native.source(stream[:, :, at].transpose(0, 2, 1, 3), first)
                   for stream, first in zip(streams, (0, lengths[0]), strict=True)]  # fmt: skip
        got = native._packed(pack, sources, batch * heads, rows, padded)
        joint = np.concatenate([stream[:, :, at] for stream in streams], axis=1)  # [B, tokens, heads, dim]
        expected = np.zeros((batch * heads, rows, padded), np.uint16)
        expected[:, : sum(lengths), :dim] = as_bf16(
            joint.transpose(0, 2, 1, 3).reshape(batch * heads, -1, dim)
        )
        assert np.array_equal(got.reshape(-1), layout(expected).reshape(-1)), pack.__name__


@pytest.mark.skipif(not NATIVE_PAIRS, reason="no native attention here")
def test_heads_wider_than_the_plan_measured_take_a_gemm_pair(monkeypatch):
    """The native kernels were measured on FLUX's 128-wide heads: a wider one (the VAE's is 512)
    goes through the plan's GEMM pair."""
    cpu_plan.plan()
    with_attention_pair(monkeypatch, next(iter(NATIVE_PAIRS.values())))
    calls = []
    attend = native.attend
    monkeypatch.setattr(native, "attend", lambda *a: calls.append(a[0].shape) or attend(*a))
    q, k, v = (mx.random.normal((1, 1, 40, 160), key=mx.random.key(i)) for i in range(3))
    got = attention(q, k, v, 0.1)
    assert calls == []
    assert relative_error(got, mx.fast.scaled_dot_product_attention(q, k, v, scale=0.1)) < 8e-3


@needs_fused
def test_a_block_whose_exponentials_underflow_is_computed_the_usual_way(monkeypatch):
    """One query far longer than the others raises its block's bound some 300 above their scores,
    whose exponentials then underflow: that block is computed as the pair's usual path computes it
    (bit for bit), the other block keeps the exponentials in the product."""
    values_path = FUSED_PAIR[1]
    rng = np.random.default_rng(0)
    q, k, v = (as_bf16(rng.standard_normal((12, 8), np.float32) * 0.1) for _ in range(3))
    q[0] = as_bf16(np.full(8, 200.0, np.float32))
    bounds = cpu_attention.score_bounds(
        *(np.left_shift(x, 16, dtype=np.uint32).view(np.float32) for x in (q, k)), 1.0
    )
    scores, weights = np.empty((6, 12), np.float32), np.empty((6, 12), np.uint16)
    got, usual = np.empty((12, 8), np.float32), np.empty((12, 8), np.float32)
    cpu_attention.attend_head(FUSED_PAIR, q, k, v, 1.0, None, (scores, weights), got, bounds)
    cpu_attention.attend_head((values_path,) * 2, q, k, v, 1.0, None, (scores, weights), usual)
    assert np.array_equal(got[:6], usual[:6])  # the block of the long query: the usual way
    assert not np.array_equal(got[6:], usual[6:])  # the other: its own rounding of the weights
    assert relative_error(got[6:], usual[6:]) < 4e-3


def test_numpy_fp32_attention_is_the_old_computation_bit_for_bit():
    q, k, v = (mx.random.normal((1, 2, 33, 16), key=mx.random.key(i)) for i in range(3))
    qn, kn, vn = (np.array(a) for a in (q, k, v))
    expected = np.empty_like(qn)
    for h in range(2):
        scores = (qn[0, h] * np.float32(0.25)) @ kn[0, h].T
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        expected[0, h] = scores @ vn[0, h]
    with cpu_plan.use("numpy fp32"):
        assert np.array_equal(np.array(attention(q, k, v, 0.25)), expected)


def test_cpu_attention_with_causal_mask_ignores_future_tokens():
    q, k, v = (mx.random.normal((1, 2, 6, 4), key=mx.random.key(i)) for i in range(3))
    causal = mx.triu(mx.full((6, 6), -mx.inf), k=1)
    changed_future = mx.concatenate([v[:, :, :3], v[:, :, 3:] + 5.0], axis=2)
    first_three = attention(q, k, v, 0.5, causal)[:, :, :3]
    assert relative_error(attention(q, k, changed_future, 0.5, causal)[:, :, :3], first_three) == 0.0


@pytest.mark.parametrize("path", list(activation_paths()))
def test_cpu_gelu_equals_formula(path):
    """Against the formula in float64 (both paths: 1e-6, a few fp32 roundings; oneDNN computes it
    as x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3)), the same function), and MLX's fp32 formula."""
    x = 3 * mx.random.normal((4, 33, 7), key=mx.random.key(1))
    x64 = np.array(x, np.float64)
    expected = 0.5 * x64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x64 + 0.044715 * x64**3)))
    with cpu_plan.use(path):
        got = gelu_tanh(x)
    assert got.shape == x.shape and got.dtype == mx.float32
    assert relative_error(got, expected) < 1e-6
    assert relative_error(got, nn_gelu_tanh(x)) < 1e-6


@pytest.mark.parametrize(
    "height, width, in_channels, out_channels, kernel, padding, stride",
    [
        (17, 20, 8, 12, 3, 1, 1),
        (9, 12, 5, 7, 1, 0, 1),
        (70, 6, 4, 5, 3, 0, 1),
        (300, 33, 3, 4, 3, 1, 1),
        (17, 21, 6, 5, 3, 0, 2),
    ],
)
@pytest.mark.parametrize("path", CONVOLUTION_PATHS)
def test_cpu_conv2d_equals_mlx_kernel(
    height, width, in_channels, out_channels, kernel, padding, stride, path
):
    """Unfolded windows through each GEMM (one matmul per band; the 300-row shape spans several
    bands) and oneDNN's convolution primitive; a strided convolution (the VAE encoder's) takes
    oneDNN's where the path unfolds windows. bf16: against MLX's fp32 convolution of the
    bf16-rounded image and kernel."""
    x = mx.random.normal((2, height, width, in_channels), key=mx.random.key(0))
    weight = mx.random.normal((out_channels, kernel, kernel, in_channels), key=mx.random.key(1))
    bias = mx.random.normal((out_channels,), key=mx.random.key(2))
    bf16 = path.endswith("bf16")
    for stored in (mx.float32, mx.bfloat16):  # a bf16 kernel is widened exactly
        kernel = weight.astype(stored)
        image = x.astype(mx.bfloat16) if bf16 else x
        expected = (
            mx.conv2d(
                image.astype(mx.float32),
                kernel.astype(mx.bfloat16 if bf16 else mx.float32).astype(mx.float32),
                stride=stride,
                padding=padding,
            )
            + bias
        )
        with cpu_plan.use(path):
            got = conv2d(x, kernel, bias, stride=stride, padding=padding)
        assert got.shape == expected.shape
        assert relative_error(got, expected) < 1e-5


@pytest.mark.parametrize("path", list(activation_paths()))
@pytest.mark.parametrize("silu", [False, True])
def test_cpu_group_norm_equals_torch(silu, path):
    """Against torch.nn.functional.group_norm (+ SiLU) in float64, a batch of 2 (each image its own
    statistics), through each activation path; 1e-5: fp32 statistics."""
    import torch

    x = 3 + 2 * mx.random.normal((2, 70, 90, 64), key=mx.random.key(3))
    weight, bias = (mx.random.normal((64,), key=mx.random.key(k)) for k in (4, 5))
    reference = torch.nn.functional.group_norm(
        torch.from_numpy(np.array(x, np.float64)).permute(0, 3, 1, 2),
        32,
        torch.from_numpy(np.array(weight, np.float64)),
        torch.from_numpy(np.array(bias, np.float64)),
        1e-6,
    )
    if silu:
        reference = torch.nn.functional.silu(reference)
    with cpu_plan.use(path):
        got = group_norm(x, 32, weight, bias, 1e-6, silu)
    assert relative_error(got, mx.array(reference.permute(0, 2, 3, 1).numpy().astype(np.float32))) < 1e-5


class ReferenceCode:
    """What a oneDNN primitive cache returns where oneDNN has only its reference code."""

    implementation = "ref:any"

    def __call__(self, *arguments):
        raise AssertionError("oneDNN's reference code ran")


@pytest.mark.skipif("onednn" not in activation_paths(), reason="oneDNN is not installed")
def test_group_norm_keeps_numpy_where_onednn_has_only_reference_code(monkeypatch):
    """The plan measured GELU's primitive, not the group norm's: where oneDNN would run its
    scale-shift-SiLU in reference code, NumPy computes it, bit for bit as the NumPy path."""
    x = mx.random.normal((1, 9, 11, 64), key=mx.random.key(6))
    weight, bias = mx.ones((64,)), mx.zeros((64,))
    with cpu_plan.use("numpy"):
        expected = group_norm(x, 32, weight, bias, 1e-6, silu=True)
    monkeypatch.setattr(onednn, "scale_shift_silu", lambda pixels, channels: ReferenceCode())
    with cpu_plan.use("onednn"):
        assert np.array_equal(np.array(group_norm(x, 32, weight, bias, 1e-6, silu=True)), np.array(expected))


@pytest.mark.skipif(not backend.numpy_kernels(), reason="the CPU kernels are not in use")
@pytest.mark.parametrize("path", CONVOLUTION_PATHS)
@pytest.mark.parametrize("channels", [(32, 32), (32, 64)], ids=["identity shortcut", "1x1 shortcut"])
def test_resnet_block_on_numpy_arrays_equals_its_layers_through_mlx(channels, path):
    """The VAE's resnet block on the CPU kernels (`nn/cpu_vae.py`: NumPy arrays between its
    kernels, the residual added in NumPy) computes bit for bit what its layers' own CPU paths compute
    with MLX arrays between them."""
    block = ResnetBlock(*channels, groups=8)
    shapes = {name: value.shape for name, value in tree_flatten(block.parameters())}
    block.update(
        tree_unflatten(
            [
                (name, mx.random.normal(shape, key=mx.random.key(i)))
                for i, (name, shape) in enumerate(shapes.items())
            ]
        )
    )
    x = mx.random.normal((2, 9, 11, channels[0]), key=mx.random.key(20))
    with cpu_plan.use(path):
        layers = block.conv2(block.norm2(block.conv1(block.norm1(x, silu=True)), silu=True))
        expected = (block.conv_shortcut(x) if "conv_shortcut" in block else x) + layers
        got = block(x)
    assert got.shape == (2, 9, 11, channels[1])
    assert np.array_equal(np.array(got), np.array(expected))


@pytest.mark.skipif(not backend.numpy_kernels(), reason="the CPU kernels are not in use")
@pytest.mark.parametrize("path", CONVOLUTION_PATHS)
def test_decoder_on_numpy_arrays_equals_its_blocks_through_mlx(path, monkeypatch):
    """The VAE decoder's up blocks, last norm and convolution on NumPy arrays from block to block
    (`cpu_vae.decoded`: images it made itself normalized in place where a shortcut convolution has
    read them, the mid block's output, MLX's memory, never written) compute bit for bit what its
    blocks compute with MLX arrays between them; the mid block's output is left as it was."""
    config = {"block_out_channels": [16, 32], "norm_num_groups": 8, "layers_per_block": 1}
    decoder = Decoder({**config, "latent_channels": 4, "out_channels": 3})
    shapes = {name: value.shape for name, value in tree_flatten(decoder.parameters())}
    decoder.update(
        tree_unflatten(
            [
                (name, 0.3 * mx.random.normal(shape, key=mx.random.key(i)))
                for i, (name, shape) in enumerate(shapes.items())
            ]
        )
    )
    z = mx.random.normal((2, 5, 6, 4), key=mx.random.key(30))
    mids = []
    decoded = cpu_vae.decoded
    monkeypatch.setattr(
        cpu_vae, "decoded", lambda x, *rest: mids.append((x, np.array(x))) or decoded(x, *rest), raising=True
    )
    monkeypatch.setattr("flux1.models.vae.decoded", cpu_vae.decoded)
    with cpu_plan.use(path):
        got = decoder(z)
        x = decoder.mid_block(decoder.conv_in(z))
        for block in decoder.up_blocks:
            x = block(x)
        expected = decoder.conv_out(decoder.conv_norm_out(x, silu=True))
    assert got.shape == (2, 10, 12, 3)
    assert np.array_equal(np.array(got), np.array(expected))
    [(mid, before)] = mids
    assert np.array_equal(np.array(mid), before)


@pytest.mark.skipif(not backend.numpy_kernels(), reason="the CPU kernels are not in use")
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("weights", ["fp32", "bf16", "4-bit"])
@pytest.mark.parametrize("double", [True, False], ids=["double", "single"])
def test_flux_blocks_on_numpy_arrays_equal_their_layers_through_mlx(double, weights, path, monkeypatch):
    """FLUX's blocks on the CPU kernels (`nn/cpu_flux_blocks.py`: NumPy arrays between the kernels,
    the gated residual sums in NumPy) compute bit for bit what their layers compute through
    `Linear`, `modulate` and `joint_attention` with MLX arrays between them (the same kernels; MLX's
    residual sums round as NumPy's): a batch of 2, each sample its own modulations; bf16 weights in
    AMX tiles where that is the plan's GEMM and 4-bit ones multiplied from their codes where the plan
    takes that (widths multiples of 32 for the tiles)."""
    dim, heads, lengths = 64, 2, (5, 9)
    block = DoubleStreamBlock(dim, heads, 4.0) if double else SingleStreamBlock(dim, heads, 4.0)
    shapes = {name: value.shape for name, value in tree_flatten(block.parameters())}
    block.update(
        tree_unflatten(
            [
                (name, 0.2 * mx.random.normal(shape, key=mx.random.key(i)))
                for i, (name, shape) in enumerate(shapes.items())
            ]
        )
    )
    for _, layer in block.named_modules():
        if isinstance(layer, Linear) and weights == "4-bit":
            layer.quantize(4, 32)
        elif isinstance(layer, Linear) and weights == "bf16":
            layer.weight = layer.weight.astype(mx.bfloat16)
    count = 6 if double else 3
    modulations = [mx.random.normal((2, 1, dim), key=mx.random.key(50 + i)) for i in range(2 * count)]
    modulations = (modulations[:count], modulations[count:]) if double else modulations[:count]
    ids = mx.random.randint(0, 64, (2, sum(lengths), 3), key=mx.random.key(40))
    rope = rope_frequencies(ids, (8, 12, 12), 10000.0)
    streams = [
        mx.random.normal((2, length, dim), key=mx.random.key(60 + i)) for i, length in enumerate(lengths)
    ]
    inputs = [streams[1], streams[0]] if double else [mx.concatenate(streams, axis=1)]
    with cpu_plan.use(path):
        got = block(*inputs, modulations, rope)
        monkeypatch.setattr(cpu_flux_blocks, "takes", lambda *layers: False)
        expected = block(*inputs, modulations, rope)
    got, expected = (list(out) if double else [out] for out in (got, expected))
    for a, b, x in zip(got, expected, inputs, strict=True):
        assert a.shape == b.shape == x.shape and a.dtype == b.dtype == mx.float32
        assert np.array_equal(np.array(a), np.array(b))


@pytest.mark.skipif(not backend.numpy_kernels(), reason="the CPU kernels are not in use")
@pytest.mark.parametrize("path", CONVOLUTION_PATHS)
def test_upsampling_interleaved_in_numpy_equals_mlx_interleaving(path):
    """The VAE's upsampling block on the CPU kernels interleaves its four phases in NumPy
    (`cpu_vae.numpy_upsampled`, as the decoder calls it): bit for bit MLX's slicing and stacking of
    the same convolution's output."""
    block = Upsample(16)
    block.conv.weight = mx.random.normal((16, 3, 3, 16), key=mx.random.key(21))
    block.conv.bias = mx.random.normal((16,), key=mx.random.key(22))
    x = mx.random.normal((2, 5, 7, 16), key=mx.random.key(23))
    kernel = mx.concatenate([_phase_kernel(block.conv.weight, a, b) for a in (0, 1) for b in (0, 1)])
    with cpu_plan.use(path):
        y = conv2d(x, kernel, mx.tile(block.conv.bias, 4), padding=1)
        got = mx.array(cpu_vae.numpy_upsampled(np.array(x), *block.phase_kernels(), 16))
    rows = [
        mx.stack(
            [y[:, a : a + 5, b : b + 7, (2 * a + b) * 16 : (2 * a + b + 1) * 16] for b in (0, 1)], axis=3
        )
        for a in (0, 1)
    ]
    expected = mx.stack(rows, axis=2).reshape(2, 10, 14, 16)
    assert np.array_equal(np.array(got), np.array(expected))


def reference_layer_norm(x, scale, shift, eps: float) -> np.ndarray:
    import torch

    x64 = torch.from_numpy(np.array(x, np.float64))
    normed = torch.nn.functional.layer_norm(x64, x64.shape[-1:], eps=eps).numpy()
    return normed * np.array(scale, np.float64) + np.array(shift, np.float64)


@pytest.mark.parametrize("path", list(activation_paths()))
@pytest.mark.parametrize("per_sample", [False, True])
def test_cpu_layer_norm_equals_torch(per_sample, path):
    """LN(x) * scale + shift against torch's layer_norm in float64, a batch of 2 with odd sizes:
    scale and shift per feature (CLIP's LayerNorm) or per sample and feature (FLUX's adaptive norms,
    each sample its own); 1e-5: fp32 statistics. The NumPy activation path keeps MLX's layer norm."""
    x = 3 + 2 * mx.random.normal((2, 33, 70), key=mx.random.key(7))
    shape = (2, 1, 70) if per_sample else (70,)
    scale, shift = (mx.random.normal(shape, key=mx.random.key(k)) for k in (8, 9))
    with cpu_plan.use(path):
        got = layer_norm(x, 1e-6, scale, shift)
    assert got.shape == x.shape and got.dtype == mx.float32
    assert relative_error(got, reference_layer_norm(x, scale, shift, 1e-6)) < 1e-5


@pytest.mark.skipif("onednn" not in activation_paths(), reason="oneDNN is not installed")
def test_layer_norm_keeps_mlx_where_onednn_has_only_reference_code(monkeypatch):
    x = mx.random.normal((1, 9, 64), key=mx.random.key(10))
    scale, shift = mx.ones((1, 1, 64)), mx.zeros((1, 1, 64))
    expected = mx.fast.layer_norm(x, None, None, 1e-6)
    monkeypatch.setattr(onednn, "layer_norm", lambda rows, cols, eps, dtype="fp32": ReferenceCode())
    with cpu_plan.use("onednn"):
        assert np.array_equal(np.array(layer_norm(x, 1e-6, scale, shift)), np.array(expected))


@pytest.mark.skipif("onednn" not in activation_paths(), reason="oneDNN is not installed")
@pytest.mark.parametrize("path", [name for name in PATHS if name.endswith("bf16")])
def test_a_modulated_input_stays_fp32_where_onednn_writes_bf16_only_in_reference_code(path, monkeypatch):
    """Where oneDNN's layer norm has compiled code for fp32 but not for a bf16 result, the modulated
    input comes in fp32 from the compiled one (the next GEMM rounds it), not from MLX's layer norm."""
    x = mx.random.normal((2, 9, 64), key=mx.random.key(10))
    shift, scale = (mx.random.normal((2, 1, 64), key=mx.random.key(k)) for k in (11, 12))
    with cpu_plan.use(path):
        expected = np.array(layer_norm(x, 1e-6, 1 + scale, shift))
    compiled = onednn.layer_norm
    monkeypatch.setattr(
        onednn,
        "layer_norm",
        lambda rows, cols, eps, dtype="fp32": (
            ReferenceCode() if dtype == "bf16" else compiled(rows, cols, eps)
        ),
    )
    with cpu_plan.use(path):
        if cpu_plan.active("activation").name != "onednn":
            pytest.skip("the plan computes activations through NumPy here")
        got = modulate(x, shift, scale)
    assert got.dtype == mx.float32 and np.array_equal(np.array(got), expected)


EXPANSION_KERNELS = sorted({path.kernel for path in expansion_paths().values()})


def _expansions(layer, kernel: str) -> tuple[np.ndarray, np.ndarray]:
    """The layer's weight expanded by `kernel` to fp32 and to bf16 (as float32), copies. Each is
    written to the scratch buffer from a cache line's start (where the native kernels write whole
    lines past the cache)."""
    fp32 = expanded_weight(layer, "fp32", kernel)
    assert fp32.ctypes.data % 64 == 0
    fp32 = fp32.copy()
    bf16 = expanded_weight(layer, "bf16", kernel)
    assert bf16.ctypes.data % 64 == 0
    return fp32, bf16_widened(bf16)


def bf16_widened(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


@pytest.mark.parametrize("kernel", EXPANSION_KERNELS)
@pytest.mark.parametrize("bits", [3, 4, 5, 6, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_quantized_weights_with_bf16_scales_expand_exactly(group, bits, kernel):
    """A model quantized from bf16 weights (bf16 scales and biases), each of MLX's group sizes: both
    kernels compute exactly `scale * code + bias` in fp32 (as MLX's dequantization of fp32 scales and
    biases does), and for bf16 GEMMs that rounded to the nearest bf16 (oneDNN: (2^bits + code) *
    scale is exact in fp32)."""
    layer = Linear(256, 96)
    layer.weight = mx.random.normal((96, 256), key=mx.random.key(bits)).astype(mx.bfloat16)
    layer.quantize(bits, group)
    scales, biases = (a.astype(mx.float32) for a in (layer.scales, layer.biases))
    dense = np.array(mx.dequantize(layer.weight, scales, biases, group, bits))
    fp32, bf16 = _expansions(layer, kernel)
    assert np.array_equal(fp32, dense)
    assert np.array_equal(bf16, bf16_widened(as_bf16(dense)))


def assert_within_the_affine_bound(got, expected, scales, offsets, bits: int) -> None:
    """|got - expected| <= 2^-22 (|offset| + 2^(bits+1) |scale|) per value of each group: oneDNN's
    three fp32 roundings ((2^bits + code) * scale, offset - 2^bits * scale, their sum) against one."""
    groups = scales.shape[-1]
    bound = 2.0**-22 * (np.abs(offsets) + 2.0 ** (bits + 1) * np.abs(scales))
    error = np.abs(got.astype(np.float64) - expected).reshape(*bound.shape, -1)
    assert np.all(error <= bound[..., None]) and got.shape[-1] % groups == 0


@pytest.mark.parametrize("kernel", EXPANSION_KERNELS)
@pytest.mark.parametrize("bits", [3, 4, 5, 6, 8])
def test_quantized_weights_with_fp32_scales_expand_within_fp32_rounding(bits, kernel):
    """fp32 scales: NumPy and the native kernel compute exactly MLX's `scale * code + bias`; oneDNN's
    product may round (within the affine bound). bf16 is the fp32 expansion rounded to the nearest
    bf16 every way."""
    layer = Linear(256, 96)
    layer.weight = mx.random.normal((96, 256), key=mx.random.key(bits))
    layer.quantize(bits, 64)
    dense = np.array(layer.dense_weight(mx.float32))
    fp32, bf16 = _expansions(layer, kernel)
    assert np.array_equal(bf16, bf16_widened(as_bf16(fp32)))
    if kernel in ("numpy", "native") or bits == 8:  # native: NumPy's arithmetic, compiled
        assert np.array_equal(fp32, dense)
    else:
        scales, biases = np.array(layer.scales), np.array(layer.biases)
        assert_within_the_affine_bound(fp32, dense, scales, biases, bits)


@pytest.mark.parametrize("kernel", EXPANSION_KERNELS)
@pytest.mark.parametrize("qtype", FILE_TYPES, ids=lambda t: t.name)
def test_gguf_blocks_expand_to_gguf_values(qtype, kernel):
    """Every GGUF type through every kernel against gguf-py's values (random blocks, f16 scales from
    zero and subnormal to 1e2): NumPy and the native kernel exactly (gguf-py's arithmetic, or every
    product exact and one rounding), oneDNN within the affine bound; bf16 is the fp32 expansion
    rounded to the nearest bf16. Q4_K's blocks are re-laid by the first expansion."""
    rows = random_blocks(qtype, 1200).reshape(24, -1)  # 50 blocks a row
    cols = 50 * block_size(qtype)[0]
    layer = Linear(cols, 24, bias=False)
    layer.set_gguf(mx.array(rows), qtype)
    expected = gguf.quants.dequantize(rows, qtype)
    fp32, bf16 = _expansions(layer, kernel)
    assert layer.gguf_type == cpu_form(qtype)
    assert np.array_equal(bf16, bf16_widened(as_bf16(fp32)))
    if kernel == "numpy" or LAYOUTS[qtype].bits == 8 or kernel == "native":
        assert np.array_equal(fp32, expected)
    else:
        _, scales, offsets = decode(rows.reshape(-1, block_size(qtype)[1]), qtype)
        shape = (24, cols // LAYOUTS[qtype].group)
        assert_within_the_affine_bound(
            fp32, expected, scales.reshape(shape), offsets.reshape(shape), LAYOUTS[qtype].bits
        )


@pytest.mark.skipif("onednn" not in EXPANSION_KERNELS, reason="oneDNN is not installed")
def test_expansion_keeps_numpy_where_onednn_has_only_reference_code(monkeypatch):
    layer = Linear(256, 96)
    layer.weight = mx.random.normal((96, 256), key=mx.random.key(4))
    layer.quantize(4, 64)
    expected = _expansions(layer, "numpy")
    monkeypatch.setattr(onednn, "group_affine", lambda groups, size, dtype: ReferenceCode())
    assert all(np.array_equal(a, b) for a, b in zip(_expansions(layer, "onednn"), expected, strict=True))


def _odd_layer(stored: str) -> Linear:
    """A 192 -> 45 layer with a bias, its weight stored as `stored` (a float dtype's name, or q4)."""
    layer = Linear(192, 45)
    layer.weight = mx.random.normal((45, 192), key=mx.random.key(3))
    layer.bias = mx.random.normal((45,), key=mx.random.key(4))
    if stored == "q4":
        layer.quantize(4, 64)
    else:
        layer.weight = layer.weight.astype(getattr(mx, stored))
    return layer


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("stored", ["float32", "bfloat16", "float16", "q4"])
def test_cpu_linear_through_each_gemm_path(path, stored):
    """x @ W^T + bias on odd sizes; bf16 GEMMs equal the float64 product of bf16-rounded x and W."""
    layer = _odd_layer(stored)
    x = mx.random.normal((3, 7, 192), key=mx.random.key(5))
    weight, bias = np.array(layer.dense_weight(mx.float32), np.float64), np.array(layer.bias, np.float64)
    with cpu_plan.use(path):
        got = layer(x)
    if path.endswith("bf16"):
        assert relative_error(got, bf16_rounded(x) @ bf16_rounded(weight).T + bias) < 1e-6
        assert relative_error(got, np.array(x, np.float64) @ weight.T + bias) < 4e-3
    else:
        assert relative_error(got, np.array(x, np.float64) @ weight.T + bias) < 1e-6


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("stored", ["float32", "q4"])
def test_cpu_linear_of_parts_equals_the_linear_of_their_concatenation(path, stored):
    """FLUX's single block hands its last layer [attention, MLP] as parts: each part's GEMM adds
    into the output (beta = 1 after the first), the same bounds as one product."""
    layer = _odd_layer(stored)
    x = mx.random.normal((3, 7, 192), key=mx.random.key(5))
    weight, bias = np.array(layer.dense_weight(mx.float32), np.float64), np.array(layer.bias, np.float64)
    with cpu_plan.use(path):
        got = layer([x[..., :100], x[..., 100:]])
    assert got.shape == (3, 7, 45)
    if path.endswith("bf16"):
        assert relative_error(got, bf16_rounded(x) @ bf16_rounded(weight).T + bias) < 1e-6
    else:
        assert relative_error(got, np.array(x, np.float64) @ weight.T + bias) < 1e-6


FROM_CODES = [p for p in cpu_expansion.quantized_paths() if p != cpu_expansion.EXPANDED]
ROUTES = PATHS + FROM_CODES


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("stored", ["bfloat16", "q4"])
@pytest.mark.parametrize("rows", [cpu_expansion.FEW_ROWS - 1, 37])
@pytest.mark.parametrize("layout", ["broadcast", "transposed"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_linear_takes_inputs_in_any_memory_layout(route, stored, rows, layout, dtype):
    """An input that is a broadcast row (every step's pooled text vector is: the modulations of
    several steps) or a transposed view gives the bits of its contiguous copy on every route (a few
    rows from the codes, 4-bit codes in AMX tiles, each GEMM path), except that a library's fp32 GEMM
    may take a strided operand in another summation order: there within 1e-6 (fp32 sums of 512)."""
    layer = Linear(512, 64)
    layer.weight = mx.random.normal((64, 512), key=mx.random.key(3)).astype(mx.bfloat16)
    layer.bias = mx.random.normal((64,), key=mx.random.key(4))
    if stored == "q4":
        layer.quantize(4, 64)
    if layout == "broadcast":
        x = mx.broadcast_to(mx.random.normal((1, 512), getattr(mx, dtype), key=mx.random.key(5)), (rows, 512))
    else:
        x = mx.random.normal((512, rows), getattr(mx, dtype), key=mx.random.key(5)).T
    strided = as_numpy(x)
    assert not strided.flags.c_contiguous
    contiguous = mx.array(np.ascontiguousarray(strided))
    with cpu_plan.use(route):
        got = np.array(layer(x))
        expected = np.array(layer(contiguous.view(x.dtype)))
    if route.endswith("fp32") and stored == "bfloat16":
        assert relative_error(got, expected) < 1e-6
    else:
        assert np.array_equal(got, expected)


def _gelu64(y: np.ndarray) -> np.ndarray:
    return 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y**3)))


@pytest.mark.parametrize("activation", list(activation_paths()))
@pytest.mark.parametrize("stored", ["float32", "q4"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_cpu_linear_with_its_gelu_in_the_output_pass(activation, stored, with_bias):
    """`Linear.gelu_tanh` (an MLP's first layer) and `split_gelu_tanh` (the single block's projection:
    its first columns as they are, the rest through the GELU) against the float64 formula on the
    layer's float64 product: 1e-5 (the fp32 GEMM's summation order, then a few fp32 roundings)."""
    layer = _odd_layer(stored)
    if not with_bias:
        del layer["bias"]
    x = mx.random.normal((3, 7, 192), key=mx.random.key(5))
    y = np.array(x, np.float64) @ np.array(layer.dense_weight(mx.float32), np.float64).T
    if with_bias:
        y = y + np.array(layer.bias, np.float64)
    with cpu_plan.use(activation):  # its fp32 GEMM with it
        whole = layer.gelu_tanh(x)
        head, tail = layer.split_gelu_tanh(x, 20)
    assert (whole.shape, head.shape, tail.shape) == ((3, 7, 45), (3, 7, 20), (3, 7, 25))
    assert relative_error(whole, _gelu64(y)) < 1e-5
    assert relative_error(head, y[..., :20]) < 1e-5
    assert relative_error(tail, _gelu64(y[..., 20:])) < 1e-5


@pytest.mark.parametrize("activation", list(activation_paths()))
def test_cpu_linear_adds_its_adapter_before_the_gelu(activation):
    """With an adapter, the fused layer equals the unfused one: the GELU of the whole output, the
    adapter's term included (1e-6: the same GEMM, the GELU's fp32 roundings)."""
    layer = _odd_layer("float32")
    down = mx.random.normal((4, 192), key=mx.random.key(11))
    up = mx.random.normal((45, 4), key=mx.random.key(12))
    layer.add_adapter(LowRankAdapter(down, up, 0.5))
    x = mx.random.normal((3, 7, 192), key=mx.random.key(5))
    with cpu_plan.use(activation):
        expected = gelu_tanh(layer(x))
        head, tail = layer.split_gelu_tanh(x, 20)
        assert relative_error(layer.gelu_tanh(x), expected) < 1e-6
    assert relative_error(mx.concatenate([gelu_tanh(head), tail], axis=-1), expected) < 1e-6


@pytest.mark.parametrize("path", PATHS)
def test_an_mlp_hidden_activation_handed_over_in_bf16_changes_no_bit(path):
    """`gelu_tanh(x, into_gemm=True)` and `split_gelu_tanh(..., into_gemm=True)` (FLUX's MLPs): with
    bf16 GEMMs the GELU'd output comes as bf16, the bits the next layer's GEMM rounds it to, so that
    layer's output is bit for bit the same; with fp32 GEMMs nothing changes."""
    up, down = _odd_layer("float32"), Linear(45, 30)
    down.weight = mx.random.normal((30, 45), key=mx.random.key(13))
    x = mx.random.normal((3, 7, 192), key=mx.random.key(5))
    with cpu_plan.use(path):
        hidden = up.gelu_tanh(x, into_gemm=True)
        head, tail = up.split_gelu_tanh(x, 20, into_gemm=True)
        assert hidden.dtype == tail.dtype == (mx.bfloat16 if path.endswith("bf16") else mx.float32)
        assert head.dtype == mx.float32
        expected = down(up.gelu_tanh(x))
        assert np.array_equal(np.array(down(hidden)), np.array(expected))
        assert np.array_equal(
            np.array(tail.astype(mx.float32)), np.array(hidden[..., 20:].astype(mx.float32))
        )
        # a LoRA on the next layer takes the bf16 activation too: its term from the rounded input
        down.add_adapter(
            LowRankAdapter(
                mx.random.normal((4, 45), key=mx.random.key(14)),
                mx.random.normal((30, 4), key=mx.random.key(15)),
                0.5,
            )
        )
        assert relative_error(down(hidden), down(up.gelu_tanh(x))) < (4e-3 if path.endswith("bf16") else 1e-7)


@pytest.mark.parametrize("path", PATHS)
def test_a_modulated_input_handed_over_in_bf16_is_the_rounded_layer_norm(path):
    """FLUX's `modulate` feeds only linear layers: with bf16 GEMMs (and oneDNN's layer norm) it comes
    as bf16, oneDNN writing the nearest bf16 of the fp32 layer norm's values, bit for bit."""
    x = 3 + mx.random.normal((2, 9, 64), key=mx.random.key(16))
    shift, scale = (mx.random.normal((2, 1, 64), key=mx.random.key(k)) for k in (17, 18))
    with cpu_plan.use(path):
        got = modulate(x, shift, scale)
        fp32 = np.array(layer_norm(x, 1e-6, 1 + scale, shift))
        handed_over = path.endswith("bf16") and cpu_plan.active("activation").name == "onednn"
    if handed_over:
        assert got.dtype == mx.bfloat16
        assert np.array_equal(np.array(got.view(mx.uint16)), as_bf16(fp32))
    else:
        assert got.dtype == mx.float32 and np.array_equal(np.array(got), fp32)


def _few_rows_layer(weight) -> tuple[Linear, np.ndarray]:
    """A 512 -> 45 layer with a bias, quantized as `weight` (MLX's bits, fp32 scales: the values
    exact in fp32; or a GGUF type, random blocks), and its weight's values in float64."""
    layer = Linear(512, 45)
    layer.bias = mx.random.normal((45,), key=mx.random.key(4))
    if not isinstance(weight, gguf.GGMLQuantizationType):
        layer.weight = mx.random.normal((45, 512), key=mx.random.key(3))
        layer.quantize(weight, 64)
        return layer, np.array(layer.dense_weight(mx.float32), np.float64)
    blocks = random_blocks(weight, 45 * 512 // block_size(weight)[0]).reshape(45, -1)
    layer.set_gguf(mx.array(blocks), weight)
    return layer, gguf.quants.dequantize(blocks, weight).astype(np.float64)


@pytest.mark.skipif(native.library() is None, reason="no native kernels here")
@pytest.mark.parametrize("weight", [3, 4, 8, *FILE_TYPES], ids=lambda w: getattr(w, "name", f"q{w}"))
@pytest.mark.parametrize("rows", [1, cpu_expansion.FEW_ROWS])
def test_a_product_of_a_few_rows_comes_from_the_codes(monkeypatch, weight, rows):
    """A modulation's product (at most FEW_ROWS rows) with a quantized weight is computed from its
    codes, no weight expanded, in fp32 whatever the plan's GEMM: within the fp32 summation bound of
    the float64 product of the weight's values (gamma_n sum |x w|: 16 running sums of cols / 16
    products each, the tail, the 16 sums and the bias, which the sum starts from); x in parts gives the same bits, and so do
    the first columns of a GELU split. One row more takes the GEMM of the expanded weight. The record
    of a quantized model says so."""
    layer, dense = _few_rows_layer(weight)
    x = mx.random.normal((rows, 512), key=mx.random.key(5))
    expected = np.array(x, np.float64) @ dense.T + np.array(layer.bias, np.float64)
    terms = 512 // 16 + 18
    magnitude = np.abs(np.array(x, np.float64)) @ np.abs(dense).T + np.abs(np.array(layer.bias, np.float64))
    monkeypatch.setattr(cpu_linear, "expanded_weight", lambda *a: pytest.fail("the weight was expanded"))
    got = np.array(layer(x))
    assert np.all(np.abs(got - expected) <= terms * 2.0**-24 / (1 - terms * 2.0**-24) * magnitude)
    assert np.array_equal(np.array(layer([x[:, :100], x[:, 100:]])), got)
    head, tail = layer.split_gelu_tanh(x, 20)
    assert np.array_equal(np.array(head), got[:, :20])
    line = (
        f"; products of up to {cpu_expansion.FEW_ROWS} rows (the modulations) fp32 from the codes through C"
    )
    assert line in cpu_plan.describe(quantized=True) and line not in cpu_plan.describe()
    assert relative_error(tail, _gelu64(expected[:, 20:])) < 1e-5
    monkeypatch.undo()
    calls = []
    monkeypatch.setattr(cpu_linear, "expanded_weight", lambda *a: calls.append(a) or expanded_weight(*a))
    layer(mx.random.normal((cpu_expansion.FEW_ROWS + 1, 512), key=mx.random.key(6)))
    assert len(calls) == 1


@pytest.mark.parametrize("own", [name for name in gemm_module.NATIVE_KERNELS if name in available_paths()])
def test_bf16_layers_in_the_own_gemm_take_x_packed_once(monkeypatch, own):
    """Where the plan's GEMM is flux1's own (in AMX tiles or AVX512-BF16 vectors), a layer of bf16
    weights multiplies them as stored, x packed once for every part of the output (fp32 x rounded as
    it is packed) and the sums started from the bias: the same bits as the GEMM called part by part
    on x rounded first (a pass of its own) into an output holding the bias."""
    cols, outputs = 13 * 256, 96
    layer = Linear(cols, outputs)
    layer.weight = (mx.random.normal((outputs, cols), key=mx.random.key(1)) * 0.05).astype(mx.bfloat16)
    layer.bias = mx.random.normal((outputs,), key=mx.random.key(2))
    x = mx.random.normal((37, cols), key=mx.random.key(3))
    packings = []
    pack = native.pack_tile_rows
    monkeypatch.setattr(
        native, "pack_tile_rows", lambda parts, rows: packings.append(parts) or pack(parts, rows)
    )
    with cpu_plan.use(own):
        got = np.array(layer(x))
        head, _ = layer.split_gelu_tanh(x, 64)
        assert len(packings) == 2 and all(fp32 for _, _, _, fp32 in packings[0])  # once a call
        monkeypatch.setattr(cpu_linear, "fits_tiles", lambda *a: False)
        assert np.array_equal(np.array(layer(x)), got)
        assert len(packings) == 3 and not packings[2][0][3]  # the GEMM's call: x rounded first
    assert np.array_equal(np.array(head), got[:, :64])


@pytest.mark.parametrize("codes", FROM_CODES)
@pytest.mark.parametrize(
    ("group", "dtype"),
    [
        (32, mx.float32),
        (64, mx.float32),
        (64, mx.bfloat16),
        (128, mx.bfloat16),
        (gguf.GGMLQuantizationType.Q4_K, None),
    ],
    ids=[
        "group 32, fp32 scales",
        "group 64, fp32 scales",
        "group 64, bf16 scales",
        "group 128, bf16 scales",
        "Q4_K",
    ],
)
@pytest.mark.parametrize("rows", [cpu_expansion.FEW_ROWS + 1, 37, 64])
@pytest.mark.parametrize("with_bias", [True, False])
def test_4bit_layers_multiply_from_their_codes(monkeypatch, codes, group, dtype, rows, with_bias):
    """With bf16 GEMMs, a layer of 4-bit codes (MLX's in groups of 32, 64 or 128, with fp32 or bf16
    scales, the kernel reading either as stored; GGUF Q4_K) is
    multiplied from its codes in AMX tiles or AVX512-BF16 vectors, its weight never expanded: within the fp32 summation
    bound of the float64 product of x and W rounded to bf16 (the weight's bf16 values as expanded for
    a GEMM), gamma_n sum |x w| + |bias| with n = cols + 1 (one running sum of the products, the bias
    it starts from), for more columns than the kernel takes at once (3072: the sums kept in y
    between them) and rows past the last whole 32. x in parts and the head of a GELU split give the
    same bits. A layer whose output is no multiple of 32 wide is expanded for the GEMM. The record
    of a quantized model says so."""
    cols, outputs = 13 * 256, 96

    def quantized(outputs: int) -> Linear:
        layer = Linear(cols, outputs, bias=with_bias)
        layer.weight = mx.random.normal((outputs, cols), key=mx.random.key(1)) * 0.05
        if with_bias:
            layer.bias = mx.random.normal((outputs,), key=mx.random.key(2))
        if not isinstance(group, gguf.GGMLQuantizationType):
            layer.weight = layer.weight.astype(dtype)
            assert layer.quantize(4, group) and layer.scales.dtype == dtype
        else:
            blocks = random_blocks(group, outputs * cols // block_size(group)[0]).reshape(outputs, -1)
            layer.set_gguf(mx.array(blocks), group)
        return layer

    layer = quantized(outputs)
    with cpu_expansion.scratch_lock:
        weight = bf16_widened(expanded_weight(layer, "bf16", "native")).astype(np.float64)
    x = mx.random.normal((rows, cols), key=mx.random.key(3))
    rounded = bf16_widened(as_bf16(np.array(x))).astype(np.float64)
    bias = np.array(layer.bias, np.float64) if with_bias else np.zeros(outputs)
    expected = rounded @ weight.T + bias
    terms = cols + 1
    bound = terms * 2.0**-24 / (1 - terms * 2.0**-24) * (np.abs(rounded) @ np.abs(weight).T + np.abs(bias))
    with cpu_plan.use(codes):
        monkeypatch.setattr(cpu_linear, "expanded_weight", lambda *a: pytest.fail("the weight was expanded"))
        got = np.array(layer(x))
        assert np.all(np.abs(got - expected) <= bound)
        assert np.array_equal(np.array(layer([x[:, :1024], x[:, 1024:]])), got)
        head, _ = layer.split_gelu_tanh(x, 64)
        assert np.array_equal(np.array(head), got[:, :64])
        line = f"; 4-bit weights multiplied from their {codes.removeprefix('4-bit ')} through C compiled by "
        assert line in cpu_plan.describe(quantized=True)
        monkeypatch.undo()
        calls = []
        monkeypatch.setattr(cpu_linear, "expanded_weight", lambda *a: calls.append(a) or expanded_weight(*a))
        quantized(80)(x)
        assert len(calls) == 1


def test_numpy_fp32_linear_is_the_old_computation_bit_for_bit():
    layer = Linear(160, 72)
    layer.weight = mx.random.normal((72, 160), key=mx.random.key(6)).astype(mx.bfloat16)
    layer.bias = mx.random.normal((72,), key=mx.random.key(7))
    x = mx.random.normal((2, 9, 160), key=mx.random.key(8))
    expected = np.array(x).reshape(-1, 160) @ np.array(layer.weight.astype(mx.float32)).T + np.array(
        layer.bias
    )
    with cpu_plan.use("numpy fp32"):
        assert np.array_equal(np.array(layer(x)).reshape(-1, 72), expected)


@pytest.mark.parametrize("kernel", ["numpy", "native"])
def test_cpu_linear_expands_bf16_exactly_and_multiplies(kernel):
    """bf16 weights widened to fp32 exactly, by NumPy's shift or the native kernel (past the cache
    into the scratch buffer), an odd number of columns among them, the weight columns of a wider
    one (as tensor parallel cuts it)."""
    layer = Linear(131, 40)
    layer.weight = mx.random.normal((40, 140), key=mx.random.key(7)).astype(mx.bfloat16)[:, 3:134]
    assert not as_numpy(layer.weight).flags.c_contiguous
    layer.bias = mx.random.normal((40,), key=mx.random.key(8)).astype(mx.bfloat16)
    with cpu_expansion.scratch_lock:
        assert np.array_equal(
            expanded_weight(layer, "fp32", kernel), np.array(layer.weight.astype(mx.float32))
        )
    x = mx.random.normal((3, 5, 131), key=mx.random.key(9))
    expected = x @ layer.weight.astype(mx.float32).T + layer.bias.astype(mx.float32)
    assert relative_error(layer(x), expected) < 1e-6


@pytest.mark.parametrize("path", [p for p in PATHS if p.endswith("fp32")])
@pytest.mark.parametrize("stored", ["float32", "bfloat16", "q4"])
def test_training_on_cpu_gemms_differentiates_like_mlx(path, stored, monkeypatch):
    """In training, a frozen layer's product and its input's gradient through each fp32 GEMM equal
    MLX's own (`backend.training(cpu_kernels=True)` with and without FLUX1_COMPUTE=mlx); the adapter's gradients too."""
    layer = _odd_layer(stored)
    down, up = (mx.random.normal(s, key=mx.random.key(i)) for i, s in enumerate([(4, 192), (45, 4)]))
    layer.add_adapter(LowRankAdapter(down, up, 0.5))
    x = mx.random.normal((3, 7, 192), key=mx.random.key(5))
    cotangent = mx.random.normal((3, 7, 45), key=mx.random.key(6))

    def objective(x, down, up):
        layer.adapters[0].down, layer.adapters[0].up = down, up
        return (layer(x) * cotangent).sum()

    results = {}
    for compute in ("auto", "mlx"):
        monkeypatch.setenv("FLUX1_COMPUTE", compute)
        with backend.training(cpu_kernels=True), cpu_plan.use(path):
            assert backend.cpu_kernels_in_training() == (compute == "auto")
            results[compute] = mx.value_and_grad(objective, argnums=(0, 1, 2))(x, down, up)
    (value, grads), (expected_value, expected_grads) = results["auto"], results["mlx"]
    assert relative_error(value, expected_value) < 1e-5
    for got, expected in zip(grads, expected_grads):
        assert relative_error(got, expected) < 1e-5


@pytest.mark.parametrize("path", [p for p in PATHS if p.endswith("fp32")])
@pytest.mark.parametrize("with_mask", [False, True])
def test_training_attention_on_cpu_differentiates_like_mlx(path, with_mask, monkeypatch):
    """In training, the CPU attention's output and its gradients for q, k and v equal MLX's."""
    q, k, v = (mx.random.normal((2, 3, 37, 16), key=mx.random.key(i)) for i in range(3))
    mask = mx.where(mx.random.uniform(shape=(37, 37), key=mx.random.key(3)) < 0.3, -1e9, 0.0)
    cotangent = mx.random.normal(q.shape, key=mx.random.key(4))

    def objective(q, k, v):
        return (attention(q, k, v, 0.3, mask if with_mask else None) * cotangent).sum()

    results = {}
    for compute in ("auto", "mlx"):
        monkeypatch.setenv("FLUX1_COMPUTE", compute)
        with backend.training(cpu_kernels=True), cpu_plan.use(path):
            results[compute] = mx.value_and_grad(objective, argnums=(0, 1, 2))(q, k, v)
    (value, grads), (expected_value, expected_grads) = results["auto"], results["mlx"]
    assert relative_error(value, expected_value) < 1e-5
    for got, expected in zip(grads, expected_grads):
        assert relative_error(got, expected) < 1e-5


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
@pytest.mark.parametrize("rows", [1280, 23040])
def test_a_freed_activation_comes_back_without_page_faults(rows):
    """In a fresh process with the CPU kernels loaded, an activation freed and allocated again reuses
    its pages: under 1,000 minor page faults. 63 MB (15,328 faults while glibc handed the heap's top
    back to the kernel at every free, `numpy_cpu._serve_large_blocks_from_the_heap`) and 1.1 GB, the
    size of a 1024x1024 decode's upsampling phases (over 250,000 while only 1 GiB was kept)."""
    script = (
        "import resource, flux1.nn.numpy_cpu, mlx.core as mx\n"
        f"mx.eval(mx.zeros(({rows}, 12288)))\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        f"mx.eval(mx.zeros(({rows}, 12288)))\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )
    faults = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert int(faults.stdout) < 1000, faults.stdout
