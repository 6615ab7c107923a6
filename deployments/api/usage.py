"""Usage: what the calling key was billed, summed by day or by model."""

from __future__ import annotations

from datetime import UTC, date, datetime

from fastapi import APIRouter, Depends, Query, Request

from deployments.api.auth import caller
from deployments.api.deps import service_of
from deployments.api.errors import documented
from deployments.jobs.errors import FieldError
from deployments.jobs.metering import summarize

router = APIRouter()
MAX_USAGE_DAYS = 366


@router.get("/v1/usage", responses=documented(401, 503))
async def usage(
    request: Request,
    start: date | None = Query(
        None, description="first day, YYYY-MM-DD (UTC, by submission); default: the 1st of this month"
    ),
    end: date | None = Query(None, description="last day, inclusive; default: today (UTC)"),
    group_by: str = Query("day", pattern="^(day|model)$", description="day or model"),
    key_id: str = Depends(caller),
):
    today = datetime.now(UTC).date()
    end = end or today
    start = start or end.replace(day=1)
    if end < start:
        raise FieldError("end", f"must not be before start ({start})")
    if (end - start).days > MAX_USAGE_DAYS:
        raise FieldError("end", f"the range must be at most {MAX_USAGE_DAYS} days")
    records = await service_of(request).usage(key_id, start, end)
    total = summarize(records, "key_id")
    return {
        "key_id": key_id,
        "start": start.isoformat(),
        "end": end.isoformat(),
        "group_by": group_by,
        "groups": summarize(records, group_by),
        "total": total[0] if total else {"jobs": 0, "input_mp": 0.0, "output_mp": 0.0, "cost": 0.0},
    }
