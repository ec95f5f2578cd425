"""Decoding and encoding in overlapping tiles (`--vae-tiling`), as diffusers' `AutoencoderKL` with
`enable_tiling()`: an image larger than the VAE's `sample_size` (1024 pixels for FLUX.1's, 128
latents) is cut into tiles of that size whose starts are three quarters of a tile apart; each tile goes
through the decoder (or encoder) alone, so its activations are a tile's whatever the image's size;
each overlap of the outputs is blended linearly into a tile from the tile above and then the tile on
its left, in diffusers' order (tiles blend in place, so a blended tile blends on); each output tile's
first three quarters (the last tiles whole) make the result. The group norms see a tile at a time, so
the result differs a little from one computed whole. An image no larger than a tile is computed whole."""

from collections.abc import Callable

import mlx.core as mx
import numpy as np

OVERLAP = 0.25


def latent_tile(vae_config: dict) -> int:
    return vae_config["sample_size"] // 2 ** (len(vae_config["block_out_channels"]) - 1)


def _blend(before: np.ndarray, tile: np.ndarray, extent: int, axis: int) -> None:
    """The first `extent` rows (axis 1) or columns (axis 2) of `tile` from `before`'s last ones."""
    extent = min(before.shape[axis], tile.shape[axis], extent)
    shape = [1, 1, 1, 1]
    shape[axis] = extent
    weight = (np.arange(extent) / extent).astype(np.float32).reshape(shape)
    head = tile[:, :extent] if axis == 1 else tile[:, :, :extent]
    tail = before[:, before.shape[1] - extent :] if axis == 1 else before[:, :, before.shape[2] - extent :]
    head[...] = tail * (np.float32(1) - weight) + head * weight


def _tiled(network: Callable[[mx.array], mx.array], x: mx.array, size: int, out_size: int) -> np.ndarray:
    """network(x) [B, H', W', C'] tile by tile: tiles of `size` of x, tiles of `out_size` of the output
    (whole where x is no larger than a tile, as diffusers)."""
    if max(x.shape[1], x.shape[2]) <= size:
        return np.array(network(x).astype(mx.float32))
    stride = int(size * (1 - OVERLAP))
    blend = int(out_size * OVERLAP)
    keep = out_size - blend

    def computed(top: int, left: int) -> np.ndarray:
        return np.array(network(x[:, top : top + size, left : left + size]).astype(mx.float32))

    rows = [
        [computed(top, left) for left in range(0, x.shape[2], stride)] for top in range(0, x.shape[1], stride)
    ]
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            if i > 0:
                _blend(rows[i - 1][j], tile, blend, axis=1)
            if j > 0:
                _blend(row[j - 1], tile, blend, axis=2)
    return np.concatenate([np.concatenate([t[:, :keep, :keep] for t in row], axis=2) for row in rows], axis=1)


def decode(vae, z: mx.array) -> np.ndarray:
    """The float32 image [B, H, W, 3] of latents [B, h, w, C] (scaled as `vae.decode` takes them)."""
    return _tiled(vae.decode, z, latent_tile(vae.config), vae.config["sample_size"])


def encode(vae, pixels: mx.array) -> np.ndarray:
    """The float32 latents [B, H/8, W/8, C] (the posterior's mean) of pixels [B, H, W, 3]."""
    return _tiled(vae.encode, pixels, vae.config["sample_size"], latent_tile(vae.config))
