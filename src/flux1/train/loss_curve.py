"""The loss curve as a PNG, drawn with PIL: each step's loss (light) and its moving average (dark)."""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from flux1.metadata import atomic_write

SIZE = (800, 400)
MARGIN = 50


def moving_average(values: list[float], window: int) -> np.ndarray:
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, np.ones(window) / window, mode="valid")


def draw(path: Path, steps: list[int], losses: list[float]) -> None:
    image = Image.new("RGB", SIZE, "white")
    pen = ImageDraw.Draw(image)
    width, height = SIZE[0] - 2 * MARGIN, SIZE[1] - 2 * MARGIN
    pen.rectangle([MARGIN, MARGIN, MARGIN + width, MARGIN + height], outline="black")
    if losses:
        low, high = min(losses), max(losses)
        span = (high - low) or 1.0
        first, last = steps[0], max(steps[-1], steps[0] + 1)

        def point(step, loss):
            return (
                MARGIN + (step - first) / (last - first) * width,
                MARGIN + (1 - (loss - low) / span) * height,
            )

        for series, colour in (
            (losses, (170, 190, 230)),
            (moving_average(losses, max(1, len(losses) // 20)), (20, 50, 160)),
        ):
            pen.line([point(s, v) for s, v in zip(steps, series)], fill=colour, width=2)
        pen.text((MARGIN, 15), f"training loss, steps {steps[0]}..{steps[-1]}", fill="black")
        pen.text((5, MARGIN), f"{high:.4g}", fill="black")
        pen.text((5, MARGIN + height - 10), f"{low:.4g}", fill="black")
    atomic_write(Path(path), lambda f: image.save(f, format="PNG"))
