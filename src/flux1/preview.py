"""Fast latent previews of a generation in progress, without the VAE.

After each Euler step the denoised estimate `x0 = x - sigma * v` (x the step's input at `sigma`, v the
velocity; equally `x_next - sigma_next * v`) is unpacked to [h, w, 16] latent pixels and each latent
pixel becomes one RGB pixel through a 16x3 linear map plus a bias: 1/8 of the image's size, in
microseconds where a VAE decode takes seconds.

Where the map comes from: `fit` solves it by least squares against the VAE it previews for, on seeded
standard-normal latents (what the sampler starts from, and the latents' trained distribution), their
decodes average-pooled over each 8x8 pixel block. It is fitted once per VAE file, when a model is first
loaded: one 128x128 decode (1/16 of a 512x512 one; 1.6 s for the tiny test fixture on 2 CPU cores). Fitting on the weights in use rather than shipping the coefficients the community uses for
the FLUX.1 VAE (ComfyUI's `latent_rgb_factors`) keeps the preview right for every VAE flux1 loads,
random-weight fixtures included, and gives a figure of its fit (`LatentToRGB.error`: the relative RMS
residual; 0.93 on the tiny fixture, whose random VAE is far from linear, so its previews are rough)."""

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from flux1 import latents

FIT_SIDE = 16  # latent pixels per side of the fitting latents (a 128x128 image: 256 samples, 17 unknowns)


@dataclass(frozen=True)
class LatentToRGB:
    """RGB in [0, 1] = latent pixel (16 channels, sampling space) @ weights + bias."""

    weights: np.ndarray  # [16, 3]
    bias: np.ndarray  # [3]
    error: float  # relative RMS error of the fit against the pooled decodes

    def __call__(self, latent_pixels: np.ndarray) -> np.ndarray:
        """[h, w, 16] -> uint8 RGB [h, w, 3]."""
        rgb = latent_pixels.astype(np.float32) @ self.weights + self.bias
        return (np.clip(rgb, 0.0, 1.0) * 255).round().astype(np.uint8)


def denoised(packed: mx.array, velocity: mx.array, sigma_next: float) -> mx.array:
    """x0 from a step's output: packed latents after the step (at sigma_next) and its velocity."""
    return packed.astype(mx.float32) - sigma_next * velocity.astype(mx.float32)


def preview(step, height: int, width: int, rgb: LatentToRGB) -> np.ndarray:
    """uint8 RGB [H/8, W/8, 3] of a `flux1.pipeline.Step`'s denoised estimate."""
    x0 = denoised(step.latents, step.velocity, step.sigma_next)
    return rgb(np.array(latents.unpack(x0, height, width)[0]))


def fit(vae, dtype: mx.Dtype = mx.float32, seed: int = 0) -> LatentToRGB:
    """Least-squares 16x3 map + bias from latents to the VAE's decodes (see the module docstring)."""
    z = mx.random.normal((1, FIT_SIDE, FIT_SIDE, latents.LATENT_CHANNELS), key=mx.random.key(seed))
    image = vae.decode((z / vae.scaling_factor + vae.shift_factor).astype(dtype))
    image = np.array(image.astype(mx.float32)[0]) / 2 + 0.5  # as the pipeline maps it, unclipped
    side = image.shape[0] // FIT_SIDE
    pooled = image.reshape(FIT_SIDE, side, FIT_SIDE, side, 3).mean(axis=(1, 3)).reshape(-1, 3)
    inputs = np.array(z[0]).reshape(-1, latents.LATENT_CHANNELS)
    design = np.concatenate([inputs, np.ones((len(inputs), 1), np.float32)], axis=1).astype(np.float64)
    solution, *_ = np.linalg.lstsq(design, pooled.astype(np.float64), rcond=None)
    residual = design @ solution - pooled
    error = float(
        np.sqrt((residual**2).mean()) / max(np.sqrt(((pooled - pooled.mean(0)) ** 2).mean()), 1e-12)
    )
    return LatentToRGB(solution[:-1].astype(np.float32), solution[-1].astype(np.float32), error)
