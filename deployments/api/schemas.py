"""HTTP request and response schemas: the BFL-compatible async API and the OpenAI-compatible images
API. Every rejection names the field and its bound (HTTP 422)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, field_validator

from deployments.jobs.errors import FieldError
from deployments.netguard import TargetRefused, check_url
from klein.request import LORA_PLACES_LIMIT, LORA_SCALE, MAX_PROMPT_CHARS, MAX_SEED, LoraRequest

OutputFormat = Literal["jpeg", "png", "webp"]


# --- BFL-compatible async API ---


class LoraSpec(BaseModel):
    """One LoRA adapter for a request (an extension of both APIs, as fal's klein endpoints take it)."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        ...,
        min_length=1,
        max_length=2048,
        description="a registry adapter's name, or an http(s) URL where allowed",
    )
    scale: float = Field(
        strict=True, default=1.0, ge=-LORA_SCALE, le=LORA_SCALE, description="strength; negative subtracts"
    )


# the deployment's own limit (lora.max_loras, 3 by default) is checked at submission
Loras = Field(
    None,
    max_length=LORA_PLACES_LIMIT,
    description="LoRA adapters, added together (3 at most unless the deployment says otherwise)",
)


Side = Field(
    strict=True, default=None, ge=64, le=2048, multiple_of=16, description="default 1024 or the first input's"
)
Strength = Field(
    strict=True,
    default=None,
    gt=0,
    le=1,
    description="inpainting (with a mask): how much is repainted (default 0.8)",
)


class GenerateRequest(BaseModel):
    """POST /v1/{model}: text-to-image, or editing with up to 4 input images."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., max_length=MAX_PROMPT_CHARS, description="text prompt")
    input_image: str | None = Field(
        None, description="reference image: base64, a data: URI, or an http(s) URL where fetching is on"
    )
    input_image_2: str | None = Field(None, description="second reference image")
    input_image_3: str | None = Field(None, description="third reference image")
    input_image_4: str | None = Field(None, description="fourth reference image")
    mask_image: str | None = Field(
        None,
        description="inpainting: repaint input_image where this mask is white (same size; like input_image)",
    )
    strength: float | None = Strength
    seed: int | None = Field(
        strict=True, default=None, ge=0, le=MAX_SEED, description="noise seed; random when omitted"
    )
    width: int | None = Side
    height: int | None = Side
    steps: int | None = Field(
        strict=True, default=None, ge=1, le=100, description="denoising steps (default: the model's)"
    )
    guidance: float | None = Field(
        strict=True, default=None, ge=1, le=20, description="CFG scale, Base models only"
    )
    safety_tolerance: int = Field(strict=True, default=2, ge=0, le=5, description="0 strict ... 5 permissive")
    output_format: OutputFormat = Field("jpeg", description="jpeg, png or webp")
    webhook_url: AnyHttpUrl | None = Field(None, description="POSTed {id, status, result} when the job ends")
    webhook_secret: str | None = Field(
        None, max_length=256, description="HMAC-SHA256 key for X-Klein-Signature"
    )
    loras: list[LoraSpec] | None = Loras
    preview: bool = Field(
        False,
        strict=True,
        description="previews of the image in progress on GET /v1/jobs/{id}/events (up to 10)",
    )

    @field_validator("webhook_url")
    @classmethod
    def _webhook_host(cls, url: AnyHttpUrl | None) -> AnyHttpUrl | None:
        if url is not None:
            try:
                check_url(str(url))
            except TargetRefused as e:
                raise ValueError(str(e)) from None
        return url

    def images(self) -> list[tuple[str, str]]:
        fields = ("input_image", "input_image_2", "input_image_3", "input_image_4")
        return [(f, getattr(self, f)) for f in fields if getattr(self, f) is not None]


class SubmitResponse(BaseModel):
    id: str
    polling_url: str
    cost: float
    input_mp: float
    output_mp: float


class ResultSample(BaseModel):
    sample: str
    prompt: str
    seed: int
    width: int
    height: int
    output_format: str
    start_time: float
    end_time: float
    duration: float
    loras: list[LoraSpec] | None = None  # the adapters used, as the request named them


class ResultResponse(BaseModel):
    id: str
    status: str
    result: ResultSample | None = None
    progress: float | None = None
    details: dict | None = None
    cost: float | None = None
    input_mp: float | None = None
    output_mp: float | None = None


# --- OpenAI-compatible images API ---


class ImagesRequest(BaseModel):
    """POST /v1/images/generations; `seed`, `steps`, `guidance`, `safety_tolerance` are extensions."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., max_length=MAX_PROMPT_CHARS)
    model: str | None = Field(None, description="a served model id (GET /v1/models)")
    n: int = Field(
        strict=True,
        default=1,
        ge=1,
        description="images to generate (seeds seed, seed+1, ...); at most max_images_per_request",
    )
    size: str = Field(
        "auto", description="'WxH' (multiples of 16, 64-2048) or 'auto' (1024x1024, or the first image's)"
    )
    response_format: Literal["url", "b64_json"] = "url"
    output_format: OutputFormat = "png"
    user: str | None = Field(None, max_length=256)
    seed: int | None = Field(strict=True, default=None, ge=0, le=MAX_SEED)
    steps: int | None = Field(strict=True, default=None, ge=1, le=100)
    guidance: float | None = Field(strict=True, default=None, ge=1, le=20)
    safety_tolerance: int = Field(strict=True, default=2, ge=0, le=5)
    loras: list[LoraSpec] | None = Loras
    strength: float | None = Strength
    stream: bool = Field(
        False, strict=True, description="answer with Server-Sent Events: partial images, then the image"
    )
    partial_images: int = Field(
        strict=True, default=0, ge=0, le=3, description="previews streamed before the image (with stream)"
    )


class ImageData(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str
    size: str
    metering: dict


def parse_size(size: str, field: str = "size") -> tuple[int, int] | None:
    """'WxH' -> (W, H); 'auto' -> None. Bounds are the model's, checked later."""
    if size == "auto":
        return None
    m = re.fullmatch(r"([0-9]{1,5})x([0-9]{1,5})", size)  # ASCII digits: \d takes any script's
    if not m:
        raise FieldError(field, f"must be 'WIDTHxHEIGHT' or 'auto', got {size!r}")
    return int(m[1]), int(m[2])


def lora_requests(loras: list[LoraSpec] | None) -> tuple[LoraRequest, ...]:
    return tuple(LoraRequest(lora.path, lora.scale) for lora in loras or ())
