"""Latents and text embeddings computed once before training (so the VAE and the text encoders are
released), and the batches each step draws from them. A CLIP that trains is kept: its pooled output
changes each step, so its token ids are cached instead.

Every random draw of a micro-step (which images, the VAE posterior sample, the noise, the timestep)
is a function of (seed, micro-step), so a resumed run draws what an uninterrupted one would."""

import logging
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from flux1.train import models
from flux1.train.data import Example, load_pixels
from flux1.train.objective import Batch, Weighting, sigmas_of

log = logging.getLogger("flux1")


@dataclass
class CachedImage:
    mean: mx.array  # [1, 16, h, w], scaled and shifted: (mean - shift) * scale
    std: mx.array  # [1, 16, h, w], times the scale
    hidden: mx.array  # [1, L, D]
    pooled: mx.array | None  # [1, P]; None while CLIP trains
    clip_ids: mx.array | None  # [1, 77] while CLIP trains
    size: tuple[int, int]  # the bucket (width, height)


def cache_examples(
    flux, examples: list[Example], resolution: int, max_length: int, train_clip: bool
) -> list[CachedImage]:
    """The VAE's posterior of each image (diffusers' trainer samples it anew each step) and each
    caption's embeddings; the VAE and T5 are released after, and CLIP unless it trains (then each
    caption's CLIP tokens are kept in place of its pooled embedding)."""
    vae = models.load(flux, "vae")
    channels = vae.config["latent_channels"]
    posteriors = []
    for example in examples:
        moments = vae.encoder(mx.array(load_pixels(example.image, resolution))[None])
        mean, logvar = moments[..., :channels], mx.clip(moments[..., channels:], -30.0, 20.0)
        mean = ((mean - vae.shift_factor) * vae.scaling_factor).transpose(0, 3, 1, 2)
        std = (mx.exp(0.5 * logvar) * vae.scaling_factor).transpose(0, 3, 1, 2)
        mx.eval(mean, std)
        posteriors.append((mean, std))
    models.release(flux, "vae")
    embeddings = {}
    for caption in dict.fromkeys(e.caption for e in examples):
        hidden, pooled = models.encode(flux, caption, max_length)
        embeddings[caption] = (
            (hidden, None, models.clip_ids(flux, caption)) if train_clip else (hidden, pooled, None)
        )
        mx.eval(hidden, pooled)
    models.release(flux, "t5")
    if not train_clip:
        models.release(flux, "clip")
    log.info(
        "cached %d images and %d captions; VAE and %s released",
        len(examples),
        len(embeddings),
        "T5" if train_clip else "text encoders",
    )
    return [
        CachedImage(mean, std, *embeddings[e.caption], (mean.shape[3] * 8, mean.shape[2] * 8))
        for e, (mean, std) in zip(examples, posteriors)
    ]


def micro_step_key(seed: int, micro_step: int) -> mx.array:
    return mx.random.key(int(np.random.SeedSequence([seed, micro_step]).generate_state(1)[0]))


class BatchDrawer:
    """Epochs of batches of images of one bucket each, in an order fixed by (seed, epoch)."""

    def __init__(self, images: list[CachedImage], batch_size: int, seed: int, weighting: Weighting, sigmas):
        self.images, self.batch_size, self.seed = images, batch_size, seed
        self.weighting, self.sigmas = weighting, sigmas
        self.groups: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            self.groups.setdefault(image.size, []).append(i)
        self.per_epoch = sum(-(-len(g) // batch_size) for g in self.groups.values())

    def indices(self, micro_step: int) -> list[int]:
        epoch, position = divmod(micro_step, self.per_epoch)
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for size in sorted(self.groups):
            order = rng.permutation(self.groups[size])
            batches += [
                order[k : k + self.batch_size].tolist() for k in range(0, len(order), self.batch_size)
            ]
        return batches[rng.permutation(len(batches))[position]]

    def draw(self, micro_step: int) -> Batch:
        chosen = [self.images[i] for i in self.indices(micro_step)]
        posterior, noise_key, time_key = mx.random.split(micro_step_key(self.seed, micro_step), 3)
        mean = mx.concatenate([c.mean for c in chosen])
        std = mx.concatenate([c.std for c in chosen])
        return Batch(
            latents=mean + std * mx.random.normal(mean.shape, key=posterior),
            hidden=mx.concatenate([c.hidden for c in chosen]),
            pooled=_joined([c.pooled for c in chosen]),
            noise=mx.random.normal(mean.shape, key=noise_key),
            sigmas=sigmas_of(self.weighting.sample_u(len(chosen), time_key), self.sigmas),
            clip_ids=_joined([c.clip_ids for c in chosen]),
        )


def _joined(arrays: list[mx.array | None]) -> mx.array | None:
    return None if arrays[0] is None else mx.concatenate(arrays)
