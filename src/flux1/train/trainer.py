"""A training run: cache, then steps of AdamW on the adapters only, checkpoints, validation images,
the loss curve and the LoRA file."""

import dataclasses
import datetime
import logging
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map
from tqdm import tqdm

import flux1
from flux1 import backend, cpu_plan, latents, metadata
from flux1.configs import MAX_SEQUENCE_LENGTH
from flux1.train import files, loss_curve, models
from flux1.train.adapters import TrainedAdapters, attach
from flux1.train.cache import BatchDrawer, cache_examples
from flux1.train.checkpointing import checkpointed_blocks
from flux1.train.data import data_hash, find_examples
from flux1.train.objective import Batch, Weighting, loss, training_sigmas
from flux1.train.options import TrainOptions

log = logging.getLogger("flux1")


def loss_and_gradients(
    transformer,
    trained: TrainedAdapters,
    batch: Batch,
    weighting: Weighting,
    guidance: float,
    clip=None,
    cpu_kernels: bool | None = None,
):
    """One micro-batch's loss and the gradients of the adapters' parameters, in fp32, differentiated by
    MLX (`backend.training`: with `cpu_kernels`, by default where the base is quantized, on the CPU
    the linear layers and attention through the plan's fp32 GEMMs), blocks checkpointed. With `clip` (CLIP training too), the pooled embedding is computed from the batch's
    CLIP tokens inside the differentiated function, in fp32, so the gradients reach CLIP's adapters."""

    def objective(batch: Batch) -> mx.array:
        if clip is not None:
            batch = dataclasses.replace(batch, pooled=clip(batch.clip_ids))
        return loss(transformer, batch, weighting, guidance)

    if cpu_kernels is None:
        cpu_kernels = any(_quantized(network) for network in (transformer, clip) if network is not None)
    with backend.training(cpu_kernels), cpu_plan.use("fp32"), checkpointed_blocks(transformer, trained):
        value, gradients = nn.value_and_grad(trained, objective)(batch)
        mx.eval(value, gradients)
    return value, gradients


def _quantized(network) -> bool:
    return any(getattr(module, "is_quantized", False) for _, module in network.named_modules())


def make_optimizer(options: TrainOptions, trained: TrainedAdapters) -> optim.Optimizer:
    """AdamW as torch's, on the transformer's adapters and, while CLIP trains, on CLIP's as a second
    parameter group (its own rate and weight decay, the same schedule), as diffusers' trainer has it."""
    transformer = _adamw(options, options.learning_rate, options.weight_decay)
    if "clip" not in trained.components:
        return transformer
    clip = _adamw(options, options.text_encoder_lr, options.text_encoder_weight_decay)
    return optim.MultiOptimizer([clip, transformer], [lambda path, _: trained.component_of(path) == "clip"])


def _adamw(options: TrainOptions, peak: float, weight_decay: float) -> optim.AdamW:
    """Bias-corrected, decoupled weight decay; warm-up then the schedule."""
    warmup = options.lr_warmup_steps
    decay_steps = max(1, options.steps - warmup)
    schedule = {
        "constant": lambda _: mx.array(peak, mx.float32),
        "linear": optim.linear_schedule(peak, 0.0, decay_steps),
        "cosine": optim.cosine_decay(peak, decay_steps),
    }[options.lr_schedule]
    if warmup:
        schedule = optim.join_schedules([optim.linear_schedule(0.0, peak, warmup), schedule], [warmup])
    return optim.AdamW(
        schedule, betas=[0.9, 0.999], eps=1e-8, weight_decay=weight_decay, bias_correction=True
    )


class Run:
    def __init__(self, options: TrainOptions):
        options.check()
        self.options = options
        self.output = Path(options.output)
        self.examples = find_examples(Path(options.data))
        self.data_sha256 = data_hash(self.examples)
        self.flux = models.open_base(options)
        self.weighting = Weighting(
            options.weighting_scheme, options.logit_mean, options.logit_std, options.mode_scale
        )
        self.record = {"options": options.identity(), "data_sha256": self.data_sha256}
        self.losses: list[float] = []

    def train(self) -> Path:
        o, flux = self.options, self.flux
        images = cache_examples(
            flux, self.examples, o.resolution, o.max_sequence_length, o.train_text_encoder
        )
        validation = None
        if o.validation_prompt:
            validation = models.encode(flux, o.validation_prompt, MAX_SEQUENCE_LENGTH[flux.files.base_model])
            self.validation_ids = models.clip_ids(flux, o.validation_prompt)
            models.release(flux, "t5")
        if not o.train_text_encoder:
            models.release(flux, "clip")
        networks = {"transformer": models.load(flux, "transformer")}
        if o.train_text_encoder:
            networks["clip"] = models.load(flux, "clip")
        self.transformer, self.clip = transformer, clip = networks["transformer"], networks.get("clip")
        self.trained = trained = attach(networks, o.target, o.rank, o.lora_alpha, mx.random.key(o.seed))
        mx.eval(trained.parameters())
        log.info(
            "training %d adapters (rank %d, %s%s) on %d images",
            len(trained.adapters),
            o.rank,
            o.target,
            " + CLIP attention" if clip is not None else "",
            len(images),
        )
        optimizer = make_optimizer(o, trained)
        optimizer.init(trained.trainable_parameters())
        start = 0
        if o.resume:
            saved = files.load_checkpoint(Path(o.resume), trained, optimizer, self.record)
            start, self.losses = saved["step"], saved.get("losses", [])
            log.info("resumed from %s at step %d", o.resume, start)
        self.drawer = drawer = BatchDrawer(
            images, o.batch_size, o.seed, self.weighting, training_sigmas(flux.files.scheduler_config())
        )
        guidance = o.guidance
        bar = tqdm(range(start, o.steps), initial=start, total=o.steps, unit="step")
        for step in bar:
            began = time.perf_counter()
            total, gradients = 0.0, None
            for micro in range(o.gradient_accumulation):
                batch = drawer.draw(step * o.gradient_accumulation + micro)
                value, grads = loss_and_gradients(transformer, trained, batch, self.weighting, guidance, clip)
                gradients = grads if gradients is None else tree_map(mx.add, gradients, grads)
                total += value.item()
            gradients = tree_map(lambda g: g / o.gradient_accumulation, gradients)
            if o.max_grad_norm > 0:
                gradients, _ = optim.clip_grad_norm(gradients, o.max_grad_norm)
            optimizer.update(trained, gradients)
            mx.eval(trained.parameters(), optimizer.state)
            self.losses.append(total / o.gradient_accumulation)
            bar.set_postfix(loss=f"{self.losses[-1]:.4f}", s_per_step=f"{time.perf_counter() - began:.2f}")
            done = step + 1
            if o.checkpoint_every and done % o.checkpoint_every == 0 and done < o.steps:
                self._checkpoint(trained, optimizer, done)
            if validation and o.validation_every and done % o.validation_every == 0 and done < o.steps:
                self._validate(validation, done)
        if validation:
            self._validate(validation, o.steps)
        loss_curve.draw(
            self.output.with_name(f"{self.output.stem}_loss.png"),
            list(range(1, len(self.losses) + 1)),
            self.losses,
        )
        files.write_lora(self.output, trained, o.format, o.rank, o.lora_alpha, o.target, self._final_record())
        log.info(
            "saved %s (%s, %d layers, final loss %.4f)",
            self.output,
            o.format,
            len(trained.adapters),
            self.losses[-1] if self.losses else float("nan"),
        )
        return self.output

    def _checkpoint(self, trained, optimizer, step: int) -> None:
        path = files.checkpoint_path(self.output, step)
        files.save_checkpoint(path, trained, optimizer, step, {**self.record, "losses": self.losses})

    def _validate(self, embeddings, step: int) -> None:
        o = self.options
        hidden, pooled = embeddings
        if self.clip is not None:  # the pooled embedding of CLIP with its adapters as trained so far
            pooled = self.clip(self.validation_ids)
        noise = latents.noise(o.seed, o.resolution, o.resolution)
        pixels = models.draw(self.flux, noise, hidden, pooled, o.resolution, o.guidance, o.validation_steps)
        if o.low_ram:
            models.release(self.flux, "vae")
        folder = self.output.with_name(f"{self.output.stem}_validation")
        folder.mkdir(exist_ok=True)
        record = {
            "prompt": o.validation_prompt,
            "base_model": self.flux.files.base_model,
            "model": self.flux.files.name,
            "seed": o.seed,
            "steps": o.validation_steps or models.DEFAULT_STEPS[self.flux.files.base_model],
            "guidance": o.guidance if self.flux.files.base_model == "dev" else None,
            "height": o.resolution,
            "width": o.resolution,
            "training_step": step,
            "version": flux1.__version__,
        }
        metadata.write_png(pixels, folder / f"step_{step:06d}.png", record)

    def _final_record(self) -> dict:
        flux = self.flux
        return {
            "base_model": flux.files.base_model,
            "model": flux.files.name,
            "gguf": str(flux.files.transformer) if flux.files.transformer.suffix == ".gguf" else None,
            "quantize": flux.quantization_bits,
            "data_sha256": self.data_sha256,
            "images": len(self.examples),
            "steps": self.options.steps,
            "final_loss": self.losses[-1] if self.losses else None,
            "options": self.options.record(),
            "version": flux1.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
