"""flux1's Canny edges equal OpenCV's `cv2.Canny` (what BFL's reference makes FLUX.1 Canny's control
images with) pixel for pixel: the same integer arithmetic, so no tolerance."""

import cv2
import numpy as np
import pytest
from PIL import Image

from flux1.modes.canny_edges import HIGH, LOW, edges


def smooth_picture(seed: int, height: int, width: int, resample) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), resample)


def shapes() -> Image.Image:
    """Flat regions with straight and slanted borders: every gradient direction, exact ties."""
    pixels = np.zeros((61, 77, 3), np.uint8)
    pixels[10:40, 12:50] = (200, 40, 90)
    rows, cols = np.mgrid[:61, :77]
    pixels[(rows - 30) ** 2 + (cols - 55) ** 2 < 15**2] = (30, 220, 60)
    pixels[rows > cols + 20] = (255, 255, 255)
    return Image.fromarray(pixels)


CASES = [
    (smooth_picture(0, 173, 134, Image.Resampling.NEAREST), LOW, HIGH),
    (smooth_picture(1, 105, 112, Image.Resampling.BILINEAR), LOW, HIGH),
    (smooth_picture(2, 170, 67, Image.Resampling.BICUBIC), LOW, HIGH),
    (smooth_picture(3, 96, 128, Image.Resampling.BICUBIC), 10, 30),
    (smooth_picture(4, 64, 64, Image.Resampling.BILINEAR), 200, 50),  # swapped, as OpenCV swaps them
    (smooth_picture(5, 50, 90, Image.Resampling.BICUBIC), 120, 120),
    (smooth_picture(6, 80, 60, Image.Resampling.BICUBIC).convert("L"), LOW, HIGH),
    (shapes(), LOW, HIGH),
]


@pytest.mark.parametrize("image, low, high", CASES)
def test_canny_edges_equal_opencvs(image, low, high):
    mine = np.asarray(edges(image, low, high))
    theirs = cv2.Canny(np.asarray(image.convert("RGB")), low, high)
    assert mine.dtype == theirs.dtype == np.uint8 and mine.shape == theirs.shape
    assert 0 < np.count_nonzero(theirs) < theirs.size / 2  # an image with edges, not all of it
    assert np.array_equal(mine, theirs)
