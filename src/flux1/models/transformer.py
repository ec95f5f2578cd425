"""The FLUX.1 rectified-flow transformer (19 double-stream + 38 single-stream blocks for the real model)."""

import mlx.core as mx
import mlx.nn as nn

from flux1.configs import AXES_DIMS_ROPE, MLP_RATIO, ROPE_THETA
from flux1.models.embeddings import MLPEmbedder, rope_frequencies, timestep_embedding
from flux1.models.flux_blocks import DoubleStreamBlock, LastLayer, SingleStreamBlock
from flux1.nn.linear import Linear


class FluxTransformer(nn.Module):
    """Built from the diffusers `transformer/config.json`; parameters carry the BFL names."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
        dim = heads * head_dim
        self.axes_dims = tuple(config.get("axes_dims_rope") or AXES_DIMS_ROPE)
        if sum(self.axes_dims) != head_dim:
            raise ValueError(
                f"axes_dims_rope {list(self.axes_dims)} must sum to attention_head_dim {head_dim}"
            )
        self.guidance_embeds = bool(config.get("guidance_embeds", False))
        in_channels = config.get("in_channels", 64)

        self.img_in = Linear(in_channels, dim)
        self.time_in = MLPEmbedder(256, dim)
        self.vector_in = MLPEmbedder(config["pooled_projection_dim"], dim)
        if self.guidance_embeds:
            self.guidance_in = MLPEmbedder(256, dim)
        self.txt_in = Linear(config["joint_attention_dim"], dim)
        self.double_blocks = [DoubleStreamBlock(dim, heads, MLP_RATIO) for _ in range(config["num_layers"])]
        self.single_blocks = [
            SingleStreamBlock(dim, heads, MLP_RATIO) for _ in range(config["num_single_layers"])
        ]
        self.final_layer = LastLayer(dim, config.get("out_channels") or in_channels)

    def __call__(
        self,
        img: mx.array,
        img_ids: mx.array,
        txt: mx.array,
        txt_ids: mx.array,
        timesteps: mx.array,
        y: mx.array,
        guidance: mx.array | None = None,
    ) -> mx.array:
        """Velocity [B, N, 64] of the packed latents img [B, N, 64] at sigma `timesteps` [B]."""
        dtype = img.dtype  # the activations' dtype: every input is cast to it, as in diffusers
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps).astype(dtype))
        if self.guidance_embeds:
            if guidance is None:
                raise ValueError("this transformer (FLUX.1-dev) needs a guidance value")
            vec = vec + self.guidance_in(timestep_embedding(guidance).astype(dtype))
        vec = vec + self.vector_in(y.astype(dtype))
        txt = self.txt_in(txt.astype(dtype))
        rope = rope_frequencies(mx.concatenate([txt_ids, img_ids], axis=1), self.axes_dims, ROPE_THETA)

        for block in self.double_blocks:
            img, txt = block(img, txt, vec, rope)
        x = mx.concatenate([txt, img], axis=1)
        for block in self.single_blocks:
            x = block(x, vec, rope)
        return self.final_layer(x[:, txt.shape[1] :], vec)
