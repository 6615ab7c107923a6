"""The FLUX.2 autoencoder, following BFL flux2 `autoencoder.py` (module names = `ae.safetensors` keys).

The transformer works on "packed" latents: the 32-channel mean of the encoder, 2x2-patchified to 128
channels and normalised by the BatchNorm running statistics `bn` (no scaling/shift factor).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from klein.config import VAEConfig


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        # as diffusers' attention block computes it, so that bf16 rounds alike: the 1x1 convolutions
        # as linear layers over the (B, HW, C) tokens (a GEMM rounds otherwise than a convolution)
        b, c, height, width = x.shape
        h = self.norm(x.view(b, c, height * width)).transpose(1, 2)  # (B, HW, C), channels unit-strided
        q, k, v = (_linear(f, h).view(b, -1, 1, c).transpose(1, 2) for f in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, c)
        return x + _linear(self.proj_out, h).transpose(1, 2).reshape(b, c, height, width)


def _linear(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """A 1x1 convolution applied to (B, L, C) tokens."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad: right and bottom only


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block` resnets (+ `downsample` / `upsample`); BFL keeps an empty `attn`."""

    def __init__(self, channels_in: int, channels_out: int, n_blocks: int, groups: int):
        super().__init__()
        chans = [channels_in] + [channels_out] * n_blocks
        self.block = nn.ModuleList(
            ResnetBlock(a, b, groups) for a, b in zip(chans[:-1], chans[1:], strict=True)
        )


def _mid(channels: int, groups: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, groups)
    mid.attn_1 = AttnBlock(channels, groups)
    mid.block_2 = ResnetBlock(channels, channels, groups)
    return mid


def _run_mid(mid: nn.Module, h: Tensor) -> Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, g = c.block_out_channels, c.norm_groups
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        for i, out in enumerate(ch):
            level = _Level(ch[max(i - 1, 0)], out, c.layers_per_block, g)
            if i != len(ch) - 1:
                level.downsample = Downsample(out)
            self.down.append(level)
        self.mid = _mid(ch[-1], g)
        self.norm_out = _norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], 2 * c.z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(2 * c.z_channels, 2 * c.z_channels, 1) if c.use_quant_conv else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.conv_out(F.silu(self.norm_out(_run_mid(self.mid, h))))
        return h if self.quant_conv is None else self.quant_conv(h)


class Decoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, g = c.decoder_channels, c.norm_groups
        self.post_quant_conv = nn.Conv2d(c.z_channels, c.z_channels, 1) if c.use_post_quant_conv else None
        self.conv_in = nn.Conv2d(c.z_channels, ch[-1], 3, padding=1)
        self.mid = _mid(ch[-1], g)
        # up[i] works at the resolution of down[i]; it runs from the last level to the first.
        self.up = nn.ModuleList()
        for i, out in enumerate(ch):
            level = _Level(ch[min(i + 1, len(ch) - 1)], out, c.layers_per_block + 1, g)
            if i != 0:
                level.upsample = Upsample(out)
            self.up.append(level)
        self.norm_out = _norm(ch[0], g)
        self.conv_out = nn.Conv2d(ch[0], c.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        h = _run_mid(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.bn = nn.BatchNorm2d(
            config.latent_channels, eps=config.bn_eps, affine=False, track_running_stats=True
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.conv_in.weight.device

    def _bn_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        # in the latents' dtype, as diffusers computes them from its (bf16-loaded) statistics
        mean = self.bn.running_mean.view(1, -1, 1, 1).to(like)
        std = torch.sqrt(self.bn.running_var.view(1, -1, 1, 1).to(like) + self.config.bn_eps)
        return mean, std

    def encode(self, x: Tensor) -> Tensor:
        """Images in [-1, 1], (B, 3, H, W) -> normalised packed latents (B, 4z, H/16, W/16)."""
        moments = torch.cat([self.encoder(xi) for xi in x.to(self.dtype).split(1)])  # see decode
        mean = moments.chunk(2, dim=1)[0]  # deterministic: the posterior mean, no sampling
        z = rearrange(mean, "B C (i pi) (j pj) -> B (C pi pj) i j", pi=2, pj=2)
        bn_mean, bn_std = self._bn_stats(z)
        return (z - bn_mean) / bn_std

    def decode(self, z: Tensor) -> Tensor:
        """Normalised packed latents (B, 4z, h, w) -> images in about [-1, 1], (B, 3, 16h, 16w).

        One image at a time: convolution algorithms are chosen by batch size and round differently,
        and an image must not depend on what it was batched with. Each image alone is large enough
        to keep the device busy.
        """
        z = z.to(self.dtype)
        bn_mean, bn_std = self._bn_stats(z)
        z = rearrange(z * bn_std + bn_mean, "B (C pi pj) i j -> B C (i pi) (j pj)", pi=2, pj=2)
        return torch.cat([self.decode_one(zi) for zi in z.split(1)])

    def decode_one(self, z: Tensor) -> Tensor:
        """(1, z, H/8, W/8) unpacked latents -> (1, 3, H, W); klein.fast may wrap this."""
        return self.decoder(z)
