"""Input images: decoded off the event loop a few at a time, with every cap checked before any
pixel is decoded; fetched from http(s) URLs only where the operator allows it (SSRF-guarded)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import warnings

from PIL import Image

from deployments import netguard
from deployments.jobs.errors import FieldError
from deployments.jobs.service import InputImage
from deployments.options import IngressOptions
from klein.image import to_grey, turned, upright_png

IMAGE_FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF", "MPO"}
# What klein.image.to_rgb turns into 8-bit RGB (16-bit greyscale scaled, alpha dropped, CMYK converted).
PIXEL_MODES = {
    "1",
    "L",
    "LA",
    "La",
    "P",
    "PA",
    "RGB",
    "RGBA",
    "RGBa",
    "RGBX",
    "CMYK",
    "YCbCr",
    "I;16",
    "I;16L",
    "I;16B",
    "I;16N",
    "I",
    "F",
}


class ImageReader:
    """Turns what a request sent (base64, a data URI, an upload, a URL) into `InputImage`s."""

    def __init__(self, options: IngressOptions):
        self.options = options
        self.max_bytes = options.max_input_image_mb * 2**20
        self._decoding = asyncio.Semaphore(4)  # a 40 MP image is ~120 MB decoded: a few at once

    async def read(self, field: str, data: str | bytes) -> InputImage:
        if (
            isinstance(data, str)
            and data.startswith(("http://", "https://"))
            and self.options.fetch_input_urls
        ):
            data = await self.fetch(field, data)
        async with self._decoding:
            raw, image = await asyncio.to_thread(
                decode_image, data, field, self.max_bytes, self.options.max_input_image_pixels
            )
        return InputImage(field, raw, image)

    async def read_mask(self, field: str, data: str | bytes, transparent_repaints: bool) -> InputImage:
        """An inpainting mask -> a greyscale PNG where white repaints. `transparent_repaints`: the
        OpenAI convention (the mask's fully transparent pixels are repainted; it needs alpha); else
        the image's own grey levels (diffusers: white repaints)."""
        image = await self.read(field, data)
        return await asyncio.to_thread(_mask_image, image, transparent_repaints)

    async def fetch(self, field: str, url: str) -> bytes:
        o = self.options
        try:
            return await netguard.fetch(url, self.max_bytes, o.fetch_timeout_s, o.fetch_allow_private)
        except netguard.TargetRefused as e:
            if e.too_large:
                raise FieldError(field, f"image must be at most {o.max_input_image_mb} MB", 413) from None
            raise FieldError(field, f"cannot use this URL: {e}") from None


def _mask_image(image: InputImage, transparent_repaints: bool) -> InputImage:
    im = Image.open(io.BytesIO(image.data))
    if transparent_repaints:
        if "A" not in im.getbands() and "transparency" not in im.info:
            raise FieldError(image.field, "must have an alpha channel: its transparent pixels are repainted")
        alpha = im.convert("RGBA").getchannel("A")
        mask = alpha.point(lambda a: 255 if a == 0 else 0)  # transparent: repaint
    else:
        mask = to_grey(im)  # 16-bit greys scaled, not clipped to white
    buf = io.BytesIO()
    mask.save(buf, "PNG")
    return InputImage(image.field, buf.getvalue(), Image.open(io.BytesIO(buf.getvalue())))


_WHITESPACE = str.maketrans("", "", " \t\r\n")
_URLSAFE = str.maketrans("-_", "+/")


def _base64(data: str, field: str) -> bytes:
    """Standard base64, and what encoders also write: line breaks (MIME wraps at 76), the URL-safe
    alphabet, padding left off. Anything else is refused."""
    data = data.translate(_WHITESPACE)
    if not data:
        raise FieldError(field, "is empty: send the image as base64 or a data URI")
    if "-" in data or "_" in data:
        data = data.translate(_URLSAFE)
    try:
        return base64.b64decode(data + "=" * (-len(data) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise FieldError(field, "not valid base64") from None


def decode_image(data: str | bytes, field: str, max_bytes: int, max_pixels: int) -> tuple[bytes, Image.Image]:
    """base64 / data URI / raw bytes -> (file bytes, PIL image), with caps checked before any pixel
    is decoded (no decompression bombs). The file is decoded in full to prove it is sound, then the
    pixels are let go: the image returned is opened again lazily (header only; it has the size and
    mode validation needs), so a request of four 40 MP references does not hold 0.5 GB while its
    job is submitted. The Codec decodes the bytes again where the pixels are used."""
    if isinstance(data, str):
        if data.startswith(("http://", "https://")):
            raise FieldError(field, "URLs are not accepted here (fetching is off); send base64 or a data URI")
        if data[:5].lower() == "data:":
            head, _, data = data.partition(",")
            if ";base64" not in head.lower():
                raise FieldError(field, "data URI must be base64-encoded")
        if len(data) > max_bytes * 4 // 3 + max_bytes // 32 + 4:  # room for line breaks
            raise FieldError(field, f"image must be at most {max_bytes // 2**20} MB", 413)
        raw = _base64(data, field)
    else:
        raw = data
    if len(raw) > max_bytes:
        raise FieldError(field, f"image must be at most {max_bytes // 2**20} MB", 413)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            if image.format not in IMAGE_FORMATS:
                raise FieldError(field, f"unsupported image format {image.format}")
            w, h = image.size
            if w * h > max_pixels:
                raise FieldError(
                    field, f"image is {w}x{h}; at most {max_pixels / 1e6:g} MP are accepted", 413
                )
            frames = getattr(image, "n_frames", 1)
            if frames > 1 and image.format != "MPO":  # MPO: a camera JPEG whose first frame is the photo
                kind = "multi-page" if image.format == "TIFF" else "animated"
                raise FieldError(field, f"{kind} images ({frames} frames) are not accepted; send one frame")
            image.load()
            if image.mode not in PIXEL_MODES:
                raise FieldError(field, f"unsupported pixel mode {image.mode}")
            if turned(image):  # a camera's pixels with an EXIF orientation: kept as they are seen
                raw = upright_png(image)
    except FieldError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise FieldError(field, f"image exceeds {max_pixels / 1e6:g} MP", 413) from None
    except Exception as e:  # truncated or corrupt files raise many kinds of errors
        raise FieldError(field, f"cannot decode image: {e}") from None
    image.close()
    return raw, Image.open(io.BytesIO(raw))
