"""What a generation mode adds to the text-to-image denoising loop (`Flux1.denoise`)."""

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from flux1 import latents, vae_tiles


@dataclass(frozen=True)
class Conditioning:
    """The defaults add nothing: plain text to image."""

    start_step: int = 0  # steps of the schedule skipped (img2img: int(steps * strength))
    # [1, N, 64] packed latents of the input image: the start is `sigma * noise + (1 - sigma) * these`
    image_latents: mx.array | None = None
    # [1, N, 64] 1 = repaint, 0 = after each step, replaced by image_latents re-noised to the next sigma
    blend_mask: mx.array | None = None
    channels: mx.array | None = None  # [1, N, C] concatenated to the latents' features (Fill, Canny, Depth)
    tokens: mx.array | None = None  # [1, M, 64] appended to the image tokens (Kontext's reference)
    token_ids: mx.array | None = None  # [1, M, 3] their position ids
    # a second prompt (T5 hidden, CLIP pooled) whose velocity v_neg gives v_neg + scale (v - v_neg)
    negative: tuple[mx.array, mx.array] | None = None
    true_cfg_scale: float = 1.0

    def model_input(self, x: mx.array, dtype: mx.Dtype) -> mx.array:
        """The transformer's image input: the latents [B, N, 64] of a batch with the mode's channels
        and tokens (shared by the batch), twice over with a negative prompt ([positive; negative])."""
        batch = x.shape[0]
        if self.channels is not None:
            x = mx.concatenate(
                [x, mx.broadcast_to(self.channels, (batch, *self.channels.shape[1:]))], axis=-1
            )
        if self.tokens is not None:
            x = mx.concatenate([x, mx.broadcast_to(self.tokens, (batch, *self.tokens.shape[1:]))], axis=1)
        if self.negative is not None:
            x = mx.concatenate([x, x], axis=0)
        return x.astype(dtype)


def noised(image_latents: mx.array, noise: mx.array, sigma) -> mx.array:
    """The image's latents at noise level sigma, as the scheduler's scale_noise (float32)."""
    sigma = np.float32(sigma)
    return noise * mx.array(sigma) + image_latents * mx.array(np.float32(1) - sigma)


def encode_pixels(flux, pixels: mx.array, config) -> mx.array:
    """Packed latents [1, h/2 * w/2, 64] of pixels [1, H, W, 3] in [-1, 1]: the mean of the VAE's
    latent distribution (in tiles with `config.vae_tiling`), shifted and scaled as the transformer sees
    latents."""
    vae = flux.load("vae")
    pixels = pixels.astype(flux.compute_dtype("vae"))
    z = (
        mx.array(vae_tiles.encode(vae, pixels))
        if config.vae_tiling
        else vae.encode(pixels).astype(mx.float32)
    )
    z = (z - vae.shift_factor) * vae.scaling_factor
    packed = latents.pack(z.transpose(0, 3, 1, 2))  # NHWC -> NCHW, as the noise is
    mx.eval(packed)
    return packed
