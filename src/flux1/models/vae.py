"""The FLUX.1 autoencoder (diffusers AutoencoderKL, 16 latent channels), NHWC as MLX convolves."""

import mlx.core as mx
import mlx.nn as nn

from flux1 import backend
from flux1.nn.attention import attention
from flux1.nn.convolution import conv2d
from flux1.nn.cpu_vae import decoded, resnet_block
from flux1.nn.group_norm import group_norm
from flux1.nn.linear import Linear

_EPS = 1e-6


class Conv2d(nn.Module):
    """Kernel [out, kh, kw, in] (MLX layout), cast to the activation dtype at use."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.stride, self.padding = stride, padding
        self.weight = mx.zeros((out_channels, kernel, kernel, in_channels))
        self.bias = mx.zeros((out_channels,))

    def __call__(self, x: mx.array) -> mx.array:
        return conv2d(x, self.weight, self.bias, self.stride, self.padding)


class GroupNorm(nn.Module):
    def __init__(self, groups: int, channels: int):
        super().__init__()
        self.groups = groups
        self.weight = mx.ones((channels,))
        self.bias = mx.zeros((channels,))

    def __call__(self, x: mx.array, silu: bool = False) -> mx.array:
        """Normalized, scaled and shifted (then SiLU'd, with `silu`)."""
        return group_norm(x, self.groups, self.weight, self.bias, _EPS, silu)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm(groups, out_channels)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = Conv2d(in_channels, out_channels, 1)

    def __call__(self, x: mx.array) -> mx.array:
        if backend.numpy_kernels():  # the same, its activations kept NumPy's between the kernels
            return resnet_block(x, self, _EPS)
        h = self.conv1(self.norm1(x, silu=True))
        h = self.conv2(self.norm2(h, silu=True))
        return (self.conv_shortcut(x) if "conv_shortcut" in self else x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over all pixels of the lowest resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels)
        self.to_q, self.to_k, self.to_v = (Linear(channels, channels) for _ in range(3))
        self.to_out = [Linear(channels, channels)]

    def __call__(self, x: mx.array) -> mx.array:
        batch, height, width, channels = x.shape
        h = self.group_norm(x).reshape(batch, 1, height * width, channels)
        out = attention(self.to_q(h), self.to_k(h), self.to_v(h), scale=channels**-0.5)
        return x + self.to_out[0](out).reshape(x.shape)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = [ResnetBlock(channels, channels, groups) for _ in range(2)]
        self.attentions = [AttentionBlock(channels, groups)]

    def __call__(self, x: mx.array) -> mx.array:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))  # asymmetric, as the reference


class Upsample(nn.Module):
    """Nearest 2x upsampling, then a 3x3 convolution: computed without the upsampled image. Output
    pixel (2i + a, 2j + b) reads upsampled rows 2i + a - 1 .. 2i + a + 1, which are input rows
    i - 1, i, i for a = 0 and i, i, i + 1 for a = 1: a 2-tap kernel per axis (the taps that read the
    same input row summed). So each of the 4 phases (a, b) is a 2x2 convolution of the input; all
    four are one convolution with 4x the output channels. 16 taps at the input's resolution instead
    of 9 at 4x its pixels: 2.25x fewer FLOPs (a quarter of the decoder's convolution work). On the
    CPU kernels the decoder computes it on NumPy arrays (`cpu_vae.numpy_upsampled`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def phase_kernels(self) -> tuple[mx.array, mx.array]:
        """(kernel [4 * out, 2, 2, in], bias [4 * out]): the four phases' 2x2 convolutions as one."""
        kernels = [_phase_kernel(self.conv.weight, a, b) for a in (0, 1) for b in (0, 1)]
        return mx.concatenate(kernels), mx.tile(self.conv.bias, 4)

    def __call__(self, x: mx.array) -> mx.array:
        batch, height, width, _ = x.shape
        out_channels = self.conv.weight.shape[0]
        kernel, bias = self.phase_kernels()
        # y [batch, height + 1, width + 1, 4 * out]: phase (a, b) at rows a.., columns b.. of its block
        y = conv2d(x, kernel, bias, padding=1)
        rows = []
        for a in (0, 1):
            channels = [slice((2 * a + b) * out_channels, (2 * a + b + 1) * out_channels) for b in (0, 1)]
            phases = [y[:, a : a + height, b : b + width, channels[b]] for b in (0, 1)]
            rows.append(mx.stack(phases, axis=3))  # [batch, height, width, 2, out]
        return mx.stack(rows, axis=2).reshape(batch, 2 * height, 2 * width, out_channels)


def _phase_kernel(weight: mx.array, a: int, b: int) -> mx.array:
    """The 2x2 kernel of phase (a, b) from a 3x3 kernel [out, 3, 3, in]: per axis, phase 0 takes
    taps (k0, k1 + k2), phase 1 (k0 + k1, k2)."""
    return _two_taps(_two_taps(weight.astype(mx.float32), 1, a), 2, b)


def _two_taps(kernel: mx.array, axis: int, phase: int) -> mx.array:
    k0, k1, k2 = mx.split(kernel, 3, axis=axis)
    return mx.concatenate([k0, k1 + k2] if phase == 0 else [k0 + k1, k2], axis=axis)


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = [
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(layers)
        ]
        if downsample:
            self.downsamplers = [Downsample(out_channels)]

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if "downsamplers" in self else x


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = [
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(layers)
        ]
        if upsample:
            self.upsamplers = [Upsample(out_channels)]

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if "upsamplers" in self else x


class Encoder(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        channels, groups, layers = (
            config["block_out_channels"],
            config["norm_num_groups"],
            config["layers_per_block"],
        )
        self.conv_in = Conv2d(config["in_channels"], channels[0], 3, padding=1)
        inputs = [channels[0], *channels[:-1]]
        self.down_blocks = [
            DownBlock(c_in, c_out, layers, groups, downsample=i < len(channels) - 1)
            for i, (c_in, c_out) in enumerate(zip(inputs, channels, strict=True))
        ]
        self.mid_block = MidBlock(channels[-1], groups)
        self.conv_norm_out = GroupNorm(groups, channels[-1])
        self.conv_out = Conv2d(channels[-1], 2 * config["latent_channels"], 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(self.mid_block(x), silu=True))


class Decoder(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        channels = list(reversed(config["block_out_channels"]))
        groups, layers = config["norm_num_groups"], config["layers_per_block"] + 1
        self.conv_in = Conv2d(config["latent_channels"], channels[0], 3, padding=1)
        self.mid_block = MidBlock(channels[0], groups)
        inputs = [channels[0], *channels[:-1]]
        self.up_blocks = [
            UpBlock(c_in, c_out, layers, groups, upsample=i < len(channels) - 1)
            for i, (c_in, c_out) in enumerate(zip(inputs, channels, strict=True))
        ]
        self.conv_norm_out = GroupNorm(groups, channels[-1])
        self.conv_out = Conv2d(channels[-1], config["out_channels"], 3, padding=1)

    def __call__(self, z: mx.array) -> mx.array:
        x = self.mid_block(self.conv_in(z))
        if backend.numpy_kernels():  # the same, its activations kept NumPy's from block to block
            return decoded(x, self, _EPS)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(x, silu=True))


class VAE(nn.Module):
    """decode: latents [B, h, w, 16] -> image [B, 8h, 8w, 3] in about [-1, 1]; encode: the mean of the
    latent distribution. Scaling (`z / scaling_factor + shift_factor`) is the pipeline's."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        self.scaling_factor = config["scaling_factor"]
        self.shift_factor = config["shift_factor"]
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def decode(self, z: mx.array) -> mx.array:
        return self.decoder(z)

    def encode(self, x: mx.array) -> mx.array:
        return self.encoder(x)[..., : self.config["latent_channels"]]
