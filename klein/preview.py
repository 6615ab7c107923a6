"""Cheap previews of a generation in progress: the step's predicted clean latent mapped linearly to
RGB at 1/8 of the image's size, with no VAE decode.

Each packed latent token (the VAE's 32 channels x a 2x2 patch, normalised) covers 16x16 pixels. The
map takes a token to the mean colour of each of its four 8x8 quarters: 12 numbers, an affine function
of the token's channels. It is fitted by least squares against the loaded VAE itself (`fit`): smooth
random images are encoded, the latents decoded, and the decodes averaged over 8x8 blocks; the map
then predicts what the VAE would decode. That works for any weights, real or random, and the
fitted map's error on images it was not fitted on is measured and reported (`Fit.r2`).

At 1024x1024 a preview is 128x128 pixels and costs one (4096 x 129) @ (129 x 12) product.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from klein.sampler import pack
from klein.vae import AutoEncoder

SCALE = 8  # preview pixels are 8x8 blocks of the image's
PATCH = 2  # a token covers PATCH x PATCH preview pixels


def predicted_x0(x_t: Tensor, velocity: Tensor, sigma: float) -> Tensor:
    """The clean latent a flow-matching step predicts: x0 = x_t - sigma * v (float32)."""
    return x_t.float() - sigma * velocity.float()


@dataclass(frozen=True)
class Fit:
    r2: float  # on held-out images: 1 - residual variance / variance of the VAE's block means
    tokens: int  # samples the map was fitted on


class LatentPreview:
    """An affine map from packed latent tokens (..., C) to RGB blocks; `render` makes images."""

    def __init__(self, weight: Tensor, fit: Fit | None = None):
        self.weight = weight.float()  # (C + 1, PATCH * PATCH * 3): the last row is the bias
        self.fit = fit

    @property
    def channels(self) -> int:
        return self.weight.shape[0] - 1

    @classmethod
    @torch.inference_mode()
    def fit_to(cls, vae: AutoEncoder, images: int = 16, size: int = 256, seed: int = 0) -> LatentPreview:
        """Fit the map to `vae` on `images` smooth random images of size x size (a quarter of them
        held out to measure the fit)."""
        generator = torch.Generator("cpu").manual_seed(seed)
        x = _smooth_images(images, size, generator).to(vae.device)
        z = torch.cat([vae.encode(xi[None]) for xi in x])  # (N, C, h, w)
        decoded = torch.cat([vae.decode(zi[None]) for zi in z]).float().cpu()
        inputs = _with_bias(pack(z.float().cpu()))  # (N, L, C + 1)
        targets = _blocks(decoded)  # (N, L, 12)
        held = max(1, images // 4)
        a, b = inputs[:-held].reshape(-1, inputs.shape[-1]), targets[:-held].reshape(-1, targets.shape[-1])
        weight = _ridge(a.double(), b.double(), 1e-4).float()
        test_in, test_out = inputs[-held:].reshape(-1, a.shape[-1]), targets[-held:].reshape(-1, b.shape[-1])
        residual = (test_in @ weight - test_out).pow(2).mean()
        variance = (test_out - test_out.mean(0)).pow(2).mean()
        r2 = float(1 - residual / variance) if variance > 0 else float("nan")
        return cls(weight, Fit(r2=r2, tokens=a.shape[0]))

    def blocks(self, tokens: Tensor) -> Tensor:
        """(..., L, C) tokens -> (..., L, 12) block colours in about [-1, 1]."""
        return _with_bias(tokens.float()) @ self.weight.to(tokens.device)

    def render(self, tokens: Tensor, h: int, w: int) -> Tensor:
        """(L, C) packed tokens of an h x w token grid -> uint8 RGB (2h, 2w, 3) on the CPU."""
        rgb = rearrange(
            self.blocks(tokens), "(h w) (pi pj c) -> (h pi) (w pj) c", h=h, w=w, pi=PATCH, pj=PATCH
        )
        return ((rgb / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def _with_bias(x: Tensor) -> Tensor:
    return torch.cat((x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)), dim=-1)


def _blocks(images: Tensor) -> Tensor:
    """Images (N, 3, H, W) -> the means of their 8x8 blocks, grouped per token: (N, L, 12)."""
    pooled = F.avg_pool2d(images, SCALE)
    return rearrange(pooled, "N c (h pi) (w pj) -> N (h w) (pi pj c)", pi=PATCH, pj=PATCH)


def _ridge(a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """argmin_W |a W - b|^2 + alpha |W|^2 (alpha relative to the mean of diag(a^T a))."""
    gram = a.T @ a
    gram += alpha * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram, a.T @ b)


def _smooth_images(n: int, size: int, generator: torch.Generator) -> Tensor:
    """(n, 3, size, size) in [-1, 1]: random colour fields, coarse to fine, with hard edges in some."""
    out = []
    for i in range(n):
        cells = 2 ** (1 + i % int(math.log2(size // 8)))  # 2x2 ... size/8 cells
        field = torch.randn(1, 3, cells, cells, generator=generator)
        mode = "nearest" if i % 3 == 2 else "bilinear"
        img = F.interpolate(
            field, size=(size, size), mode=mode, **({} if mode == "nearest" else {"align_corners": False})
        )
        out.append(torch.tanh(img))
    return torch.cat(out)
