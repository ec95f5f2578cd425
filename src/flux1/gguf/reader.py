"""Read a FLUX transformer GGUF file, memory-mapped, one tensor at a time under its canonical (BFL)
name: quantized weights as their raw blocks, everything else dense in its stored dtype."""

import mmap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader

from flux1.convert.transformer_bfl import strip_prefix
from flux1.gguf.blocks import DENSE, SUPPORTED, block_size
from flux1.weights.safetensors_io import WeightFileError
from flux1.weights.slices import count, indices


@dataclass
class RawBlocks:
    """A quantized 2-D weight as stored: rows of whole blocks, a view of the mapped file."""

    raw: np.ndarray  # uint8 [out, bytes per row]
    qtype: T
    shape: tuple[int, int]  # logical [out, in]

    def part(self, axis: int, ranges: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray] | None:
        """(indices along `raw`'s axis, a copy of those bytes) of the rows (axis 0) or the columns
        (axis 1) `ranges`, read alone from the mapped file; None for columns not on whole blocks."""
        if axis == 1:
            values, nbytes = block_size(self.qtype)
            if any(c % values for pair in ranges for c in pair):
                return None
            ranges = [(a // values * nbytes, b // values * nbytes) for a, b in ranges]
        index = indices(ranges)
        part = np.take(self.raw, index, axis=axis)
        count(part.nbytes)
        return index, part


def _architecture(reader: GGUFReader) -> str | None:
    field = reader.fields.get("general.architecture")
    return None if field is None else bytes(field.parts[field.data[0]]).decode()


def _dense(data: np.ndarray, qtype: T) -> mx.array:
    if qtype == T.BF16:
        return mx.array(np.ascontiguousarray(data).view(np.uint16)).view(mx.bfloat16)
    return mx.array(np.ascontiguousarray(data))


class GGUFFile:
    """Opens and checks the whole file (architecture, every tensor's type and rank) before any
    tensor is read, so a file that cannot load fails before the work starts."""

    def __init__(self, path: Path):
        self.path = path = Path(path)
        if not path.is_file():
            raise WeightFileError(f"{path}: file not found")
        try:
            self._reader = GGUFReader(path)
        except Exception as e:  # gguf-py raises many kinds on damaged files
            raise WeightFileError(
                f"{path}: not a readable GGUF file, truncated or corrupt ({type(e).__name__}: {e})"
            ) from None
        architecture = _architecture(self._reader)
        if architecture != "flux":
            raise WeightFileError(
                f"{path}: general.architecture is '{architecture}', expected 'flux' (a FLUX.1 transformer)"
            )
        self.shapes = {}
        for tensor in self._reader.tensors:
            name, shape, origin = self._describe(tensor)
            if tensor.tensor_type not in SUPPORTED:
                supported = ", ".join(t.name for t in SUPPORTED)
                raise WeightFileError(f"{origin}: unsupported type; supported: {supported}")
            if tensor.tensor_type not in DENSE and (len(shape) != 2 or not name.endswith(".weight")):
                raise WeightFileError(
                    f"{origin}: quantized tensor of shape {list(shape)}; only 2-D weights can be"
                )
            self.shapes[name] = shape

    def _describe(self, tensor) -> tuple[str, tuple[int, ...], str]:
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        return (
            strip_prefix(tensor.name),
            shape,
            f"{self.path}: tensor '{tensor.name}' ({tensor.tensor_type.name})",
        )

    def tensors(self) -> Iterator[tuple[str, mx.array | RawBlocks, str]]:
        """(canonical name, dense array or raw blocks, origin) of each tensor. Raw blocks view the
        mapped file: copy or convert them before asking for the next tensor, whose arrival drops
        the previous tensor's pages from this process (clean file pages are reclaimable, but they
        count as resident memory until unmapped)."""
        for tensor in self._reader.tensors:
            name, shape, origin = self._describe(tensor)
            if tensor.tensor_type in DENSE:
                yield name, _dense(tensor.data, tensor.tensor_type).reshape(shape), origin
            else:
                yield name, RawBlocks(tensor.data.reshape(shape[0], -1), tensor.tensor_type, shape), origin
            start = tensor.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
            self._reader.data._mmap.madvise(
                mmap.MADV_DONTNEED, start, tensor.data_offset + tensor.n_bytes - start
            )
