"""oneDNN's convolution primitive through its C API: what torch's CPU convolutions run.

A primitive is made once per shape (cached): oneDNN picks its kernel for this CPU (AVX2, AVX-512,
AVX512-BF16, AMX) and the weights' blocked layout that kernel reads; each call reorders the kernel
into that layout (milliseconds) and runs the convolution straight on the NHWC image, with the
padding, stride and bias inside the kernel. Images and outputs are NumPy buffers used in place.
"""

import ctypes
import functools

import numpy as np

from flux1 import _blas

_V = ctypes.c_void_p
_Dims = ctypes.c_int64 * 12  # DNNL_MAX_NDIMS
_DTYPES = {"bf16": 2, "fp32": 3}  # dnnl_data_type_t
_FORMAT_ANY = 1  # dnnl_format_tag_any: the primitive chooses the layout
_FORWARD_INFERENCE, _CONVOLUTION_DIRECT = 96, 1
_QUERY_IMPLEMENTATION, _QUERY_WEIGHTS = 8, 131  # dnnl_query_impl_info_str, dnnl_query_weights_md
_SRC, _DST, _WEIGHTS, _BIAS = 1, 17, 33, 41  # DNNL_ARG_*


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


def _primitive(desc: _V) -> _V:
    primitive = _V()
    _check(_runtime()[0].dnnl_primitive_create(ctypes.byref(primitive), desc), "creating a primitive")
    return primitive


def _execute(primitive: _V, arguments: dict[int, tuple[_V, np.ndarray]]) -> None:
    """Runs `primitive` on NumPy buffers: {DNNL_ARG_*: (memory descriptor, buffer)}."""
    lib, engine, stream = _runtime()
    memories = []
    try:
        for desc, buffer in arguments.values():
            memory = _V()
            _check(
                lib.dnnl_memory_create(ctypes.byref(memory), desc, engine, _V(buffer.ctypes.data)), "memory"
            )
            memories.append(memory)
        args = (_Arg * len(memories))(*(_Arg(a, m) for a, m in zip(arguments, memories, strict=True)))
        _check(lib.dnnl_primitive_execute(primitive, stream, len(memories), args), "executing a primitive")
        _check(lib.dnnl_stream_wait(stream), "waiting for a primitive")
    finally:
        for memory in memories:
            lib.dnnl_memory_destroy(memory)


class Convolution:
    """y = conv(x, kernel) + bias for one shape: x [batch, height, width, in] NHWC, kernel [out, kh,
    kw, in] (as the VAE holds it), bias and y fp32; x and kernel in `dtype` (fp32, or bf16 bits as
    uint16: bf16 inputs, fp32 sums)."""

    def __init__(self, x_shape: tuple, kernel_shape: tuple, stride: int, padding: int, dtype: str):
        lib, engine, _ = _runtime()
        # What this object owns, destroyed with it (at exit the module's globals may be gone first).
        self._owned = []
        self._destroy = {"md": lib.dnnl_memory_desc_destroy, "pd": lib.dnnl_primitive_desc_destroy}
        self._destroy["primitive"] = lib.dnnl_primitive_destroy
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
        implementation = ctypes.c_char_p()
        lib.dnnl_primitive_desc_query(desc, _QUERY_IMPLEMENTATION, 0, ctypes.byref(implementation))
        self.implementation = implementation.value.decode()  # e.g. "brgconv:avx2"
        self.blocked_kernel = _V(lib.dnnl_primitive_desc_query_md(desc, _QUERY_WEIGHTS, 0))  # desc's
        self.blocked_size = lib.dnnl_memory_desc_get_size(self.blocked_kernel)
        self.convolve = self._own("primitive", _primitive(desc))
        reorder = self._own("pd", _V())
        _check(
            lib.dnnl_reorder_primitive_desc_create(
                ctypes.byref(reorder), self.kernel, engine, self.blocked_kernel, engine, None
            ),
            "choosing the kernel's reorder",
        )
        self.reorder = self._own("primitive", _primitive(reorder))

    def _own(self, kind: str, handle: _V) -> _V:
        self._owned.append((kind, handle))
        return handle

    def __del__(self):
        for kind, handle in reversed(self._owned):
            if handle:
                self._destroy[kind](handle)

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
