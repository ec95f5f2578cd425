"""Initial noise, 2x2 patch packing and position ids of the latents."""

from pathlib import Path

import mlx.core as mx
import numpy as np

LATENT_CHANNELS = 16
MAX_SEED = 2**64 - 1  # MLX's random keys are 64-bit


def check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ValueError(f"--seed {seed!r}: expected a whole number")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"--seed {seed}: expected 0 to 2**64 - 1")


def noise(seed: int, height: int, width: int) -> mx.array:
    """Standard normal latents [1, 16, H/8, W/8] from the seed alone: MLX's counter-based generator
    (threefry) gives the same values for the same key on every run and machine."""
    return mx.random.normal((1, LATENT_CHANNELS, height // 8, width // 8), key=mx.random.key(seed))


def load_noise(path: Path, height: int, width: int) -> mx.array:
    """Injected initial latents from a .npy file of shape (1, 16, H/8, W/8), finite floats."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"--latents {path}: cannot be read as a .npy array ({e})") from None
    if not isinstance(array, np.ndarray):
        array.close()
        raise ValueError(f"--latents {path}: an .npz archive, expected one .npy array")
    expected = (1, LATENT_CHANNELS, height // 8, width // 8)
    if array.shape != expected:
        raise ValueError(
            f"--latents {path}: shape {array.shape}, expected {expected} for {width}x{height} (1, 16, H/8, W/8)"
        )
    if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
        raise ValueError(f"--latents {path}: expected finite floating-point values ({array.dtype})")
    return mx.array(array.astype(np.float32))


def pack(latents: mx.array) -> mx.array:
    """[B, 16, h, w] -> tokens of 2x2 patches [B, h/2 * w/2, 64], features in (channel, ph, pw) order."""
    batch, channels, h, w = latents.shape
    x = latents.reshape(batch, channels, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(batch, (h // 2) * (w // 2), channels * 4)


def unpack(tokens: mx.array, height: int, width: int) -> mx.array:
    """Inverse of `pack`, to NHWC latents [B, H/8, W/8, 16] for the VAE."""
    batch = tokens.shape[0]
    h, w = height // 16, width // 16
    x = tokens.reshape(batch, h, w, LATENT_CHANNELS, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(batch, 2 * h, 2 * w, LATENT_CHANNELS)


def image_ids(height: int, width: int) -> mx.array:
    """[1, tokens, 3] position ids (0, row, col) of the packed image tokens."""
    h, w = height // 16, width // 16
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 1] = np.arange(h)[:, None]
    ids[..., 2] = np.arange(w)[None, :]
    return mx.array(ids.reshape(1, h * w, 3))
