"""Per-megapixel pricing (BFL's FLUX.2 formula) in credits; 1 credit = 1 US cent."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Price(BaseModel):
    first_mp: float = Field(..., ge=0, description="credits for the first output megapixel (or part of it)")
    per_mp: float = Field(
        ..., ge=0, description="credits per further output megapixel and per input megapixel"
    )


DEFAULT_PRICES = {  # docs.bfl.ai pricing, 2026: klein 4B 1.4 + 0.1 / MP, klein 9B 1.5 + 0.2 / MP
    "flux-2-klein-4b": Price(first_mp=1.4, per_mp=0.1),
    "flux-2-klein-base-4b": Price(first_mp=1.4, per_mp=0.1),
    "flux-2-klein-9b": Price(first_mp=1.5, per_mp=0.2),
    "flux-2-klein-base-9b": Price(first_mp=1.5, per_mp=0.2),
    "flux-2-klein-tiny": Price(first_mp=0.0, per_mp=0.0),
    "flux-2-klein-tiny-base": Price(first_mp=0.0, per_mp=0.0),
}


def megapixels(pixels: int) -> float:
    return pixels / 1e6


def cost(price: Price, output_mp: float, input_mp: float) -> float:
    """first MP + (output MP - 1) * price + input MP * price; megapixels unrounded."""
    return round(price.first_mp + max(output_mp - 1.0, 0.0) * price.per_mp + input_mp * price.per_mp, 6)
