"""Canny edges, as OpenCV's `cv2.Canny(image, low, high)` finds them in an 8-bit RGB image: BFL's
reference makes FLUX.1 Canny's control image so, with thresholds 50 and 200. OpenCV's steps and
integer arithmetic: 3x3 Sobel gradients (borders replicated), their L1 norm, at each pixel the channel
whose norm is largest (the first of equals); a pixel is kept where its norm is above `low` and a local
maximum along its gradient's direction (one of four, by OpenCV's fixed-point tan 22.5 degrees; zeros
beyond the image); kept pixels above `high`, and kept pixels 8-connected to them, are the edges."""

import numpy as np
from PIL import Image

LOW, HIGH = 50, 200  # BFL's CannyImageEncoder
_SHIFT = 15
_TAN_22_5 = int(0.4142135623730950488016887242097 * (1 << _SHIFT) + 0.5)


def _sobel(channel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.pad(channel, 1, mode="edge")
    dx = p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:] - p[:-2, :-2] - 2 * p[1:-1, :-2] - p[2:, :-2]
    dy = p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:] - p[:-2, :-2] - 2 * p[:-2, 1:-1] - p[:-2, 2:]
    return dx, dy


def _local_maxima(dx: np.ndarray, dy: np.ndarray, norm: np.ndarray) -> np.ndarray:
    height, width = norm.shape
    padded = np.pad(norm, 1)

    def beside(row: int, col: int) -> np.ndarray:
        return padded[1 + row : 1 + row + height, 1 + col : 1 + col + width]

    x, y = np.abs(dx), np.abs(dy) << _SHIFT
    tan_22 = x * _TAN_22_5
    horizontal = y < tan_22
    vertical = ~horizontal & (y > tan_22 + (x << (_SHIFT + 1)))
    rising = (dx ^ dy) >= 0  # the diagonal from top left to bottom right
    along_rows = (norm > beside(0, -1)) & (norm >= beside(0, 1))
    along_columns = (norm > beside(-1, 0)) & (norm >= beside(1, 0))
    diagonal = np.where(
        rising,
        (norm > beside(-1, -1)) & (norm > beside(1, 1)),
        (norm > beside(-1, 1)) & (norm > beside(1, -1)),
    )
    return np.where(horizontal, along_rows, np.where(vertical, along_columns, diagonal))


def _connected(candidates: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """The candidates 8-connected to a seed (seeds are candidates)."""
    width = candidates.shape[1] + 2
    open_ = np.pad(candidates & ~seeds, 1).ravel()
    found = np.pad(seeds, 1).ravel()
    stack = np.flatnonzero(found).tolist()
    steps = (-width - 1, -width, -width + 1, -1, 1, width - 1, width, width + 1)
    while stack:
        at = stack.pop()
        for step in steps:
            if open_[at + step]:
                open_[at + step] = False
                found[at + step] = True
                stack.append(at + step)
    return found.reshape(candidates.shape[0] + 2, width)[1:-1, 1:-1]


def edges(image: Image.Image, low: int = LOW, high: int = HIGH) -> Image.Image:
    """The edge map of `image`: white (255) edges on black, one channel."""
    low, high = sorted((low, high))
    pixels = np.asarray(image.convert("RGB"), np.int32)
    gradients = [_sobel(pixels[..., c]) for c in range(3)]
    dx = np.stack([g[0] for g in gradients], axis=-1)
    dy = np.stack([g[1] for g in gradients], axis=-1)
    norms = np.abs(dx) + np.abs(dy)
    strongest = norms.argmax(axis=-1)[..., None]
    dx, dy, norm = (np.take_along_axis(a, strongest, axis=-1)[..., 0] for a in (dx, dy, norms))
    kept = _local_maxima(dx, dy, norm) & (norm > low)
    return Image.fromarray(_connected(kept, kept & (norm > high)).astype(np.uint8) * 255, "L")
