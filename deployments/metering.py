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


class UsageRecord(BaseModel):
    job_id: str
    key_id: str
    model: str
    day: str  # YYYY-MM-DD of the job's submission (UTC)
    input_mp: float
    output_mp: float
    cost: float
    finished_at: float


def usage_prefix(key_id: str, day: str) -> str:
    """Where a key's usage records for one day (YYYY-MM-DD) live."""
    return f"usage/{key_id}/{day.replace('-', '/')}"


def usage_key(key_id: str, day: str, job_id: str) -> str:
    """One object per Ready job at a key fixed by the job: re-runs overwrite it, never add one."""
    return f"{usage_prefix(key_id, day)}/{job_id}.json"


def summarize(records: list[UsageRecord], group_by: str) -> list[dict]:
    groups: dict[str, dict] = {}
    for r in records:
        g = groups.setdefault(
            getattr(r, group_by),
            {group_by: getattr(r, group_by), "jobs": 0, "input_mp": 0.0, "output_mp": 0.0, "cost": 0.0},
        )
        g["jobs"] += 1
        g["input_mp"] += r.input_mp
        g["output_mp"] += r.output_mp
        g["cost"] += r.cost
    return [{**g, "cost": round(g["cost"], 6)} for _, g in sorted(groups.items())]
