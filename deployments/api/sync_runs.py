"""The OpenAI images API's synchronous runs: a job run while its caller waits (and ended, unbilled,
if the caller leaves), and the streamed form (`stream: true`): the job's previews as
`{kind}.partial_image` events, then `{kind}.completed` with the image, as OpenAI's Images API sends."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import StreamingResponse

from deployments.api.deps import options_of, service_of
from deployments.api.events import sse
from deployments.api.schemas import ImagesRequest
from deployments.jobs.records import JobRecord, Status
from deployments.jobs.service import JobService
from deployments.stages.payloads import FinishResult

log = logging.getLogger(__name__)
MODERATED = (Status.REQUEST_MODERATED, Status.CONTENT_MODERATED)


async def stream(request: Request, body: ImagesRequest, job: JobRecord, kind: str):
    """One job run while its events go out: `{kind}.partial_image` for each preview (JPEG, 1/8 of
    the size), then `{kind}.completed` with the image, or an `error` event. The caller leaving
    cancels the job."""
    service, options = service_of(request), options_of(request)
    running = asyncio.ensure_future(run(service, job, True))
    feed = service.feed(job, reread=False)  # `job` is the live record of the run
    deadline = time.monotonic() + options.sync_timeout_s
    common = {"background": "opaque", "quality": "auto", "size": f"{job.request.width}x{job.request.height}"}
    previews, quiet_since = 0, time.monotonic()
    try:
        while True:
            done = running.done()  # then one last look: the previews of a job faster than a poll
            for event in await _poll(feed):
                if event.kind == "preview":
                    partial = {
                        "b64_json": event.data["image"].split(",", 1)[1],
                        "partial_image_index": previews,
                    }
                    yield _event(f"{kind}.partial_image", common | partial | {"output_format": "jpeg"})
                    previews, quiet_since = previews + 1, time.monotonic()
            if done or time.monotonic() > deadline:
                break
            if time.monotonic() - quiet_since >= options.events_keepalive_s:  # for idle timeouts
                yield ": keep-alive\n\n"
                quiet_since = time.monotonic()
            await asyncio.wait([running], timeout=options.events_poll_s)
        if not running.done():
            message = f"no result within {options.sync_timeout_s:g} s"
            yield sse("error", {"error": {"message": message, "type": "timeout", "job_ids": [job.id]}})
            return
        yield _ending(kind, job, running, common | {"output_format": body.output_format})
    finally:
        if not running.done():  # the caller went away (or timed out): the job ends Cancelled, unbilled
            # in its own task: this generator is being cancelled, and every await here would be too
            _CLEANUPS.add(task := asyncio.ensure_future(abandon(service, [job], [running])))
            task.add_done_callback(_CLEANUPS.discard)


_CLEANUPS: set[asyncio.Task] = set()


class JobStream(StreamingResponse):
    """A streamed job's answer. A client that goes away before the first event leaves the stream's
    generator unstarted, and its own clean-up with it: then the job is ended here (Cancelled,
    unbilled), so that it holds no place among the replica's running jobs and no input images."""

    def __init__(self, service: JobService, job: JobRecord, events: AsyncGenerator[str, None], **kw):
        self._service, self._job, self.started = service, job, False
        super().__init__(self._watched(events), **kw)

    async def _watched(self, events: AsyncGenerator[str, None]):
        self.started = True
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()  # its own clean-up (a job still running is abandoned)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.started:
                await asyncio.shield(self._service.discard(self._job))


async def _poll(feed) -> list:
    """A feed's new events; none when storage failed this time (the job itself goes on)."""
    try:
        return await feed.poll()
    except Exception as e:
        log.warning(
            "stream of job %s: reading its progress failed (%s: %s)", feed.job.id, type(e).__name__, e
        )
        return []


def _event(kind: str, fields: dict) -> str:
    return sse(kind, {"type": kind, "created_at": int(time.time())} | fields)


def _ending(kind: str, job: JobRecord, run: asyncio.Future, common: dict) -> str:
    """The stream's last event: the image, or why there is none."""
    error = run.exception()
    result = None if error else run.result()
    if result is None:
        moderated = job.status in MODERATED
        message = (
            f"{job.status.value}: {job.error or ''}"
            if job.status.terminal
            else f"{type(error).__name__}: {error}"
        )
        code = "content_policy_violation" if moderated else job.status.value.lower().replace(" ", "_")
        kind_ = "invalid_request_error" if moderated else "server_error"
        return sse("error", {"error": {"message": message, "type": kind_, "code": code, "job_ids": [job.id]}})
    r = job.request
    image_tokens = sum(h * w for h, w in r.ref_shapes)
    output_tokens = (r.width // 16) * (r.height // 16)
    usage = {
        "input_tokens": image_tokens,
        "input_tokens_details": {"image_tokens": image_tokens, "text_tokens": 0},
        "output_tokens": output_tokens,
        "total_tokens": image_tokens + output_tokens,
    }
    metering = {"input_mp": job.input_mp, "output_mp": job.output_mp, "cost": job.cost, "job_ids": [job.id]}
    image = {"b64_json": base64.b64encode(result.data).decode(), "usage": usage, "metering": metering}
    return _event(f"{kind}.completed", common | image)


@dataclass
class Outcome:
    """One job of a synchronous request: its image (`result`), or none and why: its run raised
    (`error`), it was stopped (`stopped`: the request's time ran out, or a sibling's run failed),
    or the job's own status and error say it."""

    job: JobRecord
    result: object = None
    error: BaseException | None = None
    stopped: str | None = None

    @property
    def why(self) -> str | None:
        if self.stopped is not None:
            return self.stopped
        if self.error is not None:
            return self.job.error or f"{type(self.error).__name__}: {self.error}"
        return self.job.error


async def run_all(
    service: JobService, jobs: list[JobRecord], return_bytes: bool, timeout_s: float
) -> list[Outcome]:
    """The jobs of one request run side by side while its caller waits. The first run that fails
    (a full stage queue sheds it, or storage fails) stops the others, as do `timeout_s` and the
    caller going away: what was not done ends Cancelled and unbilled, so an overloaded service
    does no work for a request it refused. The images made before that are kept: billed, and
    answered."""
    runs = [asyncio.ensure_future(run(service, job, return_bytes)) for job in jobs]
    try:
        _, left = await asyncio.wait(runs, timeout=timeout_s, return_when=asyncio.FIRST_EXCEPTION)
    except BaseException:  # the caller went away
        await abandon(service, jobs, runs)
        raise
    failed = next((r.exception() for r in runs if r.done() and r.exception() is not None), None)
    if left:
        await abandon(service, [j for j, r in zip(jobs, runs, strict=True) if r in left], list(left))
    why = (
        f"no result within {timeout_s:g} s"
        if failed is None
        else f"stopped with the request: {type(failed).__name__}: {failed}"
    )
    outcomes = []
    for job, r in zip(jobs, runs, strict=True):
        if r in left and job.status is Status.READY and job.result is not None:
            # it ended Ready (and billed) as it was stopped: the image is answered, not dropped
            outcomes.append(await _made_meanwhile(service, job, return_bytes, why))
        elif r in left:
            outcomes.append(Outcome(job, stopped=why))
        elif (error := r.exception()) is not None:
            outcomes.append(Outcome(job, error=error))
        else:
            outcomes.append(Outcome(job, result=r.result()))
    return outcomes


async def _made_meanwhile(service: JobService, job: JobRecord, return_bytes: bool, why: str) -> Outcome:
    made = job.result
    try:
        data = await service.storage.get(made.key) if return_bytes else None
    except Exception as e:  # made and billed, but not readable now: said so, with the job's id
        log.warning("job %s: Ready, but its image is unreadable now (%s: %s)", job.id, type(e).__name__, e)
        return Outcome(job, stopped=why)
    fields = made.model_dump()
    return Outcome(job, result=FinishResult(**fields, data=data))


async def run(service: JobService, job: JobRecord, return_bytes: bool):
    """A synchronous job to its end (the caller's connection waits): a full stage queue sheds it."""
    if job.status.terminal:
        return None
    return await service.run(job, return_bytes=return_bytes, fresh=True, shed=True)


async def abandon(service: JobService, jobs: list[JobRecord], runs: list[asyncio.Future]) -> None:
    """None of the jobs may go on to be billed: each ends Cancelled unless done."""
    for r in runs:
        r.cancel()
    for job in jobs:
        await asyncio.shield(service.cancel(job.id))  # the stages stop work on them
    await asyncio.shield(asyncio.gather(*runs, return_exceptions=True))
    for job in jobs:  # any whose run never began: ended here, unbilled, and no longer counted
        await asyncio.shield(service.discard(job))
