"""The model behind the page: one `Flux1` kept loaded between generations and reloaded (with progress)
when the model, quantization or LoRAs change; one generation at a time, on one worker thread that owns
all MLX work; a cancel flag per browser session, checked after every step; images saved with main.py's
naming into the output folder, beside copies of their input images; the gallery of every image made
since start."""

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flux1 import modes, preview
from flux1.cli.generate import output_paths
from flux1.model_files import resolve
from flux1.pipeline import NETWORKS, Flux1, Step
from flux1.ui.request import ModelChoice, Request, keep_inputs, page_message

log = logging.getLogger("flux1")


@dataclass(frozen=True)
class Progress:
    message: str
    preview: np.ndarray | None = None  # uint8 RGB latent preview [H/8, W/8, 3]


@dataclass(frozen=True)
class Saved:
    message: str
    path: Path
    record: dict


@dataclass(frozen=True)
class Stopped:
    """The job ended early: an error in the request or the model, or a cancel."""

    message: str


Event = Progress | Saved | Stopped


class Cancelled(Exception):
    pass


def _label(first: int, count: int, total: int, seeds: list[int]) -> str:
    if count == 1:
        return f"image {first + 1}/{total} (seed {seeds[0]})"
    return f"images {first + 1}-{first + count}/{total} (seeds {seeds[0]}-{seeds[-1]})"


class Engine:
    def __init__(self, output_dir: Path, **flux_options):
        self.output_dir = Path(output_dir)
        self.flux_options = flux_options  # group_size, low_ram, precision, lora_strict for every Flux1
        self.gallery: list[tuple[Path, dict]] = []
        self._flux: Flux1 | None = None
        self._choice: ModelChoice | None = None
        self._rgb: dict[str, preview.LatentToRGB] = {}  # by VAE file
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flux1-generate")
        self._cancel: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def _flag(self, session: str) -> threading.Event:
        with self._lock:
            return self._cancel.setdefault(session, threading.Event())

    def arm(self, session: str) -> None:
        """A new Generate click: forget an old cancel of this session."""
        self._flag(session).clear()

    def cancel(self, session: str) -> None:
        """Stop this session's running or queued job after its current step."""
        self._flag(session).set()

    def run(self, request: Request, session: str) -> Iterator[Event]:
        """The job's events as they happen; jobs run one at a time in the order they arrive."""
        events: queue.Queue[Event | None] = queue.Queue()
        self._worker.submit(self._job, request, session, events.put)
        while (event := events.get()) is not None:
            yield event

    def _job(self, request: Request, session: str, emit: Callable[[Event | None], None]) -> None:
        flag = self._flag(session)
        try:
            if flag.is_set():
                raise Cancelled("Cancelled before it started; nothing saved")
            flux, rgb = self._model(request.model, emit)
            config, seeds = request.config, request.seeds
            modes.select(flux.files.base_model, request.inputs)  # a hub repo id's kind is known by now
            inputs = vars(keep_inputs(request.inputs, self.output_dir))
            made = list(zip(seeds, output_paths(self.output_dir / "image.png", 1, list(seeds))[0]))
            for first in range(0, len(made), request.batch_size):
                batch = made[first : first + request.batch_size]
                label = _label(first, len(batch), len(made), [seed for seed, _ in batch])

                def on_step(n: int, step: Step, label=label) -> None:
                    if flag.is_set():
                        raise Cancelled(f"Cancelled at step {step.index}/{step.total} of {label}")
                    if n == 0:  # the preview of a batch's first image
                        picture = preview.preview(step, config.height, config.width, rgb)
                        emit(
                            Progress(
                                f"{label}: step {step.index}/{step.total}, {step.seconds:.2f} s", picture
                            )
                        )

                images = flux.generate_images(
                    [seed for seed, _ in batch],
                    request.prompt,
                    config,
                    len(batch),
                    progress=False,
                    on_step=on_step,
                    **inputs,
                )
                for (seed, path), image in zip(batch, images):
                    image.save(path)
                    with self._lock:
                        self.gallery.append((path, image.record))
                    line = f"Saved {path.name} (seed {seed}; {image.timings.line()})"
                    emit(Saved(line, path, image.record))
        except Cancelled as e:
            emit(Stopped(str(e)))
        except (ValueError, OSError, NotImplementedError) as e:
            emit(Stopped(f"Error: {page_message(e)}"))
        except Exception as e:  # the page must keep serving whatever a job hits
            log.exception("generation failed")
            emit(Stopped(f"Error: {type(e).__name__}: {e}"))
        finally:
            flag.clear()
            emit(None)

    def _model(self, choice: ModelChoice, emit) -> tuple[Flux1, preview.LatentToRGB]:
        """The loaded model for `choice`, reloading (with progress messages) when it changed."""
        if choice != self._choice:
            if self._flux is not None:
                self._flux.release()
            self._flux, self._choice = None, None
            source = choice.source
            emit(Progress(f"Loading {source.label}"))
            if source.path:
                files = resolve(path=source.path, base_model=source.base_model, gguf=source.gguf)
            else:
                files = resolve(model=source.model, base_model=source.base_model, gguf=source.gguf)
            flux = Flux1(
                files,
                quantize=choice.quantize,
                lora_paths=[p for p, _ in choice.loras],
                lora_scales=[s for _, s in choice.loras],
                **self.flux_options,
            )
            if not flux.low_ram:  # low-RAM loads each network when it is needed
                for i, name in enumerate(NETWORKS, 1):
                    emit(Progress(f"Loading {source.label}: {name} ({i}/{len(NETWORKS)})"))
                    flux.load(name)
            if str(files.vae) not in self._rgb:
                emit(Progress("Fitting the latent preview to this VAE"))
                self._rgb[str(files.vae)] = preview.fit(flux.load("vae"), flux.compute_dtype("vae"))
                if flux.low_ram:
                    flux.release("vae")
            self._flux, self._choice = flux, choice
        return self._flux, self._rgb[str(self._flux.files.vae)]
