"""Flux1: load once, generate many. Text -> (CLIP, T5) -> transformer + Euler sampler -> VAE -> pixels."""

import functools
import gc
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tqdm import tqdm

from flux1 import backend, cpu_plan, latents, metadata, modes, vae_tiles
from flux1.configs import CLIP_LENGTH
from flux1.distributed.agreement import agree_on_model
from flux1.distributed.shard_source import ShardSource
from flux1.distributed.tensor_parallel import cuts, shard_transformer
from flux1.generation import Config, ModeInputs, check_fits, check_lora_options
from flux1.loaders.gguf import load_transformer_gguf
from flux1.loaders.text_encoders import load_clip, load_t5
from flux1.loaders.transformer import load_transformer
from flux1.loaders.vae import load_vae
from flux1.lora.apply import LoraReport, apply_file, check_lora_file, file_digest
from flux1.model_files import ModelFiles, resolve
from flux1.modes.conditioning import Conditioning, noised
from flux1.quantize import check_quantization, quantize_linears
from flux1.sampler import euler_step, sigmas
from flux1.tokenizers import PromptTokenizer
from flux1.weights import saved

log = logging.getLogger("flux1")
NETWORKS = ("clip", "t5", "transformer", "vae")


@dataclass
class Timings:
    """Seconds per phase; loading weights is counted apart from the phase that needed them."""

    load: float = 0.0
    encode: float = 0.0
    denoise: float = 0.0
    decode: float = 0.0
    steps: int = 0
    step_seconds: list[float] = field(default_factory=list)
    images: int = 1  # the batch these timings are of

    @property
    def total(self) -> float:
        return self.load + self.encode + self.denoise + self.decode

    def line(self) -> str:
        per_step = self.denoise / max(self.steps, 1)
        return (f"batch of {self.images}: " if self.images > 1 else "") + (
            f"load {self.load:.1f}s, encode {self.encode:.1f}s, denoise {self.denoise:.1f}s "
            f"({per_step:.2f}s/step), decode {self.decode:.1f}s"
        )


@dataclass(frozen=True)
class Step:
    """What a step callback sees after step `index` (1-based) of `total`."""

    index: int
    total: int
    sigma: float
    sigma_next: float
    latents: mx.array  # packed latents after the step
    velocity: mx.array  # the transformer's output at this step
    seconds: float  # the step's compute time


def to_pixels(image: np.ndarray) -> np.ndarray:
    """A float image in [0, 1] as 8-bit pixels, as diffusers' image processor: x 255, round half to even."""
    return (image * 255).round().astype(np.uint8)


@dataclass
class GeneratedImage:
    pixels: np.ndarray  # uint8 [H, W, 3]
    record: dict  # the generation record stored in the PNG
    timings: Timings = field(default_factory=Timings)

    @property
    def image(self):
        from PIL import Image

        return Image.fromarray(self.pixels)

    def save(
        self, path: str | Path, export_json: bool = False, *, export_json_metadata: bool = False
    ) -> Path:
        """Write the PNG (and with export_json, `<path>.json`); refuses to overwrite a file.
        `export_json_metadata` is mflux's name for `export_json`."""
        path, export_json = Path(path), export_json or export_json_metadata
        for target in [path] + ([path.with_suffix(".json")] if export_json else []):
            if target.exists():
                raise FileExistsError(f"{target} exists; flux1 never overwrites a file")
        if not path.parent.is_dir():
            raise FileNotFoundError(f"--output {path}: folder {path.parent} does not exist")
        metadata.write_png(self.pixels, path, self.record)
        if export_json:
            metadata.write_json(self.record, path.with_suffix(".json"))
        return path


# Steps whose modulations are computed together: their count times the batch, at most this many rows.
# Each modulation layer is then one product over them instead of one per step (a quantized layer
# expanded once, not once a step); the 12B model's modulations are 4.2 MB of fp32 parameters a row.
MODULATION_ROWS = 16


def _step_modulations(transformer, sigmas, pooled: mx.array, guidance, dtype) -> Iterator[list]:
    """Each step's modulations (`FluxTransformer.step_modulations`) for the sigmas, a few steps at a
    time."""
    steps = max(1, MODULATION_ROWS // pooled.shape[0])
    for first in range(0, len(sigmas), steps):
        # diffusers passes (sigma * 1000) / 1000 in float32; the same rounding keeps us bit-close.
        t = np.asarray(sigmas[first : first + steps], np.float32) * np.float32(1000) / np.float32(1000)
        yield from transformer.step_modulations(mx.array(t), pooled, guidance, dtype)


def _at_own_precision(method):
    """The method computes at its Flux1's precision (on the CPU kernels: the plan's GEMM for it)."""

    @functools.wraps(method)
    def at_precision(self, *args, **kwargs):
        with cpu_plan.use(self.precision):
            return method(self, *args, **kwargs)

    return at_precision


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
        precision: str = "auto",
        group: mx.distributed.Group | None = None,
        tensor_parallel: bool = False,
    ):
        if quantize is not None:
            check_quantization(quantize, group_size)
        backend.compute_dtype(precision=precision)  # refuses an unknown or impossible precision now
        files.check()
        self.files, self.quantize, self.group_size, self.low_ram = files, quantize, group_size, low_ram
        self.precision = precision
        self.lora_paths = [str(p) for p in lora_paths or []]
        self.lora_scales = list(lora_scales) if lora_scales else [1.0] * len(self.lora_paths)
        check_lora_options(self.lora_paths, self.lora_scales)
        for path in self.lora_paths:
            check_lora_file(Path(path))
        self.lora_strict = lora_strict
        self._lora_applied: set[str] = set()
        self.lora_reports = [
            LoraReport(p, "", s, 0, sha256=file_digest(p)) for p, s in zip(self.lora_paths, self.lora_scales)
        ]
        self._models: dict[str, nn.Module] = {}
        self._dtypes: dict[str, mx.Dtype] = {}
        self._tokenizers: dict[tuple[str, int], PromptTokenizer] = {}
        self.load_seconds = 0.0  # reading (and quantizing) weights, all models so far
        self.saved_bits: int | str | None = None
        self._check_saved_quantization()
        # Several processes (mlx.launch): the same inputs on every rank; the transformer sharded.
        self.group, self.tensor_parallel = group, tensor_parallel
        if group is not None:
            agree_on_model(self, group)

    @classmethod
    def from_name(cls, name: str, **options) -> "Flux1":
        """`schnell` or `dev` from the Hugging Face hub (or a repo id)."""
        return cls(resolve(model=name), **options)

    @classmethod
    def from_alias(
        cls,
        alias: str,
        quantize: int | None = None,
        lora_paths: list[str] | None = None,
        lora_scales: list[float] | None = None,
        **options,
    ) -> "Flux1":
        """mflux's spelling of `from_name` (its README's snippet runs unchanged)."""
        return cls.from_name(
            alias, quantize=quantize, lora_paths=lora_paths, lora_scales=lora_scales, **options
        )

    @classmethod
    def from_path(cls, path: str | Path, base_model: str | None = None, **options) -> "Flux1":
        """A local diffusers folder, a folder saved by flux1, or a BFL single-file transformer."""
        return cls(resolve(path=path, base_model=base_model), **options)

    def load(self, name: str) -> nn.Module:
        """The network `name` (clip, t5, transformer or vae), read on first use and kept until
        released: quantized layer by layer as it is read, then LoRAs applied."""
        if name not in NETWORKS:
            raise ValueError(f"unknown network '{name}': expected one of {', '.join(NETWORKS)}")
        if name not in self._models:
            start = time.perf_counter()
            model = self._read(name)
            sharded = self.tensor_parallel and name == "transformer"  # kept lazy until sharded
            if self.quantize is not None and name != "vae":
                report = quantize_linears(model, self.quantize, self.group_size, evaluate=not sharded)
                if report.kept_dense:
                    log.info(
                        "%s: %d layers left dense (input width not a multiple of --group-size %d): %s",
                        name,
                        len(report.kept_dense),
                        self.group_size,
                        ", ".join(report.kept_dense),
                    )
            source = ShardSource(model, self.files) if sharded else None  # the weights as read
            if name != "vae":
                self._apply_loras(name, model)
            if sharded:
                shard_transformer(model, self.group, source)
            # Read now, so loading is timed as loading. The VAE's encoder is read only if a mode uses it.
            mx.eval((model.decoder if name == "vae" else model).parameters())
            self.load_seconds += time.perf_counter() - start
            self._models[name] = model
            self._dtypes[name] = backend.compute_dtype(backend.weights_dtype(model), self.precision)
        return self._models[name]

    def release(self, *names: str) -> None:
        """Drop the networks `names` (all if none is named) and give their memory back."""
        for name in names or NETWORKS:
            self._models.pop(name, None)
        gc.collect()
        mx.clear_cache()  # MLX keeps freed buffers for reuse; give them back

    def compute_dtype(self, name: str) -> mx.Dtype:
        """The activation dtype of a loaded network."""
        return self._dtypes[name]

    def save(self, path: str | Path) -> Path:
        """Write every network (quantized, LoRAs baked in) as a folder `main.py --path` loads."""
        if self.tensor_parallel:
            raise ValueError(
                "cannot save a tensor-parallel Flux1: each rank holds only its shard of the transformer; "
                "save from one process (without tensor_parallel)"
            )
        from flux1.saving import save_model

        return save_model(self, Path(path))

    def _read(self, name: str) -> nn.Module:
        root, files = self.files.root, self.files
        if name == "clip":
            return load_clip(root / "text_encoder")
        if name == "t5":
            return load_t5(root / "text_encoder_2")
        if name == "vae":
            return load_vae(files.vae)
        if files.transformer_format == "gguf":
            plan = functools.partial(cuts, group=self.group) if self.tensor_parallel else None
            return load_transformer_gguf(files.transformer, cuts=plan)
        return load_transformer(files.transformer)

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

    def _done_with(self, *names: str) -> None:
        if self.low_ram:
            self.release(*names)

    def _check_saved_quantization(self) -> None:
        if self.files.transformer_format != "saved":
            return
        folder = self.files.transformer
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
        if self.files.transformer_format == "gguf":
            return "gguf" if self.quantize is None else f"gguf + {self.quantize}"
        return self.quantize if self.quantize is not None else self.saved_bits

    def tokenizer(self, kind: str, max_length: int) -> PromptTokenizer:
        """The `clip` or `t5` tokenizer, padding and truncating to `max_length` tokens."""
        key = (kind, max_length)
        if key not in self._tokenizers:
            folder = self.files.root / ("tokenizer" if kind == "clip" else "tokenizer_2")
            self._tokenizers[key] = PromptTokenizer(folder, kind, max_length)
        return self._tokenizers[key]

    def encode_prompt(
        self, prompt: str, max_sequence_length: int, what: str = "prompt"
    ) -> tuple[mx.array, mx.array]:
        """(T5 hidden states [1, L, 4096], CLIP pooled [1, 768]), each in its network's dtype."""
        return self.encode_prompts([prompt], max_sequence_length, what)

    @_at_own_precision
    def encode_prompts(
        self, prompts: list[str], max_sequence_length: int, what: str = "prompt"
    ) -> tuple[mx.array, mx.array]:
        """The prompts through each encoder as one batch: ([P, L, 4096], [P, 768])."""
        clip, t5 = self.tokenizer("clip", CLIP_LENGTH), self.tokenizer("t5", max_sequence_length)
        ids = {clip: [], t5: []}
        for prompt in prompts:
            for tokenizer in ids:
                tokens = tokenizer(prompt)
                if tokens.truncated:
                    log.warning("%s", tokenizer.describe_truncation(tokens, what))
                ids[tokenizer].append(tokens.ids)
        pooled = self.load("clip")(mx.array(np.concatenate(ids[clip])), self.compute_dtype("clip"))
        mx.eval(pooled)
        self._done_with("clip")
        hidden = self.load("t5")(mx.array(np.concatenate(ids[t5])), self.compute_dtype("t5"))
        mx.eval(hidden)
        self._done_with("t5")
        return hidden, pooled

    @_at_own_precision
    def denoise(
        self,
        noise: mx.array,
        hidden: mx.array,
        pooled: mx.array,
        config: Config,
        steps: int,
        progress: bool = True,
        on_step: Callable[[Step], None] | None = None,
        conditioning: Conditioning | None = None,
    ) -> mx.array:
        """Packed latents after the Euler steps, from initial noise [1, 16, H/8, W/8], with what a
        mode adds (`conditioning`); `on_step` is called after each step (progress, previews, timing,
        cancelling by raising)."""
        mode = conditioning or Conditioning()
        transformer = self.load("transformer")
        dtype = self.compute_dtype("transformer")
        noise = latents.pack(noise.astype(mx.float32))
        image_tokens = noise.shape[1]
        schedule = sigmas(steps, image_tokens, self.files.scheduler_config())[mode.start_step :]
        x = noise if mode.image_latents is None else noised(mode.image_latents, noise, schedule[0])
        ids = latents.image_ids(config.height, config.width)
        if mode.tokens is not None:
            ids = mx.concatenate([ids, mode.token_ids], axis=1)
        batch = noise.shape[0]
        if mode.negative is not None:  # both prompts in one batch: [positives; negatives]
            negative_hidden, negative_pooled = mode.negative
            hidden = mx.concatenate([hidden, mx.broadcast_to(negative_hidden, hidden.shape)], axis=0)
            pooled = mx.concatenate([pooled, mx.broadcast_to(negative_pooled, pooled.shape)], axis=0)
        txt_ids = mx.zeros((1, hidden.shape[1], 3))
        guidance_scale = config.guidance_for(self.files.base_model)
        guidance = mx.array([guidance_scale], mx.float32) if transformer.guidance_embeds else None
        pairs = list(zip(schedule[:-1], schedule[1:]))
        modulations = _step_modulations(transformer, schedule[:-1], pooled, guidance, dtype)
        for index, (sigma, sigma_next) in enumerate(tqdm(pairs, disable=not progress, unit="step"), 1):
            start = time.perf_counter()
            v = transformer(mode.model_input(x, dtype), ids, hidden, txt_ids, modulations=next(modulations))
            v = v[:, :image_tokens].astype(mx.float32)  # Kontext: the reference tokens' output is unused
            if mode.negative is not None:
                v = v[batch:] + mode.true_cfg_scale * (v[:batch] - v[batch:])
            x = euler_step(x, v, sigma, sigma_next)
            if mode.blend_mask is not None:
                keep = noised(mode.image_latents, noise, sigma_next)
                x = (1 - mode.blend_mask) * keep + mode.blend_mask * x
            mx.eval(x)
            if on_step is not None:
                step = Step(
                    index, len(pairs), float(sigma), float(sigma_next), x, v, time.perf_counter() - start
                )
                on_step(step)
        # No reference left (the generator holds one too), so that --low-ram's release frees it here.
        del transformer, modulations
        self._done_with("transformer")
        return x

    def decode(self, packed: mx.array, config: Config) -> np.ndarray:
        """Float image [H, W, 3] in [0, 1]."""
        return self.decode_each(packed[:1], config)[0]

    @_at_own_precision
    def decode_each(self, packed: mx.array, config: Config) -> list[np.ndarray]:
        """The float image [H, W, 3] in [0, 1] of each packed latents [B, N, 64], one at a time (the
        VAE's activations stay one image's), the VAE loaded once."""
        vae = self.load("vae")
        images = []
        for row in range(packed.shape[0]):
            z = latents.unpack(packed[row : row + 1], config.height, config.width)
            z = (z / vae.scaling_factor + vae.shift_factor).astype(self.compute_dtype("vae"))
            image = mx.array(vae_tiles.decode(vae, z)) if config.vae_tiling else vae.decode(z)
            image = mx.clip(image.astype(mx.float32) / 2 + 0.5, 0.0, 1.0)
            mx.eval(image)
            images.append(np.array(image[0]))
        del vae  # so that --low-ram's release frees it
        self._done_with("vae")
        return images

    def generate_array(
        self,
        seed: int,
        prompt: str,
        config: Config,
        noise: mx.array | None = None,
        progress: bool = True,
        on_step: Callable[[Step], None] | None = None,
        inputs: ModeInputs | None = None,
    ) -> tuple[np.ndarray, dict, Timings]:
        """The float image [H, W, 3] in [0, 1] (before 8-bit rounding), its record and timings;
        `inputs` selects the mode (negative prompt, img2img, inpainting, Fill, Kontext, Canny, Depth)."""
        latents.check_seed(seed)
        each = None if on_step is None else (lambda _, step: on_step(step))
        (image,), (record,), timings = self.generate_arrays(
            [(prompt, seed)], config, noise, progress, each, inputs
        )
        return image, record, timings

    @_at_own_precision
    def generate_arrays(
        self,
        items: list[tuple[str, int]],
        config: Config,
        noise: mx.array | None = None,
        progress: bool = True,
        on_step: Callable[[int, Step], None] | None = None,
        inputs: ModeInputs | None = None,
    ) -> tuple[list[np.ndarray], list[dict], Timings]:
        """One batch through the encoders and the transformer (see `flux1.batch`): the float image and
        record of each (prompt, seed), and the batch's timings; `noise` [1, 16, H/8, W/8] replaces every
        seed's; `on_step(n, step)` sees image n's part of each step (its latents and velocity)."""
        inputs = inputs or ModeInputs()
        modes.select(self.files.base_model, inputs)  # refuses inputs this kind cannot use, before any work
        steps = config.steps_for(self.files.base_model)
        max_length = config.max_length_for(self.files.base_model)
        rows = modes.true_cfg.rows(inputs, len(items))
        check_fits(config, max_length + modes.added_tokens(self.files.base_model, inputs), rows)
        timings = Timings(steps=steps, images=len(items))
        loaded_before = self.load_seconds

        def timed(phase: str, compute):
            start, load_start = time.perf_counter(), self.load_seconds
            result = compute()
            setattr(timings, phase, time.perf_counter() - start - (self.load_seconds - load_start))
            return result

        def step_done(step: Step) -> None:
            timings.step_seconds.append(step.seconds)
            for n in range(len(items) if on_step is not None else 0):
                on_step(n, replace(step, latents=step.latents[n : n + 1], velocity=step.velocity[n : n + 1]))

        distinct = list(dict.fromkeys(prompt for prompt, _ in items))

        def encode():
            conditioning = modes.prepare(self, inputs, config, steps, max_length)
            self._done_with("vae")
            return self.encode_prompts(distinct, max_length), conditioning

        (hidden, pooled), conditioning = timed("encode", encode)
        timings.steps = steps - conditioning.start_step
        rows = mx.array([distinct.index(prompt) for prompt, _ in items])
        hidden, pooled = hidden[rows], pooled[rows]
        if noise is None:
            noise = mx.concatenate([latents.noise(seed, config.height, config.width) for _, seed in items])
        else:
            noise = mx.broadcast_to(noise, (len(items), *noise.shape[1:]))
        packed = timed(
            "denoise",
            lambda: self.denoise(noise, hidden, pooled, config, steps, progress, step_done, conditioning),
        )
        images = timed("decode", lambda: self.decode_each(packed, config))
        timings.load = self.load_seconds - loaded_before
        share = timings.total / len(items)
        records = [
            metadata.generation_record(self, seed, prompt, config, steps, max_length, share, inputs)
            for prompt, seed in items
        ]
        return images, records, timings

    def generate_images(
        self,
        seeds: list[int],
        prompts: str | list[str],
        config: Config | None = None,
        batch_size: int = 1,
        latents: mx.array | None = None,
        progress: bool = True,
        on_step: Callable[[int, Step], None] | None = None,
        **mode_inputs,
    ) -> list[GeneratedImage]:
        """An image for every prompt and seed (prompt-major, as main.py names them), `batch_size` at
        a time through the encoders and the transformer; `on_step(n, step)` sees image n's part of
        each step; `mode_inputs` as generate_image's. See `flux1.batch`."""
        from flux1.batch import generate_images

        return generate_images(
            self,
            seeds,
            prompts,
            config or Config(),
            batch_size,
            latents,
            progress,
            on_step,
            ModeInputs(**mode_inputs),
        )

    def generate_image(
        self,
        seed: int,
        prompt: str,
        config: Config | None = None,
        latents: mx.array | None = None,
        progress: bool = True,
        on_step: Callable[[Step], None] | None = None,
        **mode_inputs,
    ) -> GeneratedImage:
        """One image; `latents` injects the initial noise [1, 16, H/8, W/8] instead of the seed's.
        `mode_inputs` are ModeInputs' fields: negative_prompt, true_cfg_scale, image, image_strength,
        mask (images as paths or PIL images) and canny."""
        inputs = ModeInputs(**mode_inputs)
        image, record, timings = self.generate_array(
            seed, prompt, config or Config(), latents, progress, on_step, inputs
        )
        return GeneratedImage(to_pixels(image), record, timings)
