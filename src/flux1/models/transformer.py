"""The FLUX.1 rectified-flow transformer (19 double-stream + 38 single-stream blocks for the real model)."""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

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
        timesteps: mx.array | None = None,
        y: mx.array | None = None,
        guidance: mx.array | None = None,
        modulations: list | None = None,
    ) -> mx.array:
        """Velocity [B, N, 64] of the packed latents img [B, N, 64] at sigma `timesteps` [B] given the
        pooled text y, or with this step's `modulations` computed ahead (`step_modulations`)."""
        dtype = img.dtype  # the activations' dtype: every input is cast to it, as in diffusers
        if modulations is None:
            modulations = self.modulations(self.conditioning(timesteps, y, guidance, dtype))
        img = self.img_in(img)
        txt = self.txt_in(txt.astype(dtype))
        rope = rope_frequencies(mx.concatenate([txt_ids, img_ids], axis=1), self.axes_dims, ROPE_THETA)

        double = len(self.double_blocks)
        for block, block_modulations in zip(self.double_blocks, modulations[:double], strict=True):
            img, txt = block(img, txt, block_modulations, rope)
        x = mx.concatenate([txt, img], axis=1)
        for block, block_modulations in zip(self.single_blocks, modulations[double:-1], strict=True):
            x = block(x, block_modulations, rope)
        return self.final_layer(x[:, txt.shape[1] :], modulations[-1])

    def conditioning(
        self, timesteps: mx.array, y: mx.array, guidance: mx.array | None, dtype: mx.Dtype
    ) -> mx.array:
        """The vector [B, dim] every block is modulated by: the timestep's embedding, the guidance's
        (FLUX.1-dev) and the pooled text's y."""
        vec = self.time_in(timestep_embedding(timesteps).astype(dtype))
        if self.guidance_embeds:
            if guidance is None:
                raise ValueError("this transformer (FLUX.1-dev) needs a guidance value")
            vec = vec + self.guidance_in(timestep_embedding(guidance).astype(dtype))
        return vec + self.vector_in(y.astype(dtype))

    def modulations(self, vec: mx.array) -> list:
        """Every block's modulation parameters, then the last layer's, from vec [B, dim]."""
        blocks = [*self.double_blocks, *self.single_blocks, self.final_layer]
        return [block.modulations(vec) for block in blocks]

    def step_modulations(
        self, timesteps: mx.array, y: mx.array, guidance: mx.array | None, dtype: mx.Dtype
    ) -> list[list]:
        """`modulations` for each of several steps' timesteps [S] (y [B, ...] and guidance the same at
        every step) from one product per modulation layer over all S * B rows, instead of one per
        step: a quantized layer is expanded once for them all."""
        steps, batch = timesteps.shape[0], y.shape[0]
        rows = self.conditioning(mx.repeat(timesteps, batch), mx.tile(y, (steps, 1)), guidance, dtype)
        every = self.modulations(rows)
        return [tree_map(lambda a, s=s: a[s * batch : (s + 1) * batch], every) for s in range(steps)]
