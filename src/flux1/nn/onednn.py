"""oneDNN's primitives through its C API: what torch's CPU convolutions and activations run.

A primitive is made once per shape (cached): oneDNN compiles its kernel for this CPU (AVX2, AVX-512,
AVX512-BF16, AMX). The convolution also picks the weights' blocked layout that kernel reads; each
call reorders the kernel into that layout (milliseconds) and runs the convolution straight on the
NHWC image, with the padding, stride and bias inside the kernel. The elementwise primitives (softmax,
GELU, bias + GELU, scale-shift-SiLU, layer norm, rounding to bf16, the affine expansion of quantized
weights) are one pass over memory each, the whole chain of operations fused into one compiled loop on
all cores, where NumPy runs a pass per operation (and, on AVX2, exp and tanh unvectorized) and MLX a
pass per operation on one core; the plan measures oneDNN against NumPy (`nn/cpu_activations.py`).
Buffers are NumPy arrays used in place.
"""

import ctypes
import functools

import numpy as np

from flux1 import _blas

_V = ctypes.c_void_p
_Dims = ctypes.c_int64 * 12  # DNNL_MAX_NDIMS
_DTYPES = {"bf16": 2, "fp32": 3}  # dnnl_data_type_t
_UNDEFINED_TYPE = 0  # dnnl_data_type_undef: a sum post-op in the destination's dtype
_FORMAT_ANY = 1  # dnnl_format_tag_any: the primitive chooses the layout
_FORWARD_INFERENCE, _CONVOLUTION_DIRECT = 96, 1
_QUERY_IMPLEMENTATION, _QUERY_WEIGHTS = 8, 131  # dnnl_query_impl_info_str, dnnl_query_weights_md
_SRC, _SRC_1, _DST, _WEIGHTS, _BIAS, _SCALE, _SHIFT = 1, 2, 17, 33, 41, 51, 52  # DNNL_ARG_*
_POST_OP_BASE = 32768  # DNNL_ARG_ATTR_MULTIPLE_POST_OP_BASE
# dnnl_alg_kind_t
_LINEAR, _LOGISTIC, _EXP, _GELU_TANH, _SWISH, _SOFTMAX = 0x26, 0x29, 0x2A, 0x2B, 0x2C, 0x30000
_ADD, _MUL = 0x1FFF0, 0x1FFF1
_USE_SCALE, _USE_SHIFT = 0x2, 0x4  # dnnl_normalization_flags_t
_SQRT_2_OVER_PI = 0.7978845608028654


class _Arg(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_int), ("memory", _V)]


def _check(status: int, what: str) -> None:
    if status:
        raise RuntimeError(f"oneDNN: {what} failed with status {status}")


@functools.cache
def _runtime():
    """(library, CPU engine, stream), or None where oneDNN is not installed."""
    lib = _blas.onednn()
    if lib is None:
        return None
    lib.dnnl_primitive_desc_query_md.restype = _V
    lib.dnnl_memory_desc_get_size.restype = ctypes.c_size_t
    engine, stream = _V(), _V()
    _check(lib.dnnl_engine_create(ctypes.byref(engine), 1, 0), "creating the CPU engine")
    _check(lib.dnnl_stream_create(ctypes.byref(stream), engine, 1), "creating a stream")
    return lib, engine, stream


def available() -> bool:
    return _runtime() is not None


@functools.cache
def version() -> str:
    """ "oneDNN <major>.<minor>.<patch>" of the library loaded (`available()` must be true)."""
    lib = _blas.onednn()
    lib.dnnl_version.restype = ctypes.POINTER(ctypes.c_int * 3)
    major, minor, patch = lib.dnnl_version().contents
    return f"oneDNN {major}.{minor}.{patch}"


def _memory_desc(dims: tuple, strides: tuple | None, dtype: str) -> _V:
    """A plain layout given by element strides, or (strides None) any layout the primitive likes."""
    lib, desc = _runtime()[0], _V()
    if strides is None:
        status = lib.dnnl_memory_desc_create_with_tag(
            ctypes.byref(desc), len(dims), _Dims(*dims), _DTYPES[dtype], _FORMAT_ANY
        )
    else:
        status = lib.dnnl_memory_desc_create_with_strides(
            ctypes.byref(desc), len(dims), _Dims(*dims), _DTYPES[dtype], _Dims(*strides)
        )
    _check(status, f"describing a {dtype} tensor of shape {dims}")
    return desc


def _nhwc(batch: int, height: int, width: int, channels: int, dtype: str) -> _V:
    """An NHWC buffer, described in oneDNN's logical NCHW order."""
    strides = (height * width * channels, 1, width * channels, channels)
    return _memory_desc((batch, channels, height, width), strides, dtype)


def _dense(shape: tuple, dtype: str = "fp32") -> _V:
    """A C-contiguous tensor of `shape`."""
    strides = [1] * len(shape)
    for axis in range(len(shape) - 2, -1, -1):
        strides[axis] = strides[axis + 1] * shape[axis + 1]
    return _memory_desc(shape, tuple(strides), dtype)


def _post_op(index: int) -> int:
    """The argument of the second operand of binary post-op `index` (DNNL_ARG_ATTR_MULTIPLE_POST_OP)."""
    return _POST_OP_BASE * (index + 1) | _SRC_1


def _primitive(desc: _V) -> _V:
    primitive = _V()
    _check(_runtime()[0].dnnl_primitive_create(ctypes.byref(primitive), desc), "creating a primitive")
    return primitive


def _execute(primitive: _V, arguments: dict[int, tuple[_V, np.ndarray | int]]) -> None:
    """Runs `primitive` on NumPy buffers (or their addresses): {DNNL_ARG_*: (memory descriptor,
    buffer)}."""
    lib, engine, stream = _runtime()
    memories = []
    try:
        for desc, buffer in arguments.values():
            memory = _V()
            address = buffer if isinstance(buffer, int) else buffer.ctypes.data
            _check(lib.dnnl_memory_create(ctypes.byref(memory), desc, engine, _V(address)), "memory")
            memories.append(memory)
        args = (_Arg * len(memories))(*(_Arg(a, m) for a, m in zip(arguments, memories, strict=True)))
        _check(lib.dnnl_primitive_execute(primitive, stream, len(memories), args), "executing a primitive")
        _check(lib.dnnl_stream_wait(stream), "waiting for a primitive")
    finally:
        for memory in memories:
            lib.dnnl_memory_destroy(memory)


class _Handles:
    """oneDNN handles owned by an object and destroyed with it (at exit the module's globals may be
    gone first, so the destructors are kept here)."""

    def __init__(self):
        lib = _runtime()[0]
        self._owned = []
        self._destroy = {"md": lib.dnnl_memory_desc_destroy, "pd": lib.dnnl_primitive_desc_destroy}
        self._destroy["primitive"] = lib.dnnl_primitive_destroy
        self._destroy["attr"] = lib.dnnl_primitive_attr_destroy
        self._destroy["post-ops"] = lib.dnnl_post_ops_destroy

    def _attributes(self, post_ops: list[tuple], operand: _V | None = None) -> _V:
        """Primitive attributes holding a chain of post-ops: ("eltwise", algorithm, alpha, beta),
        ("binary", algorithm) taking an operand described by `operand`, or ("sum",) adding the
        destination's previous values."""
        lib = _runtime()[0]
        chain, attributes = self._own("post-ops", _V()), self._own("attr", _V())
        _check(lib.dnnl_post_ops_create(ctypes.byref(chain)), "creating post-ops")
        for op in post_ops:
            if op[0] == "eltwise":
                status = lib.dnnl_post_ops_append_eltwise(
                    chain, op[1], ctypes.c_float(op[2]), ctypes.c_float(op[3])
                )
            elif op[0] == "sum":
                status = lib.dnnl_post_ops_append_sum(chain, ctypes.c_float(1.0), 0, _UNDEFINED_TYPE)
            else:
                status = lib.dnnl_post_ops_append_binary(chain, op[1], operand)
            _check(status, f"appending the post-op {op}")
        _check(lib.dnnl_primitive_attr_create(ctypes.byref(attributes)), "creating attributes")
        _check(lib.dnnl_primitive_attr_set_post_ops(attributes, chain), "setting post-ops")
        return attributes

    def _own(self, kind: str, handle: _V) -> _V:
        self._owned.append((kind, handle))
        return handle

    def __del__(self):
        for kind, handle in reversed(self._owned):
            if handle:
                self._destroy[kind](handle)

    def _compiled(self, desc: _V) -> _V:
        """The primitive of a primitive descriptor this object owns; notes oneDNN's implementation."""
        implementation = ctypes.c_char_p()
        _runtime()[0].dnnl_primitive_desc_query(desc, _QUERY_IMPLEMENTATION, 0, ctypes.byref(implementation))
        self.implementation = implementation.value.decode()  # e.g. "brgconv:avx2", "jit:avx2"
        return self._own("primitive", _primitive(desc))


class Convolution(_Handles):
    """y = conv(x, kernel) + bias for one shape: x [batch, height, width, in] NHWC, kernel [out, kh,
    kw, in] (as the VAE holds it), bias and y fp32; x and kernel in `dtype` (fp32, or bf16 bits as
    uint16: bf16 inputs, fp32 sums)."""

    def __init__(self, x_shape: tuple, kernel_shape: tuple, stride: int, padding: int, dtype: str):
        super().__init__()
        lib, engine, _ = _runtime()
        batch, height, width, in_channels = x_shape
        out_channels, kh, kw, _ = kernel_shape
        self.out_shape = (
            batch,
            (height + 2 * padding - kh) // stride + 1,
            (width + 2 * padding - kw) // stride + 1,
            out_channels,
        )
        self.image = self._own("md", _nhwc(*x_shape, dtype))
        self.output = self._own("md", _nhwc(*self.out_shape, "fp32"))
        self.bias = self._own("md", _memory_desc((out_channels,), (1,), "fp32"))
        kernel_dims = (out_channels, in_channels, kh, kw)
        kernel_strides = (kh * kw * in_channels, 1, kw * in_channels, in_channels)
        self.kernel = self._own("md", _memory_desc(kernel_dims, kernel_strides, dtype))
        any_kernel = self._own("md", _memory_desc(kernel_dims, None, dtype))
        desc = self._own("pd", _V())
        _check(
            lib.dnnl_convolution_forward_primitive_desc_create(
                ctypes.byref(desc),
                engine,
                _FORWARD_INFERENCE,
                _CONVOLUTION_DIRECT,
                self.image,
                any_kernel,
                self.bias,
                self.output,
                _Dims(stride, stride),
                _Dims(0, 0),  # dilation
                _Dims(padding, padding),
                _Dims(padding, padding),
                None,
            ),
            f"choosing a {dtype} convolution {x_shape} * {kernel_shape}",
        )
        self.blocked_kernel = _V(lib.dnnl_primitive_desc_query_md(desc, _QUERY_WEIGHTS, 0))  # desc's
        self.blocked_size = lib.dnnl_memory_desc_get_size(self.blocked_kernel)
        self.convolve = self._compiled(desc)
        reorder = self._own("pd", _V())
        _check(
            lib.dnnl_reorder_primitive_desc_create(
                ctypes.byref(reorder), self.kernel, engine, self.blocked_kernel, engine, None
            ),
            "choosing the kernel's reorder",
        )
        self.reorder = self._own("primitive", _primitive(reorder))

    def __call__(self, x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, out: np.ndarray) -> np.ndarray:
        blocked = np.empty(self.blocked_size, np.uint8)
        kernel = np.ascontiguousarray(kernel)
        _execute(self.reorder, {_SRC: (self.kernel, kernel), _DST: (self.blocked_kernel, blocked)})
        arguments = {
            _SRC: (self.image, np.ascontiguousarray(x)),
            _WEIGHTS: (self.blocked_kernel, blocked),
            _BIAS: (self.bias, np.ascontiguousarray(bias, np.float32)),
            _DST: (self.output, out),
        }
        _execute(self.convolve, arguments)
        return out


@functools.lru_cache(maxsize=64)
def convolution(x_shape: tuple, kernel_shape: tuple, stride: int, padding: int, dtype: str) -> Convolution:
    return Convolution(x_shape, kernel_shape, stride, padding, dtype)


class _Fused(_Handles):
    """The binary primitive x * y (or x + y; y broadcast to x's shape where its sizes are 1) with a
    chain of post-ops fused in; `self.primitive` once built."""

    def _build(self, x: _V, y: _V, post_ops: list[tuple], what: str, algorithm: int = _MUL) -> None:
        """post_ops: ("eltwise", algorithm, alpha, beta) or ("binary", algorithm), each binary one
        taking an operand described by y."""
        lib, engine, _ = _runtime()
        attributes = self._attributes(post_ops, y)
        desc = self._own("pd", _V())
        _check(
            lib.dnnl_binary_primitive_desc_create(ctypes.byref(desc), engine, algorithm, x, y, x, attributes),
            f"choosing {what}",
        )
        self.primitive = self._compiled(desc)


class _MatmulPrimitive(_Handles):
    """The matmul primitive (oneDNN's brgemm kernels, AMX tiles where the CPU has them) of a [m, k] @
    b [k, n] in `dtype`, laid out by element strides (a transposed row-major matrix is strides (1,
    leading dimension)), into the destination `dst` describes, with a chain of post-ops."""

    def _build(self, m, n, k, a_strides, b_strides, dtype: str, dst: _V, post_ops: list, operand=None):
        lib, engine, _ = _runtime()
        self.a = self._own("md", _memory_desc((m, k), a_strides, dtype))
        self.b = self._own("md", _memory_desc((k, n), b_strides, dtype))
        self.c = self._own("md", dst)
        desc = self._own("pd", _V())
        attributes = self._attributes(post_ops, operand)
        _check(
            lib.dnnl_matmul_primitive_desc_create(
                ctypes.byref(desc), engine, self.a, self.b, None, self.c, attributes
            ),
            f"choosing a {dtype} matmul {m}x{k} @ {k}x{n}",
        )
        self.primitive = self._compiled(desc)


class Matmul(_MatmulPrimitive):
    """c [m, n] (fp32, rows ldc apart) = alpha a [m, k] @ b [k, n], plus c's previous values if
    `accumulate`; a and b in `dtype` (fp32, or bf16 bits as uint16)."""

    def __init__(self, m, n, k, a_strides, b_strides, ldc, alpha: float, accumulate: bool, dtype: str):
        super().__init__()
        post_ops = [("eltwise", _LINEAR, alpha, 0.0)] if alpha != 1.0 else []  # alpha * a @ b
        if accumulate:
            post_ops.append(("sum",))  # then + c
        self._build(m, n, k, a_strides, b_strides, dtype, _memory_desc((m, n), (ldc, 1), "fp32"), post_ops)

    def __call__(self, a: int, b: int, c: int) -> None:
        """a, b, c: the buffers' addresses."""
        _execute(self.primitive, {_SRC: (self.a, a), _WEIGHTS: (self.b, b), _DST: (self.c, c)})


@functools.lru_cache(maxsize=256)
def matmul(m, n, k, a_strides, b_strides, ldc, alpha: float, accumulate: bool, dtype: str) -> Matmul:
    return Matmul(m, n, k, a_strides, b_strides, ldc, alpha, accumulate, dtype)


class ShiftedExpMatmul(_MatmulPrimitive):
    """e [m, n] (bf16 bits, C-contiguous) = exp(alpha a @ b + shift) for bf16 a [m, k] and b [k, n]
    laid out by element strides and one fp32 shift given at each call: the shift and the exponential
    as post-ops on the fp32 sums, rounded to bf16 as they are written (a per-row shift would make
    oneDNN 3.2 fall back to its reference kernel; a scalar keeps brgemm)."""

    def __init__(self, m, n, k, a_strides, b_strides, alpha: float):
        super().__init__()
        self.shift = self._own("md", _dense((1, 1)))
        post_ops = [("eltwise", _LINEAR, alpha, 0.0), ("binary", _ADD), ("eltwise", _EXP, 0.0, 0.0)]
        self._build(m, n, k, a_strides, b_strides, "bf16", _dense((m, n), "bf16"), post_ops, self.shift)

    def __call__(self, a: np.ndarray, b: np.ndarray, shift: float, e: np.ndarray) -> np.ndarray:
        arguments = {_SRC: (self.a, a), _WEIGHTS: (self.b, b), _DST: (self.c, e)}
        arguments[_post_op(1)] = (self.shift, np.array([[shift]], np.float32))
        _execute(self.primitive, arguments)
        return e


@functools.lru_cache(maxsize=256)
def shifted_exp_matmul(m, n, k, a_strides, b_strides, alpha: float) -> ShiftedExpMatmul:
    return ShiftedExpMatmul(m, n, k, a_strides, b_strides, alpha)


class Softmax(_Handles):
    """out = the softmax of each row of x [rows, cols], all fp32; out may be x."""

    def __init__(self, shape: tuple):
        super().__init__()
        lib, engine, _ = _runtime()
        self.rows = self._own("md", _dense(shape))
        desc = self._own("pd", _V())
        _check(
            lib.dnnl_softmax_forward_primitive_desc_create(
                ctypes.byref(desc),
                engine,
                _FORWARD_INFERENCE,
                _SOFTMAX,
                self.rows,
                self.rows,
                len(shape) - 1,
                None,
            ),
            f"choosing a softmax over {shape}",
        )
        self.primitive = self._compiled(desc)

    def __call__(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        _execute(self.primitive, {_SRC: (self.rows, x), _DST: (self.rows, out)})
        return out


class GeluTanh(_Fused):
    """out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) over x of `size` fp32 values, computed as
    x * sigmoid(2 sqrt(2/pi) x (1 + 0.044715 x^2)): the binary primitive x * x, then post-ops (a sigmoid
    rather than oneDNN's own gelu_tanh, whose tanh kernel was the slower on AVX2 when written)."""

    def __init__(self, size: int):
        super().__init__()
        self.values = self._own("md", _dense((size,)))
        twice = 2.0 * _SQRT_2_OVER_PI
        post_ops = [
            ("eltwise", _LINEAR, twice * 0.044715, twice),
            ("binary", _MUL),
            ("eltwise", _LOGISTIC, 0.0, 0.0),
            ("binary", _MUL),
        ]
        self._build(self.values, self.values, post_ops, f"a GELU over {size} values")

    def __call__(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """x and out: C-contiguous fp32, not overlapping."""
        arguments = {_SRC: (self.values, x), _SRC_1: (self.values, x), _DST: (self.values, out)}
        arguments[_post_op(1)] = arguments[_post_op(3)] = (self.values, x)
        _execute(self.primitive, arguments)
        return out


class BiasGeluTanh(_Fused):
    """y = gelu_tanh(y + bias) in place over y [rows, cols] (fp32, C-contiguous), bias [cols]: the
    binary primitive y + bias with oneDNN's GELU as its post-op, where a linear layer's output is
    written (one pass over it instead of the bias pass, the GELU's pass and the GELU's copy)."""

    def __init__(self, rows: int, cols: int):
        super().__init__()
        self.values, self.per_column = (
            self._own("md", _dense((rows, cols))),
            self._own("md", _dense((1, cols))),
        )
        post_ops = [("eltwise", _GELU_TANH, 0.0, 0.0)]
        self._build(self.values, self.per_column, post_ops, f"a bias + GELU over {rows} x {cols}", _ADD)

    def __call__(self, y: np.ndarray, bias: np.ndarray) -> np.ndarray:
        arguments = {_SRC: (self.values, y), _SRC_1: (self.per_column, bias), _DST: (self.values, y)}
        _execute(self.primitive, arguments)
        return y


class ScaleShiftSilu(_Fused):
    """out = silu(x * a + b) over x [pixels, channels] (fp32, C-contiguous) with a and b [channels]:
    the binary primitive x * a, then + b and SiLU as post-ops. oneDNN's compiled kernels broadcast a
    per-channel operand along its logical axis 1, so x is described as [1, channels, pixels] with the
    channels innermost."""

    def __init__(self, pixels: int, channels: int):
        super().__init__()
        image = _memory_desc((1, channels, pixels), (pixels * channels, 1, channels), "fp32")
        self.image, self.per_channel = self._own("md", image), self._own("md", _dense((1, channels, 1)))
        post_ops = [("binary", _ADD), ("eltwise", _SWISH, 1.0, 0.0)]
        self._build(self.image, self.per_channel, post_ops, f"a scale-shift-SiLU over {pixels} x {channels}")

    def __call__(self, x: np.ndarray, a: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
        arguments = {_SRC: (self.image, x), _SRC_1: (self.per_channel, a), _DST: (self.image, out)}
        arguments[_post_op(0)] = (self.per_channel, b)
        _execute(self.primitive, arguments)
        return out


class GroupAffine(_Fused):
    """x = x * scale + shift in place, per group: x [groups, size] (bf16 bits as uint16, or fp32;
    C-contiguous), scale and shift [groups] fp32, computed in fp32 and rounded once to x's dtype.
    Described as [1, groups, size]: oneDNN's compiled kernels broadcast an operand along axis 1."""

    def __init__(self, groups: int, size: int, dtype: str):
        super().__init__()
        self.values = self._own("md", _dense((1, groups, size), dtype))
        self.per_group = self._own("md", _dense((1, groups, 1)))
        self._build(self.values, self.per_group, [("binary", _ADD)], f"a {dtype} affine of {groups} x {size}")

    def __call__(self, x: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
        arguments = {_SRC: (self.values, x), _SRC_1: (self.per_group, scale), _DST: (self.values, x)}
        arguments[_post_op(0)] = (self.per_group, shift)
        _execute(self.primitive, arguments)
        return x


class LayerNorm(_Handles):
    """out = (x - mean) / sqrt(variance + eps) * scale + shift over each row of x [rows, cols], the
    statistics of each row, scale and shift [cols]; fp32, out in `dtype` (fp32, or bf16 bits rounded
    to nearest), C-contiguous; out may be x if fp32."""

    def __init__(self, rows: int, cols: int, eps: float, dtype: str = "fp32"):
        super().__init__()
        lib, engine, _ = _runtime()
        self.rows, self.per_column = self._own("md", _dense((rows, cols))), self._own("md", _dense((cols,)))
        self.out = self._own("md", _dense((rows, cols), dtype))
        statistics = self._own("md", _dense((rows,)))
        desc = self._own("pd", _V())
        _check(
            lib.dnnl_layer_normalization_forward_primitive_desc_create(
                ctypes.byref(desc),
                engine,
                _FORWARD_INFERENCE,
                self.rows,
                self.out,
                statistics,
                ctypes.c_float(eps),
                _USE_SCALE | _USE_SHIFT,
                None,
            ),
            f"choosing a layer norm over {rows} x {cols}",
        )
        self.primitive = self._compiled(desc)

    def __call__(self, x: np.ndarray, scale: np.ndarray, shift: np.ndarray, out: np.ndarray) -> np.ndarray:
        arguments = {_SRC: (self.rows, x), _DST: (self.out, out)}
        arguments[_SCALE], arguments[_SHIFT] = (self.per_column, scale), (self.per_column, shift)
        _execute(self.primitive, arguments)
        return out


class RoundToBf16(_Handles):
    """out (bf16 bits) = x (fp32) rounded to the nearest bf16, ties to even (the reorder primitive;
    the same bits as `numpy_cpu.round_to_bf16`); both C-contiguous of `shape`."""

    def __init__(self, shape: tuple):
        super().__init__()
        lib, engine, _ = _runtime()
        self.source, self.target = self._own("md", _dense(shape)), self._own("md", _dense(shape, "bf16"))
        desc = self._own("pd", _V())
        _check(
            lib.dnnl_reorder_primitive_desc_create(
                ctypes.byref(desc), self.source, engine, self.target, engine, None
            ),
            f"choosing a rounding of {shape} to bf16",
        )
        self.primitive = self._compiled(desc)

    def __call__(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        _execute(self.primitive, {_SRC: (self.source, x), _DST: (self.target, out)})
        return out


@functools.lru_cache(maxsize=64)
def round_to_bf16(shape: tuple) -> RoundToBf16:
    return RoundToBf16(shape)


@functools.lru_cache(maxsize=64)
def softmax(shape: tuple) -> Softmax:
    return Softmax(shape)


@functools.lru_cache(maxsize=64)
def gelu_tanh(size: int) -> GeluTanh:
    return GeluTanh(size)


@functools.lru_cache(maxsize=64)
def bias_gelu_tanh(rows: int, cols: int) -> BiasGeluTanh:
    return BiasGeluTanh(rows, cols)


@functools.lru_cache(maxsize=64)
def group_affine(groups: int, size: int, dtype: str) -> GroupAffine:
    return GroupAffine(groups, size, dtype)


@functools.lru_cache(maxsize=64)
def layer_norm(rows: int, cols: int, eps: float, dtype: str = "fp32") -> LayerNorm:
    return LayerNorm(rows, cols, eps, dtype)


@functools.lru_cache(maxsize=64)
def scale_shift_silu(pixels: int, channels: int) -> ScaleShiftSilu:
    return ScaleShiftSilu(pixels, channels)
