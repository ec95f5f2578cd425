"""The flow-matching Euler sampler as diffusers' FluxPipeline + FlowMatchEulerDiscreteScheduler compute it."""

import math

import numpy as np


def shift_mu(image_tokens: int, config: dict) -> float:
    """Linear in the number of image tokens, from base_shift at base_image_seq_len to max_shift at max."""
    slope = (config["max_shift"] - config["base_shift"]) / (
        config["max_image_seq_len"] - config["base_image_seq_len"]
    )
    return config["base_shift"] + slope * (image_tokens - config["base_image_seq_len"])


def sigmas(steps: int, image_tokens: int, config: dict) -> np.ndarray:
    """float32 [steps + 1]: linspace(1, 1/steps), shifted (dynamically for dev, statically by `shift`
    otherwise), then 0."""
    if steps < 1:
        raise ValueError(f"--steps {steps}: expected at least 1")
    base = np.linspace(1.0, 1.0 / steps, steps).astype(
        np.float32
    )  # float32 arithmetic from here, as diffusers
    if config.get("use_dynamic_shifting", False):
        mu = shift_mu(image_tokens, config)
        shifted = math.exp(mu) / (math.exp(mu) + (1 / base - 1) ** 1.0)
    else:
        shift = config.get("shift", 1.0)
        shifted = shift * base / (1 + (shift - 1) * base)
    return np.append(shifted.astype(np.float32), np.float32(0.0))


def euler_step(latents, velocity, sigma: float, sigma_next: float):
    """x <- x + (sigma_next - sigma) v, in float32."""
    return latents + (np.float32(sigma_next) - np.float32(sigma)) * velocity.astype(latents.dtype)
