"""Server-Sent Events: one job's status, steps, previews and result as they happen.

GET /v1/jobs/{id}/events answers from storage (jobs.progress.EventFeed), so any ingress replica can
serve any job's stream; a client that reconnects sends `Last-Event-ID` and gets only what it has
not seen; a finished job answers with its result at once. The stream only reads: a client leaving
costs its job nothing.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse

from deployments.api.auth import caller
from deployments.api.bfl import result_body
from deployments.api.deps import options_of, service_of
from deployments.api.errors import documented
from deployments.jobs.progress import EventFeed
from deployments.jobs.records import Status
from deployments.storage import StorageError

router = APIRouter()
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering


def streamed(description: str) -> dict:
    """The OpenAPI entry of a 200 that is (or may be) a stream of Server-Sent Events."""
    return {
        200: {"description": description, "content": {"text/event-stream": {"schema": {"type": "string"}}}}
    }


def sse(event: str, data: dict, id: int | None = None) -> str:
    """One Server-Sent Event (`data` as one line of JSON)."""
    head = f"id: {id}\n" if id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def watch(
    feed: EventFeed, poll_s: float, keepalive_s: float, run: asyncio.Future | None = None
) -> AsyncIterator[str]:
    """Poll a feed until its result; a comment line when nothing happened for `keepalive_s`. With
    `run` (the job's run, when this replica runs it), its end is seen at once, not at the next poll."""
    quiet_since = time.monotonic()
    while True:
        try:
            events = await feed.poll()
        except StorageError:  # unreachable for now: try again at the next poll
            events = []
        for e in events:
            yield sse(e.kind, e.data, e.position)
        if feed.ended:
            return
        if events:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= keepalive_s:
            quiet_since = time.monotonic()
            yield ": keep-alive\n\n"
        if run is not None and not run.done():
            await asyncio.wait([run], timeout=poll_s)
        else:
            await asyncio.sleep(poll_s)


def _last_seen(header: str | None) -> int:
    try:
        return int(header) if header else -1
    except ValueError:
        return -1


@router.get(
    "/v1/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses=documented(401, 404, 503) | streamed("status, progress, preview and result events"),
)
async def events(
    request: Request,
    job_id: str,
    key_id: str = Depends(caller),
    last_event_id: str | None = Header(None, max_length=32),
):
    service, options = service_of(request), options_of(request)
    job = await service.get(job_id, key_id)
    if job is None:
        return JSONResponse({"id": job_id, "status": Status.NOT_FOUND.value}, status_code=404)

    def describe(job, step) -> dict:
        return result_body(request, job, step).model_dump(exclude_none=True)

    feed = service.feed(job, after=_last_seen(last_event_id), describe=describe)
    stream = watch(feed, options.events_poll_s, options.events_keepalive_s, service.running_here(job.id))
    return StreamingResponse(stream, media_type="text/event-stream", headers=STREAM_HEADERS)
