"""The Codec's post-processing: safety classification of outputs (and of inputs, on request),
invisible watermark, file encoding, C2PA signing. Options are typed here; the Codec runs them."""

from __future__ import annotations

import importlib.metadata
import io
import logging
from pathlib import Path
from typing import Literal

from PIL import Image
from pydantic import Field, field_validator, model_validator

from deployments.options import Options
from deployments.stages.payloads import ContentModerated, FinishParams
from klein.provenance import BFL_WATERMARK_BITS, C2PASigner, Watermarker, parse_bits
from klein.safety import NSFWClassifier, PromptFilter

log = logging.getLogger(__name__)


def service_version() -> str:
    try:
        return importlib.metadata.version("klein-serve")
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0"


class SafetyOptions(Options):
    classifier: Path | None = Field(
        None, description="local transformers image-classification folder with an 'nsfw' label"
    )
    require_classifier: bool = Field(False, description="refuse to start without a classifier (production)")
    check_inputs: bool = Field(True, description="classify input images too (Request Moderated)")
    prompt_terms: list[str] = Field(
        default_factory=list, description="blocked words/phrases (Request Moderated)"
    )
    prompt_terms_file: Path | None = Field(None, description="one blocked term per line")

    @model_validator(mode="after")
    def _classifier_when_required(self):
        if self.require_classifier and self.classifier is None:
            raise ValueError("safety.classifier: required when safety.require_classifier is set")
        return self

    def prompt_filter(self) -> PromptFilter:
        if self.prompt_terms_file is not None:
            return PromptFilter.from_file(self.prompt_terms_file, self.prompt_terms)
        return PromptFilter(self.prompt_terms)


class ProvenanceOptions(Options):
    watermark: bool = Field(True, description="invisible watermark (dwtDct) in every output of 256 px and up")
    watermark_bits: str = Field(BFL_WATERMARK_BITS, description="48-bit payload; default: BFL's FLUX.2 mark")
    c2pa_cert_chain: Path | None = Field(
        None, description="PEM certificate chain, leaf first (KLEIN_PROVENANCE__C2PA_CERT_CHAIN)"
    )
    c2pa_key: Path | None = Field(
        None, description="PEM private key of the leaf (KLEIN_PROVENANCE__C2PA_KEY)"
    )
    c2pa_alg: Literal["ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "ED25519"] = Field(
        "ES256", description="signature algorithm of the C2PA manifest (the certificate's key type)"
    )

    @field_validator("watermark_bits")
    @classmethod
    def _bits(cls, v: str) -> str:
        parse_bits(v)
        return v

    @model_validator(mode="after")
    def _both_or_neither(self):
        if (self.c2pa_cert_chain is None) != (self.c2pa_key is None):
            raise ValueError("c2pa_cert_chain and c2pa_key: C2PA signing needs both (or neither)")
        return self


class PostProcessor:
    """Built in each Codec replica: classifier, watermark, C2PA signer, each optional."""

    def __init__(self, safety: SafetyOptions, provenance: ProvenanceOptions, device="cpu"):
        # (without a classifier or C2PA credentials the app builder said so, once)
        self.classifier = NSFWClassifier(safety.classifier, device) if safety.classifier else None
        self.watermark = Watermarker(provenance.watermark_bits) if provenance.watermark else None
        signer = None
        if provenance.c2pa_cert_chain and provenance.c2pa_key:
            signer = C2PASigner.from_files(
                provenance.c2pa_cert_chain,
                provenance.c2pa_key,
                version=service_version(),
                alg=provenance.c2pa_alg,
            )
        self.signer = signer

    def moderate(self, images: list[Image.Image], tolerance: int) -> list[bool]:
        return self.classifier.flagged(images, tolerance) if self.classifier else [False] * len(images)

    def flagged(self, images: list[Image.Image], params: list[FinishParams]) -> list[bool]:
        """Output moderation for a whole batch: one classifier forward, each at its own tolerance."""
        if self.classifier is None or not images:
            return [False] * len(images)
        from klein.safety import threshold

        return [
            s > threshold(p.safety_tolerance)
            for s, p in zip(self.classifier.scores(images), params, strict=True)
        ]

    def pixels(self, image: Image.Image, p: FinishParams, flagged: bool) -> Image.Image:
        """Before encoding: moderated images go no further; the rest get the watermark."""
        if flagged:
            raise ContentModerated(p.job_id)
        return self.watermark.embed(image) if self.watermark else image

    def file(self, data: bytes, p: FinishParams, ingredients: list[bytes]) -> bytes:
        """After encoding: the signed C2PA manifest."""
        if self.signer is None:
            return data
        return self.signer.sign(data, p.output_format, p.model, Path(p.key).name, ingredients)


def open_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image
