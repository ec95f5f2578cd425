"""Read only some rows or columns of the tensors of safetensors files (a tensor-parallel shard).

A tensor is stored row-major: a block of rows is one contiguous byte range, a block of columns one
range per row. Each range is read with `os.preadv` straight into the result, so the bytes read are
the shard's bytes (`bytes_read` counts them, for tests and benchmarks); headers are the ones
`read_header` validates.
"""

import os
from pathlib import Path

import mlx.core as mx
import numpy as np

from flux1.weights.safetensors_io import read_header

bytes_read = 0  # bytes of tensor data read by this module (and by the GGUF shard reader) so far

_NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U32": np.uint32, "U8": np.uint8}


def count(nbytes: int) -> None:
    global bytes_read
    bytes_read += nbytes


def indices(ranges: list[tuple[int, int]]) -> np.ndarray:
    return np.concatenate([np.arange(start, stop) for start, stop in ranges])


class SafetensorsSlices:
    """The tensors of some safetensors files, by name, read in parts."""

    def __init__(self, files: list[Path]):
        self._where: dict[str, tuple[Path, int, dict]] = {}
        for path in files:
            header, data_start = read_header(path)
            for name, info in header.items():
                if name != "__metadata__":
                    self._where[name] = (Path(path), data_start, info)

    def names(self) -> list[str]:
        return list(self._where)

    def readable(self, name: str) -> bool:
        """A 2-D tensor of a dtype this reader can return."""
        _, _, info = self._where.get(name, (None, 0, {"shape": []}))
        return len(info["shape"]) == 2 and info.get("dtype") in _NUMPY

    def dtype(self, name: str) -> str:
        return self._where[name][2]["dtype"]

    def rows(self, name: str) -> int:
        return self._where[name][2]["shape"][0]

    def read(self, name: str, axis: int, ranges: list[tuple[int, int]]) -> mx.array:
        """Rows (axis 0) or columns (axis 1) `ranges` of 2-D tensor `name`, in its stored dtype."""
        path, data_start, info = self._where[name]
        rows, columns = info["shape"]
        dtype = np.dtype(_NUMPY[info["dtype"]])
        start = data_start + info["data_offsets"][0]
        row_bytes = columns * dtype.itemsize
        width = columns if axis == 0 else sum(b - a for a, b in ranges)
        height = sum(b - a for a, b in ranges) if axis == 0 else rows
        out = np.empty((height, width), dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        fd = os.open(path, os.O_RDONLY)
        try:
            if axis == 1:
                os.posix_fadvise(fd, start, rows * row_bytes, os.POSIX_FADV_RANDOM)
            done = 0
            for offset, nbytes in self._extents(axis, ranges, rows, row_bytes, dtype.itemsize):
                if os.preadv(fd, [view[done : done + nbytes]], start + offset) != nbytes:
                    raise OSError(f"{path}: tensor '{name}': short read")
                done += nbytes
        finally:
            os.close(fd)
        count(out.nbytes)
        array = mx.array(out)
        return array.view(mx.bfloat16) if info["dtype"] == "BF16" else array

    @staticmethod
    def _extents(axis, ranges, rows, row_bytes, itemsize):
        """(offset, bytes) of each contiguous piece, in the order of the result's bytes."""
        if axis == 0:
            return [(a * row_bytes, (b - a) * row_bytes) for a, b in ranges]
        return [(r * row_bytes + a * itemsize, (b - a) * itemsize) for r in range(rows) for a, b in ranges]
