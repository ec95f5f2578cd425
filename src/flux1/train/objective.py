"""The flow-matching objective as diffusers' train_dreambooth_lora_flux.py computes it.

A timestep is drawn as `compute_density_for_timestep_sampling` draws u, taken from the training
scheduler's 1000 sigmas (diffusers' FlowMatchEulerDiscreteScheduler as constructed: statically
shifted, unshifted when the shift is dynamic), the latents are noised as `(1 - sigma) x + sigma noise`,
and the velocity is regressed on `noise - x` with the scheme's loss weighting."""

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from flux1 import latents

SCHEMES = ("logit_normal", "sigma_sqrt", "mode", "cosmap", "none")
TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class Weighting:
    scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    def sample_u(self, batch: int, key: mx.array) -> mx.array:
        if self.scheme == "logit_normal":
            return mx.sigmoid(self.logit_mean + self.logit_std * mx.random.normal((batch,), key=key))
        u = mx.random.uniform(shape=(batch,), key=key)
        if self.scheme == "mode":
            u = 1 - u - self.mode_scale * (mx.cos(math.pi * u / 2) ** 2 - 1 + u)
        return u

    def loss_weights(self, sigmas: mx.array) -> mx.array:
        if self.scheme == "sigma_sqrt":
            return sigmas**-2.0
        if self.scheme == "cosmap":
            return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
        return mx.ones_like(sigmas)


def training_sigmas(scheduler_config: dict) -> mx.array:
    """float32 [1000], from 1 down to 1/1000: the training scheduler's sigmas."""
    timesteps = np.linspace(1, TRAIN_TIMESTEPS, TRAIN_TIMESTEPS, dtype=np.float32)[::-1].copy()
    sigmas = timesteps / np.float32(TRAIN_TIMESTEPS)
    if not scheduler_config.get("use_dynamic_shifting", False):
        shift = np.float32(scheduler_config.get("shift", 1.0))
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return mx.array(sigmas.astype(np.float32))


def sigmas_of(u: mx.array, table: mx.array) -> mx.array:
    """`indices = (u * 1000).long()`, kept inside the table ("mode" can reach u = 1)."""
    indices = mx.clip(mx.floor(u * TRAIN_TIMESTEPS), 0, TRAIN_TIMESTEPS - 1).astype(mx.int32)
    return table[indices]


@dataclass
class Batch:
    """Cached inputs of one step: clean latents [B, 16, h, w] (scaled and shifted), T5 hidden states,
    CLIP pooled embeddings (or, while CLIP trains, its token ids [B, 77] to compute them from), the noise
    and sigmas [B]."""

    latents: mx.array
    hidden: mx.array
    pooled: mx.array | None
    noise: mx.array
    sigmas: mx.array
    clip_ids: mx.array | None = None


def loss(transformer, batch: Batch, weighting: Weighting, guidance: float | None) -> mx.array:
    """Weighted MSE between the predicted velocity and `noise - x`, mean per image then over the batch.
    Computed on packed tokens: packing only permutes values, so the mean is the same."""
    x, noise = batch.latents, batch.noise
    count, _, h, w = x.shape
    sigma = batch.sigmas.reshape(-1, 1, 1, 1)
    noisy = latents.pack((1.0 - sigma) * x + sigma * noise)
    # diffusers passes `timesteps / 1000` with timesteps = sigmas * 1000, both in float32.
    timesteps = (batch.sigmas * TRAIN_TIMESTEPS) / TRAIN_TIMESTEPS
    guidance_in = mx.full((count,), guidance, mx.float32) if transformer.guidance_embeds else None
    image_ids = mx.broadcast_to(latents.image_ids(h * 8, w * 8), (count, h * w // 4, 3))
    text_ids = mx.zeros((count, batch.hidden.shape[1], 3))
    prediction = transformer(noisy, image_ids, batch.hidden, text_ids, timesteps, batch.pooled, guidance_in)
    target = latents.pack(noise - x)
    weights = weighting.loss_weights(batch.sigmas).reshape(-1, 1, 1)
    per_image = (weights * (prediction.astype(mx.float32) - target) ** 2).reshape(count, -1).mean(axis=1)
    return per_image.mean()
