"""Step previews (`--stepwise-image-output-dir`, mflux's flag): after each denoising step an image of
the step's predicted clean latents `x0 = x - sigma * v` (`preview.denoised`), written as
`step_01_of_04.png`, ..., and at the end `composite.png`, the steps side by side, each labelled with
its step number and sigmas.

Two renderings (`--preview`):
- `vae`: x0 decoded by the model's VAE, the image generation would give if it stopped there (at the
  last step sigma_next is 0, so x0 is the final latents and the preview is the final image, pixel for
  pixel). Costs one VAE decode per step, as much as the final decode.
- `latent`: x0 through `flux1.preview`'s 16x3 map + bias fitted to this VAE (one small decode when the
  writer is made), 1/8 of the image's size, no VAE per step: microseconds. The strip scales it up 8x.

Built on `Flux1.generate_image(on_step=...)`; the denoising loop does not know about it."""

import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from flux1 import preview
from flux1.generation import Config
from flux1.metadata import atomic_write
from flux1.pipeline import Flux1, Step, to_pixels
from flux1.sheet import titled_grid

PREVIEWS = ("vae", "latent")
FLAG = "--stepwise-image-output-dir"


def check_folder(folder: Path) -> None:
    """Before any work: the folder is new (its parent exists) or empty, and takes files. It is made
    when the first step is written."""
    if folder.exists():
        if not folder.is_dir():
            raise ValueError(f"{FLAG} {folder}: not a folder")
        if any(folder.iterdir()):
            raise ValueError(
                f"{FLAG} {folder}: not empty (step images are never overwritten); give a new or empty folder"
            )
        place = folder
    else:
        place = folder.parent
        if not place.is_dir():
            raise ValueError(f"{FLAG} {folder}: folder {place} does not exist")
    try:
        tempfile.TemporaryFile(dir=place).close()
    except OSError as e:
        raise ValueError(f"{FLAG} {folder}: cannot write in {place} ({e.strerror})") from None


def fitted_map(flux: Flux1) -> preview.LatentToRGB:
    """The latent preview's map, fitted to `flux`'s VAE (released again with --low-ram)."""
    rgb = preview.fit(flux.load("vae"), flux.compute_dtype("vae"))
    if flux.low_ram:
        flux.release("vae")
    return rgb


class StepwiseWriter:
    """An `on_step` callback writing each step's preview into `folder`; `finish()` writes the strip."""

    def __init__(self, flux: Flux1, config: Config, folder: Path, mode: str = "vae", rgb=None):
        if mode not in PREVIEWS:
            raise ValueError(f"--preview {mode}: expected one of {', '.join(PREVIEWS)}")
        self.flux, self.config, self.folder, self.mode = flux, config, Path(folder), mode
        self.rgb = rgb if rgb is not None or mode == "vae" else fitted_map(flux)
        self.tiles: list[tuple[Step, np.ndarray]] = []
        self.seconds = 0.0  # spent on previews (decoding or mapping, and writing)

    def __call__(self, step: Step) -> None:
        start = time.perf_counter()
        if self.mode == "vae":
            x0 = preview.denoised(step.latents, step.velocity, step.sigma_next)
            pixels = to_pixels(self.flux.decode(x0, self.config))
        else:
            pixels = preview.preview(step, self.config.height, self.config.width, self.rgb)
        self.folder.mkdir(parents=True, exist_ok=True)
        width = max(2, len(str(step.total)))
        name = f"step_{step.index:0{width}d}_of_{step.total:0{width}d}.png"
        atomic_write(self.folder / name, lambda f: Image.fromarray(pixels).save(f, format="PNG"))
        self.tiles.append((step, pixels))
        self.seconds += time.perf_counter() - start

    def finish(self) -> Path:
        """`composite.png`: the steps left to right, each titled `step i/n` and `sigma a -> b`."""
        path = self.folder / "composite.png"
        strip = composite(self.tiles, scale=8 if self.mode == "latent" else 1)
        atomic_write(path, lambda f: strip.save(f, format="PNG"))
        return path


def composite(tiles: list[tuple[Step, np.ndarray]], scale: int = 1) -> Image.Image:
    titles = [(f"step {s.index}/{s.total}", f"sigma {s.sigma:.3f} > {s.sigma_next:.3f}") for s, _ in tiles]
    return titled_grid([pixels for _, pixels in tiles], titles, columns=len(tiles), scale=scale)
