"""The CPU paths of a 2-D convolution, one of which the plan picks by measurement (`cpu_plan`):

- unfolded windows through a GEMM (any path of `nn/gemm.py`): one matmul per band of output rows,
  the band's kh * kw shifted windows of the padded image side by side ([pixels, kh * kw * in],
  copied on all cores) times the kernel as [kh * kw * in, out]. Stride 1 only.
- oneDNN's convolution primitive (`nn/onednn.py`): its own kernels on the NHWC image, no windows
  copied. Any stride.

The plan's measurement on 2 Zen 1 cores (AVX2; `benchmarks/profile_step.py` prints it): oneDNN
45-49 GFLOP/s, unfolded windows through any GEMM 34-38. With bf16 inputs the image is rounded to bf16 once,
before it is unfolded or convolved (half the bytes to copy); the output and bias stay fp32.
"""

from dataclasses import dataclass
from functools import cache, partial

import numpy as np

from flux1.nn import onednn
from flux1.nn.gemm import GemmPath, available_paths, gemm, operand
from flux1.nn.numpy_cpu import in_parallel

_BAND_BYTES = 48 * 2**20  # one band's unfolded windows


@dataclass(frozen=True)
class ConvolutionPath:
    name: str  # a GEMM path's name (unfolded windows through it) or "onednn convolution <dtype>"
    library: str
    dtype: str  # "fp32" or "bf16", as GemmPath
    gemm: GemmPath | None  # None: oneDNN's convolution primitive


@cache
def convolution_paths() -> dict[str, ConvolutionPath]:
    paths = {name: ConvolutionPath(name, p.library, p.dtype, p) for name, p in available_paths().items()}
    if onednn.available():
        for dtype in sorted({p.dtype for p in paths.values()}, reverse=True):  # bf16 where GEMMs have it
            name = f"onednn convolution {dtype}"
            library = next(p.library for p in paths.values() if p.name.startswith("onednn"))
            paths[name] = ConvolutionPath(name, library, dtype, None)
    return paths


def convolve(
    path: ConvolutionPath,
    image: np.ndarray,
    kernel: np.ndarray,
    bias: np.ndarray,
    stride: int = 1,
    padding: int = 0,
) -> np.ndarray:
    """y [batch, out_height, out_width, out] fp32 = image [batch, height, width, in] (NHWC) convolved
    with kernel [out, kh, kw, in], plus bias; image and kernel fp32 (or bf16 bits)."""
    image, kernel = operand(image, path), operand(kernel, path)
    if path.gemm is None:
        primitive = onednn.convolution(image.shape, kernel.shape, stride, padding, path.dtype)
        return primitive(image, kernel, bias, np.empty(primitive.out_shape, np.float32))
    if stride != 1:
        raise ValueError(f"convolution through {path.name}: stride {stride}, only 1 is unfolded")
    out_channels, kh, kw, in_channels = kernel.shape
    batch, height, width, _ = image.shape
    out_height, out_width = height + 2 * padding - kh + 1, width + 2 * padding - kw + 1
    if padding:
        image = np.pad(image, [(0, 0), (padding, padding), (padding, padding), (0, 0)])
    kernel = kernel.transpose(1, 2, 3, 0).reshape(kh * kw * in_channels, out_channels)
    out = np.empty((batch, out_height, out_width, out_channels), np.float32)
    band = max(1, _BAND_BYTES // (out_width * kernel.nbytes // out_channels))
    windows = np.empty((band, out_width, kh * kw, in_channels), image.dtype)
    for b in range(batch):
        for top in range(0, out_height, band):
            rows = min(band, out_height - top)
            pixels = rows * out_width
            if kh == kw == 1:
                source = image[b, top : top + rows].reshape(pixels, in_channels)
            else:
                in_parallel(partial(_unfold, windows, image[b, top : top + rows + kh - 1], kh, kw), rows)
                source = windows[:rows].reshape(pixels, -1)
            target = out[b, top : top + rows].reshape(pixels, out_channels)
            gemm(path.gemm, source, kernel, out=target)
            in_parallel(partial(_add_rows, target, bias), pixels)
    return out


def _unfold(windows: np.ndarray, image: np.ndarray, kh: int, kw: int, first: int, stop: int) -> None:
    """windows[i, j, dy * kw + dx] = image[i + dy, j + dx] for output rows first..stop."""
    width = windows.shape[1]
    for dy in range(kh):
        for dx in range(kw):
            windows[first:stop, :, dy * kw + dx] = image[first + dy : stop + dy, dx : dx + width]


def _add_rows(target: np.ndarray, bias: np.ndarray, first: int, stop: int) -> None:
    np.add(target[first:stop], bias, out=target[first:stop])
