"""Images in a grid, each with a title of one or more lines under it: the step previews' strip and
the benchmark suite's contact sheet."""

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LINE_HEIGHT = 15  # pixels per title line (12-pixel font)


def titled_grid(
    images: list[np.ndarray], titles: list[tuple[str, ...]], columns: int, scale: float = 1.0
) -> Image.Image:
    """uint8 RGB images (all of one size, shown `scale` times it, nearest neighbour) in rows of
    `columns` cells, each cell as wide as its image or its longest title line, the title under it."""
    font = ImageFont.load_default(size=12)
    height, width = round(images[0].shape[0] * scale), round(images[0].shape[1] * scale)
    cell = max([width] + [int(font.getlength(line)) + 8 for title in titles for line in title])
    band = 6 + LINE_HEIGHT * max(len(title) for title in titles)
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (cell * min(columns, len(images)), (height + band) * rows), "white")
    draw = ImageDraw.Draw(grid)
    for n, (pixels, title) in enumerate(zip(images, titles)):
        left, top = (n % columns) * cell, (n // columns) * (height + band)
        grid.paste(
            Image.fromarray(pixels).resize((width, height), Image.NEAREST), (left + (cell - width) // 2, top)
        )
        for line, text in enumerate(title):
            draw.text((left + 4, top + height + 3 + LINE_HEIGHT * line), text, fill="black", font=font)
    return grid
