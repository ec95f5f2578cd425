"""Flux1: load once, generate many. Text -> (CLIP, T5) -> transformer + Euler sampler -> VAE -> pixels."""

import datetime
import gc
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tqdm import tqdm

import flux1
from flux1 import backend, latents, metadata
from flux1.configs import CLIP_LENGTH, DEFAULT_STEPS, MAX_SEQUENCE_LENGTH
from flux1.loaders.gguf import load_transformer_gguf
from flux1.loaders.text_encoders import load_clip, load_t5
from flux1.loaders.transformer import load_transformer
from flux1.loaders.vae import load_vae
from flux1.lora.apply import LoraReport, apply_file, file_digest
from flux1.model_files import ModelFiles, resolve
from flux1.quantize import check_quantization, quantize_linears
from flux1.sampler import euler_step, sigmas
from flux1.tokenizers import PromptTokenizer
from flux1.weights import saved

log = logging.getLogger("flux1")


@dataclass
class Config:
    num_inference_steps: int | None = None  # 4 for schnell, 25 for dev
    height: int = 1024
    width: int = 1024
    guidance: float = 3.5  # dev only
    max_sequence_length: int | None = None  # T5 tokens: 256 for schnell, 512 for dev


@dataclass
class Timings:
    """Seconds per phase; loading weights is counted apart from the phase that needed them."""

    load: float = 0.0
    encode: float = 0.0
    denoise: float = 0.0
    decode: float = 0.0
    steps: int = 0
    step_seconds: list[float] = field(default_factory=list)

    def line(self) -> str:
        per_step = self.denoise / max(self.steps, 1)
        return (
            f"load {self.load:.1f}s, encode {self.encode:.1f}s, denoise {self.denoise:.1f}s "
            f"({per_step:.2f}s/step), decode {self.decode:.1f}s"
        )


@dataclass
class GeneratedImage:
    pixels: np.ndarray  # uint8 [H, W, 3]
    record: dict  # the generation record stored in the PNG
    timings: Timings = field(default_factory=Timings)

    @property
    def image(self):
        from PIL import Image

        return Image.fromarray(self.pixels)

    def save(self, path: str | Path, export_json: bool = False) -> Path:
        """Write the PNG (and with export_json, `<path>.json`); refuses to overwrite a file."""
        path = Path(path)
        for target in [path] + ([path.with_suffix(".json")] if export_json else []):
            if target.exists():
                raise FileExistsError(f"{target} exists; flux1 never overwrites a file")
        if not path.parent.is_dir():
            raise FileNotFoundError(f"--output {path}: folder {path.parent} does not exist")
        metadata.write_png(self.pixels, path, self.record)
        if export_json:
            metadata.write_json(self.record, path.with_suffix(".json"))
        return path


def check_size(height: int, width: int) -> None:
    """Sizes must be multiples of 16 (8x VAE, 2x2 packing); refused with the nearest valid values
    rather than rounded silently."""
    for flag, value in (("--height", height), ("--width", width)):
        if value < 16 or value % 16:
            low, high = max(16, value // 16 * 16), max(16, -(-value // 16) * 16)
            nearest = f"{low}" if low == high else f"{low} or {high}"
            raise ValueError(f"{flag} {value}: must be a positive multiple of 16 (nearest: {nearest})")


class Flux1:
    def __init__(
        self,
        files: ModelFiles,
        quantize: int | None = None,
        group_size: int = 64,
        lora_paths: list[str] | None = None,
        lora_scales: list[float] | None = None,
        low_ram: bool = False,
        lora_strict: bool = True,
    ):
        if quantize is not None:
            check_quantization(quantize, group_size)
        self.files, self.quantize, self.group_size, self.low_ram = files, quantize, group_size, low_ram
        self.lora_paths = [str(p) for p in lora_paths or []]
        self.lora_scales = list(lora_scales) if lora_scales else [1.0] * len(self.lora_paths)
        if len(self.lora_scales) != len(self.lora_paths):
            raise ValueError(
                f"--lora-scales has {len(self.lora_scales)} values for {len(self.lora_paths)} --lora-paths"
            )
        for path in self.lora_paths:
            if not Path(path).is_file():
                raise ValueError(f"--lora-paths {path}: file not found")
        self.lora_strict = lora_strict
        self._lora_applied: set[str] = set()
        self.lora_reports = [
            LoraReport(p, "", s, 0, sha256=file_digest(p)) for p, s in zip(self.lora_paths, self.lora_scales)
        ]
        self._models: dict[str, nn.Module] = {}
        self._tokenizers: dict[tuple[str, int], PromptTokenizer] = {}
        self.load_seconds = 0.0  # reading (and quantizing) weights, all models so far
        self.saved_bits: int | str | None = None
        self._check_saved_quantization()

    @classmethod
    def from_name(cls, name: str, **options) -> "Flux1":
        """`schnell` or `dev` from the Hugging Face hub (or a repo id)."""
        return cls(resolve(model=name), **options)

    @classmethod
    def from_path(cls, path: str | Path, base_model: str | None = None, **options) -> "Flux1":
        """A local diffusers folder, a folder saved by flux1, or a BFL single-file transformer."""
        return cls(resolve(path=path, base_model=base_model), **options)

    # Models are loaded on first use, quantized layer by layer as they are read.
    def _model(self, name: str) -> nn.Module:
        if name not in self._models:
            root = self.files.root
            loader = {
                "clip": lambda: load_clip(root / "text_encoder"),
                "t5": lambda: load_t5(root / "text_encoder_2"),
                "transformer": lambda: (
                    load_transformer_gguf(self.files.transformer)
                    if self.files.transformer.suffix == ".gguf"
                    else load_transformer(self.files.transformer)
                ),
                "vae": lambda: load_vae(self.files.vae),
            }[name]
            start = time.perf_counter()
            model = loader()
            if self.quantize is not None and name != "vae":
                quantize_linears(model, self.quantize, self.group_size)
            if name != "vae":
                self._apply_loras(name, model)
            mx.eval(model.parameters())  # read now, so loading is timed as loading
            self.load_seconds += time.perf_counter() - start
            self._models[name] = model
        return self._models[name]

    def _apply_loras(self, name: str, model: nn.Module) -> None:
        """LoRAs go on after quantization: low-rank changes stay adapters beside quantized weights.
        A network reloaded (--low-ram) gets them again; the reports count its first time only."""
        first_time = name not in self._lora_applied
        self._lora_applied.add(name)
        for report in self.lora_reports:
            part = apply_file({name: model}, Path(report.path), report.scale, self.lora_strict)
            if not first_time:
                continue
            if part.dialect != "unknown":
                report.dialect = " + ".join(
                    sorted({*filter(None, report.dialect.split(" + ")), part.dialect})
                )
            report.layers += part.layers
            report.unmatched += part.unmatched
            if name == "transformer":
                log.info("%s", report.line())

    def _release(self, *names: str) -> None:
        if self.low_ram:
            for name in names:
                self._models.pop(name, None)
            gc.collect()
            mx.clear_cache()

    def _check_saved_quantization(self) -> None:
        folder = self.files.transformer
        if not (folder.is_dir() and saved.is_saved(folder)):
            return
        stored_bits = saved.bits_of(saved.saved_quantization(folder))
        if self.quantize is not None and self.quantize != stored_bits:
            raise ValueError(
                f"-q {self.quantize}: {self.files.root} was saved "
                + (f"with {stored_bits}-bit quantization" if stored_bits else "unquantized")
                + "; drop -q to use it as saved (requantizing saved weights would compound the error)"
            )
        self.quantize = None  # already applied; the record reports what was stored
        self.saved_bits = stored_bits

    @property
    def quantization_bits(self) -> int | str | None:
        if self.files.transformer.suffix == ".gguf":
            return "gguf" if self.quantize is None else f"gguf + {self.quantize}"
        return self.quantize if self.quantize is not None else self.saved_bits

    def _tokenizer(self, kind: str, max_length: int) -> PromptTokenizer:
        key = (kind, max_length)
        if key not in self._tokenizers:
            folder = self.files.root / ("tokenizer" if kind == "clip" else "tokenizer_2")
            self._tokenizers[key] = PromptTokenizer(folder, kind, max_length)
        return self._tokenizers[key]

    def encode_prompt(self, prompt: str, max_sequence_length: int) -> tuple[mx.array, mx.array]:
        """(T5 hidden states [1, L, 4096], CLIP pooled [1, 768]), computing in the device's dtype."""
        dtype = backend.compute_dtype()
        clip_tokens = self._tokenizer("clip", CLIP_LENGTH)(prompt)
        t5_tokens = self._tokenizer("t5", max_sequence_length)(prompt)
        for tokenizer, tokens in (("CLIP", clip_tokens), ("T5", t5_tokens)):
            if tokens.truncated:
                log.warning(
                    "the prompt has %d %s tokens; only the first %d are used",
                    tokens.token_count,
                    tokenizer,
                    tokens.max_length,
                )
        pooled = self._model("clip")(mx.array(clip_tokens.ids), dtype)
        mx.eval(pooled)
        self._release("clip")
        hidden = self._model("t5")(mx.array(t5_tokens.ids), dtype)
        mx.eval(hidden)
        self._release("t5")
        return hidden, pooled

    def denoise(
        self,
        noise: mx.array,
        hidden: mx.array,
        pooled: mx.array,
        config: Config,
        steps: int,
        progress: bool,
        step_seconds: list[float] | None = None,
    ) -> mx.array:
        """Packed latents after the Euler steps, from initial noise [1, 16, H/8, W/8]; the seconds
        of each step are appended to `step_seconds`."""
        transformer = self._model("transformer")
        dtype = backend.compute_dtype()
        x = latents.pack(noise.astype(mx.float32))
        img_ids = latents.image_ids(config.height, config.width)
        txt_ids = mx.zeros((1, hidden.shape[1], 3))
        schedule = sigmas(steps, x.shape[1], self.files.scheduler_config())
        guidance = mx.array([config.guidance], mx.float32) if transformer.guidance_embeds else None
        for sigma, sigma_next in tqdm(
            list(zip(schedule[:-1], schedule[1:])), disable=not progress, unit="step"
        ):
            start = time.perf_counter()
            # diffusers passes (sigma * 1000) / 1000 in float32; the same rounding keeps us bit-close.
            t = mx.array(np.array([sigma * np.float32(1000)], np.float32) / np.float32(1000))
            v = transformer(x.astype(dtype), img_ids, hidden, txt_ids, t, pooled, guidance)
            x = euler_step(x, v, sigma, sigma_next)
            mx.eval(x)
            if step_seconds is not None:
                step_seconds.append(time.perf_counter() - start)
        self._release("transformer")
        return x

    def decode(self, packed: mx.array, config: Config) -> np.ndarray:
        """Float image [H, W, 3] in [0, 1]."""
        vae = self._model("vae")
        z = latents.unpack(packed, config.height, config.width) / vae.scaling_factor + vae.shift_factor
        image = vae.decode(z.astype(backend.compute_dtype()))
        image = mx.clip(image.astype(mx.float32) / 2 + 0.5, 0.0, 1.0)
        mx.eval(image)
        self._release("vae")
        return np.array(image[0])

    def generate_array(
        self, seed: int, prompt: str, config: Config, noise: mx.array | None = None, progress: bool = True
    ) -> tuple[np.ndarray, dict, Timings]:
        """The float image [H, W, 3] in [0, 1] (before 8-bit rounding), its record and timings."""
        check_size(config.height, config.width)
        steps = config.num_inference_steps or DEFAULT_STEPS[self.files.base_model]
        if steps < 1:
            raise ValueError(f"--steps {steps}: expected at least 1")
        max_length = config.max_sequence_length or MAX_SEQUENCE_LENGTH[self.files.base_model]
        timings = Timings(steps=steps)
        loaded_before = self.load_seconds

        def timed(phase: str, compute):
            start, load_start = time.perf_counter(), self.load_seconds
            result = compute()
            setattr(timings, phase, time.perf_counter() - start - (self.load_seconds - load_start))
            return result

        hidden, pooled = timed("encode", lambda: self.encode_prompt(prompt, max_length))
        noise = latents.noise(seed, config.height, config.width) if noise is None else noise
        packed = timed(
            "denoise",
            lambda: self.denoise(noise, hidden, pooled, config, steps, progress, timings.step_seconds),
        )
        image = timed("decode", lambda: self.decode(packed, config))
        timings.load = self.load_seconds - loaded_before
        record = {
            "prompt": prompt,
            "model": self.files.name,
            "gguf": str(self.files.transformer) if self.files.transformer.suffix == ".gguf" else None,
            "base_model": self.files.base_model,
            "seed": seed,
            "steps": steps,
            "guidance": config.guidance if self.files.base_model == "dev" else None,
            "height": config.height,
            "width": config.width,
            "max_sequence_length": max_length,
            "precision": f"compute {backend.compute_dtype()}".replace("mlx.core.", ""),
            "quantize": self.quantization_bits,
            "loras": [
                {"name": Path(r.path).name, "path": r.path, "scale": r.scale, "sha256": r.sha256}
                for r in self.lora_reports
            ],
            "generation_seconds": round(timings.load + timings.encode + timings.denoise + timings.decode, 2),
            "version": flux1.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        return image, record, timings

    def generate_image(
        self,
        seed: int,
        prompt: str,
        config: Config | None = None,
        latents: mx.array | None = None,
        progress: bool = True,
    ) -> GeneratedImage:
        """One image; `latents` injects the initial noise [1, 16, H/8, W/8] instead of the seed's."""
        image, record, timings = self.generate_array(seed, prompt, config or Config(), latents, progress)
        # As diffusers' image processor: scale to 0..255, round half to even, 8 bits.
        return GeneratedImage((image * 255).round().astype(np.uint8), record, timings)
