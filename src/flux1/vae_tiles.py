"""Decoding in overlapping tiles (`--vae-tiling`), as diffusers' `AutoencoderKL.tiled_decode`: the
latents cut into tiles of the VAE's `sample_size` (1024 pixels for FLUX.1's, 128 latents) whose
starts are three quarters of a tile apart; each tile decoded alone, so the decoder's activations are a
tile's whatever the image's size; each overlap blended linearly into a tile from the tile above and
then the tile on its left, in diffusers' order (tiles blend in place, so a blended tile blends on);
each tile's first three quarters (the last tiles whole) make the image. The decoder's group norms see a
tile at a time, so the image differs a little from one decoded whole."""

import mlx.core as mx
import numpy as np

OVERLAP = 0.25


def latent_tile(vae_config: dict) -> int:
    return vae_config["sample_size"] // 2 ** (len(vae_config["block_out_channels"]) - 1)


def needed(vae_config: dict, z: mx.array) -> bool:
    """Whether latents [B, h, w, C] are larger than one tile (diffusers decodes them whole otherwise)."""
    return max(z.shape[1], z.shape[2]) > latent_tile(vae_config)


def _blend(before: np.ndarray, tile: np.ndarray, extent: int, axis: int) -> None:
    """The first `extent` rows (axis 1) or columns (axis 2) of `tile` from `before`'s last ones."""
    extent = min(before.shape[axis], tile.shape[axis], extent)
    shape = [1, 1, 1, 1]
    shape[axis] = extent
    weight = (np.arange(extent) / extent).astype(np.float32).reshape(shape)
    head = tile[:, :extent] if axis == 1 else tile[:, :, :extent]
    tail = before[:, before.shape[1] - extent :] if axis == 1 else before[:, :, before.shape[2] - extent :]
    head[...] = tail * (np.float32(1) - weight) + head * weight


def decode(vae, z: mx.array) -> np.ndarray:
    """The float32 image [B, H, W, 3] of latents [B, h, w, C] (scaled as `vae.decode` takes them)."""
    size = latent_tile(vae.config)
    stride = int(size * (1 - OVERLAP))
    blend = int(vae.config["sample_size"] * OVERLAP)
    keep = vae.config["sample_size"] - blend

    def decoded(top: int, left: int) -> np.ndarray:
        return np.array(vae.decode(z[:, top : top + size, left : left + size]).astype(mx.float32))

    rows = [
        [decoded(top, left) for left in range(0, z.shape[2], stride)] for top in range(0, z.shape[1], stride)
    ]
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            if i > 0:
                _blend(rows[i - 1][j], tile, blend, axis=1)
            if j > 0:
                _blend(row[j - 1], tile, blend, axis=2)
    return np.concatenate([np.concatenate([t[:, :keep, :keep] for t in row], axis=2) for row in rows], axis=1)
