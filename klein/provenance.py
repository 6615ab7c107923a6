"""Provenance of generated images: an invisible watermark in the pixels (invisible-watermark,
dwtDct, 48 bits) and a signed C2PA manifest in the file (c2pa-python).

The default watermark payload is the 48-bit mark of BFL's FLUX.2 reference code
(`src/flux2/watermark.py`); decoding compares with a Hamming-distance tolerance because dwtDct
round trips flip a bit or two on some images.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from klein.image import CONTENT_TYPES

BFL_WATERMARK_BITS = "001010101111111010000111100111001111010100101110"
WATERMARK_MIN_SIDE = 256  # dwtDct needs enough 4x4 blocks for 48 bits
TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"


def parse_bits(bits: str) -> list[int]:
    if len(bits) != 48 or set(bits) - {"0", "1"}:
        raise ValueError(f"watermark payload must be 48 binary digits, got {bits!r}")
    return [int(b) for b in bits]


class Watermarker:
    def __init__(self, bits: str = BFL_WATERMARK_BITS):
        from imwatermark import WatermarkEncoder

        self.bits = parse_bits(bits)
        self.encoder = WatermarkEncoder()
        self.encoder.set_watermark("bits", self.bits)

    @staticmethod
    def fits(image: Image.Image) -> bool:
        return min(image.size) >= WATERMARK_MIN_SIDE

    def embed(self, image: Image.Image) -> Image.Image:
        """Images smaller than 256 px on a side carry no watermark (too few blocks for 48 bits)."""
        if not self.fits(image):
            return image
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        out = self.encoder.encode(bgr, "dwtDct")
        return Image.fromarray(np.ascontiguousarray(out[:, :, ::-1]))


def decode_watermark(image: Image.Image) -> list[int] | None:
    from imwatermark import WatermarkDecoder

    if min(image.size) < WATERMARK_MIN_SIDE:
        return None
    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
    return [int(b) for b in WatermarkDecoder("bits", 48).decode(bgr, "dwtDct")]


def hamming(a: list[int], b: list[int]) -> int:
    return sum(x != y for x, y in zip(a, b, strict=True))


@dataclass(frozen=True)
class C2PASigner:
    """Signs encoded images with a certificate chain (leaf first) and its private key, PEM files."""

    cert_chain: bytes
    private_key: bytes
    generator: str = "klein-serve"
    version: str = "0.1.0"
    alg: str = "ES256"

    @classmethod
    def from_files(cls, cert_chain: str | Path, private_key: str | Path, **kw) -> C2PASigner:
        return cls(Path(cert_chain).read_bytes(), Path(private_key).read_bytes(), **kw)

    def manifest(self, model: str, title: str, edited: bool) -> dict:
        """created, or (for edits) opened (the first reference, the parent) then edited."""
        agent = {"name": self.generator, "version": self.version}
        action = {"action": "c2pa.edited" if edited else "c2pa.created", "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                  "softwareAgent": agent, "parameters": {"model": model}}  # fmt: skip
        opened = {
            "action": "c2pa.opened",
            "softwareAgent": agent,
            "parameters": {"ingredientIds": ["reference-1"]},
        }
        actions = [opened, action] if edited else [action]
        return {
            "claim_generator_info": [{"name": self.generator, "version": self.version}],
            "title": title,
            "assertions": [
                {"label": "c2pa.actions", "data": {"actions": actions}},
                {
                    "label": "com.klein-serve.generator",
                    "data": {"model": model, "service": self.generator, "version": self.version},
                },  # fmt: skip
            ],
        }

    def sign(self, data: bytes, fmt: str, model: str, title: str, ingredients: list[bytes] = ()) -> bytes:
        """`ingredients` (the reference images of an edit) are recorded as parents: c2pa.edited."""
        import c2pa

        info = c2pa.C2paSignerInfo(
            getattr(c2pa.C2paSigningAlg, self.alg), self.cert_chain, self.private_key, None
        )
        signer = c2pa.Signer.from_info(info)  # a signer is consumed by one signing
        out = io.BytesIO()
        with c2pa.Builder(self.manifest(model, title, edited=bool(ingredients))) as builder:
            for k, raw in enumerate(ingredients):
                ing_format = Image.open(io.BytesIO(raw)).format.lower()
                mime = CONTENT_TYPES.get(
                    "jpeg" if ing_format == "jpeg" else ing_format, f"image/{ing_format}"
                )
                meta = {"title": f"reference {k + 1}", "label": f"reference-{k + 1}",
                        "relationship": "parentOf" if k == 0 else "componentOf"}  # fmt: skip
                builder.add_ingredient(json.dumps(meta), mime, io.BytesIO(raw))
            builder.sign(signer, CONTENT_TYPES[fmt], io.BytesIO(data), out)
        return out.getvalue()


def read_manifest(data: bytes, mime: str, trust_anchor_pem: bytes | None = None) -> tuple[str, dict | None]:
    """(validation state, active manifest) of a signed file; state is Valid, Trusted or Invalid.
    ValueError for a trust anchor that is not a PEM certificate bundle."""
    import c2pa

    context = None
    if trust_anchor_pem:
        try:
            pem = trust_anchor_pem.decode()
            settings = {"verify": {"verify_trust": True}, "trust": {"trust_anchors": pem}}
            context = c2pa.Context(c2pa.Settings.from_dict(settings))
        except Exception as e:  # not text, or not certificates c2pa can parse
            raise ValueError(f"not a usable PEM certificate bundle: {e}") from None
    try:
        with c2pa.Reader(mime, io.BytesIO(data), context=context) as reader:
            store = json.loads(reader.json())
            state = reader.get_validation_state()
    except Exception as e:  # no manifest, or one too broken to parse
        return f"no manifest ({e})", None
    active = store.get("manifests", {}).get(store.get("active_manifest"))
    return state, active
