"""Pixels in and out: reference-image preprocessing and decoded-tensor -> PIL conversion
(diffusers `Flux2ImageProcessor` semantics, so references and outputs match it exactly)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from klein.request import reference_size

HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
# Output formats: file extension and media type of each.
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


EXIF_ORIENTATION = 0x0112
PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16")


def turned(image: Image.Image) -> bool:
    """Whether the image's EXIF orientation says its pixels are stored turned or mirrored (as phone
    cameras store them)."""
    return image.getexif().get(EXIF_ORIENTATION, 1) not in (0, 1)


def upright(image: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: turned by its EXIF orientation, the tag then dropped
    (diffusers' `load_image` does the same); an image without one as it is."""
    return ImageOps.exif_transpose(image) if turned(image) else image


def upright_png(image: Image.Image) -> bytes:
    """A turned image stored upright, losslessly, as PNG (modes PNG cannot hold: made 8-bit RGB)."""
    image = upright(image)
    if image.mode not in PNG_MODES:
        image = to_rgb(image)
    buf = io.BytesIO()
    image.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def to_grey(image: Image.Image) -> Image.Image:
    """Any decoded image -> 8-bit greyscale (a mask): 16-bit and float greyscale scaled, as
    `to_rgb` scales them, not clipped to white as PIL's own convert does."""
    if image.mode in HIGH_BIT_MODES:
        return to_rgb(image).convert("L")  # grey stays exactly grey: R = G = B
    return image if image.mode == "L" else image.convert("L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any decoded image -> 8-bit RGB. PIL's own convert clips 16-bit greyscale to 255 (a white
    image); here it is scaled. Alpha is dropped (as diffusers does); CMYK, palette, greyscale and
    1-bit images convert as PIL converts them."""
    if image.mode in HIGH_BIT_MODES:
        a = np.asarray(image, dtype=np.float64)
        a = a * 255.0 if image.mode == "F" else a / 257.0  # F: [0, 1] floats; I/I;16: 16-bit samples
        image = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    return image if image.mode == "RGB" else image.convert("RGB")


def prepare_reference(image: Image.Image, max_pixels: int, multiple: int) -> Tensor:
    """Downscaled to at most `max_pixels` (LANCZOS, in the image's own mode), made RGB, then
    centre-cropped to a multiple of `multiple`: a (1, 3, H, W) float32 tensor in [-1, 1]. The order
    is diffusers': an RGBA image is resized with its alpha (PIL premultiplies), a palette one with
    PIL's nearest neighbour, before either is made RGB."""
    w, h = image.size
    if w * h > max_pixels:
        image = image.resize(reference_size(w, h, max_pixels, 1), Image.Resampling.LANCZOS)
    image = to_rgb(image)
    w, h = image.size
    tw, th = reference_size(w, h, max_pixels, multiple)
    left, top = (w - tw) // 2, (h - th) // 2
    return to_tensor(image.crop((left, top, left + tw, top + th)))


def to_tensor(image: Image.Image) -> Tensor:
    """An RGB image as (1, 3, H, W) float32 in [-1, 1], laid out as diffusers' image processor lays
    it out (channels last in memory): the VAE's convolutions pick their kernels by layout, and in
    bf16 another kernel rounds otherwise."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)  # (H, W, 3)
    return (2.0 * x - 1.0).unsqueeze(0).permute(0, 3, 1, 2)


def to_uint8(x: Tensor) -> Tensor:
    """Decoded images in [-1, 1], (B, 3, H, W) -> uint8 (B, H, W, 3). Mapped to [0, 1] in the
    decoder's dtype, as diffusers' postprocess does (in bf16 that is a rounding, which moves about
    a fifth of the 8-bit values by one level), then scaled and rounded in float32."""
    x = (x * 0.5 + 0.5).clamp(0, 1).float()
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def to_pil(x: Tensor) -> list[Image.Image]:
    return [Image.fromarray(a.numpy()) for a in to_uint8(x)]
