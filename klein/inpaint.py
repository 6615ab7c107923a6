"""Mask inpainting, as diffusers 0.42.1's `Flux2KleinInpaintPipeline` does it.

The source image is VAE-encoded; sampling starts `strength` of the way into the schedule from the
source noised to that sigma (the start quantised by the step count: with 4 steps, strength moves in
quarters); after every step the latents outside the mask are replaced by the source noised to the
next sigma (the source itself after the last step), on the packed token grid. The encoded source is
also the first reference sequence the transformer attends to, further references after it. A mask
is white (1) where the image is repainted; it is binarised at 0.5 and bilinearly resized to the
token grid.

One deliberate difference: diffusers resizes and centre-crops every further reference
(`image_reference`) to the first one's size, so a reference of another shape loses part of itself.
Here each reference keeps its own size, as in text-to-image and editing (with one further
reference, or references of one size, the two agree; the tests compare those cases).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from klein.image import to_grey, to_rgb, to_tensor
from klein.request import SOURCE_MAX_PIXELS, source_size


def _resized(image: Image.Image, width: int, height: int) -> Image.Image:
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)


def prepare_source(image: Image.Image, multiple: int) -> Tensor:
    """The source as (1, 3, H, W) float32 in [-1, 1] at `source_size` (resized in its own mode,
    then made RGB, as diffusers' image processor does)."""
    w, h = image.size
    if w * h > SOURCE_MAX_PIXELS:
        s = math.sqrt(SOURCE_MAX_PIXELS / (w * h))
        image = _resized(image, int(w * s), int(h * s))
    return to_tensor(to_rgb(_resized(image, *source_size(w, h, multiple))))


def prepare_mask(mask: Image.Image, width: int, height: int, multiple: int) -> Tensor:
    """A mask image (white repaints) -> (h*w, 1) float32 on the token grid (row-major)."""
    m = to_grey(_resized(mask, width, height))
    x = torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0)[None, None]
    x = (x >= 0.5).float()  # binarised
    grid = F.interpolate(x, size=(height // multiple, width // multiple), mode="bilinear")
    return grid.flatten().unsqueeze(-1)


@dataclass(frozen=True)
class Inpaint:
    """What the sampler needs to repaint a batch: the packed source latents (B, L, C), the masks
    (B, L, 1) and the step it starts from."""

    source: Tensor
    mask: Tensor
    start: int

    def to(self, device, dtype) -> Inpaint:
        return Inpaint(self.source.to(device, dtype), self.mask.to(device, dtype), self.start)


def noised(source: Tensor, noise: Tensor, sigma: float) -> Tensor:
    """The source at noise level sigma (flow matching: sigma * noise + (1 - sigma) * source), with
    sigma rounded to the latents' dtype first, as diffusers' `scale_noise` does (0.908 is 0.90625
    in bf16)."""
    s = torch.full((1, 1, 1), sigma, dtype=torch.float32, device=source.device).to(source.dtype)
    return s * noise + (1.0 - s) * source


def blend(latents: Tensor, inpaint: Inpaint, noise: Tensor, sigma_next: float, last: bool) -> Tensor:
    """After a step: outside the mask, the source at the next noise level (itself after the last)."""
    keep = inpaint.source if last else noised(inpaint.source, noise, sigma_next)
    return (1 - inpaint.mask) * keep + inpaint.mask * latents
