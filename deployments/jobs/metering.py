"""Metering: per-megapixel pricing (BFL's FLUX.2 formula) in credits (1 credit = 1 US cent), and
one usage record per Ready job in storage, at a key fixed by the job."""

from __future__ import annotations

import asyncio
import time
from datetime import date, timedelta

from pydantic import BaseModel, Field

from deployments.jobs.records import JobRecord, usage_key, usage_prefix
from deployments.options import Options
from deployments.storage import Storage


class Price(Options):
    first_mp: float = Field(..., ge=0, description="credits for the first output megapixel (or part of it)")
    per_mp: float = Field(
        ..., ge=0, description="credits per further output megapixel and per input megapixel"
    )
    lora_per_mp: float = Field(
        0.0, ge=0, description="surcharge per output megapixel for a job with LoRA adapters (however many)"
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


def cost(price: Price, output_mp: float, input_mp: float, loras: int = 0) -> float:
    """first MP + (output MP - 1) * price + input MP * price (+ output MP * LoRA surcharge with any
    adapter); megapixels unrounded."""
    base = price.first_mp + max(output_mp - 1.0, 0.0) * price.per_mp + input_mp * price.per_mp
    return round(base + (output_mp * price.lora_per_mp if loras else 0.0), 6)


class UsageRecord(BaseModel):
    job_id: str
    key_id: str
    model: str
    day: str  # YYYY-MM-DD of the job's submission (UTC)
    input_mp: float
    output_mp: float
    cost: float
    finished_at: float
    loras: list[str] = Field(default_factory=list)  # the adapters' paths, as the request named them


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


class Billing:
    """Writes and withdraws usage records, and reads a key's back."""

    def __init__(self, storage: Storage):
        self.storage = storage

    async def record(self, job: JobRecord) -> None:
        """The job's usage record, written before the job turns Ready. Shielded: a caller leaving
        meanwhile lets the write land, and the job's end (not Ready) then withdraws it."""
        record = UsageRecord(
            job_id=job.id,
            key_id=job.key_id,
            model=job.model,
            day=job.day,
            input_mp=job.input_mp,
            output_mp=job.output_mp,
            cost=job.cost,
            finished_at=job.finished_at or time.time(),
            loras=[lora["path"] for lora in job.request.loras],
        )
        key = usage_key(job.key_id, job.day, job.id)
        write = asyncio.ensure_future(
            self.storage.put(key, record.model_dump_json().encode(), "application/json")
        )
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            await asyncio.wait([write])
            raise

    async def withdraw(self, job: JobRecord) -> None:
        """Delete the job's usage record where there is one (most jobs that end unbilled never had
        one: only a deletion that is needed can fail and keep the job listed)."""
        key = usage_key(job.key_id, job.day, job.id)
        if await self.storage.get(key) is not None:
            await self.storage.delete(key)

    async def usage(self, key_id: str, first: date, last: date) -> list[UsageRecord]:
        """The key's usage records for jobs submitted on days first..last (inclusive, UTC)."""
        days = [(first + timedelta(days=n)).isoformat() for n in range((last - first).days + 1)]
        listed = await asyncio.gather(*(self.storage.list(usage_prefix(key_id, day)) for day in days))
        raws = await asyncio.gather(*(self.storage.get(k) for keys in listed for k in keys))
        return [UsageRecord.model_validate_json(r) for r in raws if r is not None]
