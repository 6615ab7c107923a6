"""Job records in object storage: the ingress is stateless and any replica answers any poll.

Layout (docs/architecture.md §6): `jobs/{id}.json` is the record; `pending/{key_id}/{id}` marks a
job that has not reached a terminal status (the reaper scans only these; a key's count of them is
its jobs in flight), written before the record and dropped after its terminal version; `cancel/{id}` asks the stages to stop; `inputs/{id}/{nonce}-{k}` keeps
reference images so a job can be run again; outputs go to `images/{yyyy}/{mm}/{dd}/{id}.{ext}`, a
key fixed at submission so every attempt writes the same object.

A record is only ever written over the version its writer last read or wrote (a compare-and-swap on
the object's ETag), so a job has one runner at a time: a reaper claims an abandoned job by renewing
its lease over the version it judged expired, and a runner whose record changed under it (another
runner took the job over) learns so at its next write (`Superseded`) and stops.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime
from enum import StrEnum

from pydantic import BaseModel, Field, PrivateAttr

from deployments.auth import ANONYMOUS
from deployments.storage import PreconditionFailed, Storage, StorageError


class Status(StrEnum):
    PENDING = "Pending"
    READY = "Ready"
    ERROR = "Error"
    REQUEST_MODERATED = "Request Moderated"
    CONTENT_MODERATED = "Content Moderated"
    CANCELLED = "Cancelled"
    NOT_FOUND = "Task not found"  # only ever in responses

    @property
    def terminal(self) -> bool:
        return self is not Status.PENDING


EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class JobRequest(BaseModel):
    prompt: str
    width: int
    height: int
    seed: int
    steps: int
    guidance: float | None = None
    safety_tolerance: int = 2
    output_format: str = "jpeg"
    input_keys: list[str] = Field(default_factory=list)
    ref_shapes: list[tuple[int, int]] = Field(default_factory=list)  # token grids after resizing
    webhook_url: str | None = None
    webhook_secret: str | None = None
    public_url: str | None = None  # the base URL the client reached us at: links in the webhook


class JobResult(BaseModel):
    key: str
    width: int
    height: int
    content_type: str
    size_bytes: int


class JobRecord(BaseModel):
    id: str
    model: str
    key_id: str = ANONYMOUS  # the API key's public id: the job's owner
    status: Status = Status.PENDING
    request: JobRequest
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    attempts: int = 0
    lease_until: float = 0.0  # past it, a Pending job is presumed abandoned and run again
    started_at: float | None = None
    finished_at: float | None = None
    result: JobResult | None = None
    error: str | None = None
    input_mp: float = 0.0
    output_mp: float = 0.0
    cost: float = 0.0
    trace: dict[str, str] | None = None  # W3C context of the submitting request: re-runs join its trace
    sync: bool = False  # a synchronous (OpenAI) request's: its caller waits on one connection
    body_sha256: str | None = None  # of the request, when it came with an Idempotency-Key
    _etag: str | None = PrivateAttr(None)  # the stored version this copy was read as or written as

    @property
    def day(self) -> str:
        """The UTC day it was submitted on, YYYY-MM-DD: its usage is metered to that day."""
        return datetime.fromtimestamp(self.created_at, UTC).strftime("%Y-%m-%d")

    @property
    def output_key(self) -> str:
        return f"images/{self.day.replace('-', '/')}/{self.id}.{EXTENSIONS[self.request.output_format]}"


def new_job_id() -> str:
    return uuid.uuid4().hex


def _marker(key_id: str, job_id: str) -> str:
    return f"pending/{key_id}/{job_id}"


class Superseded(Exception):
    """A job record was not the version this copy of it came from: another runner has taken the job
    over (or, for a record being created, one with its id exists). This copy must not be written."""


class JobStore:
    def __init__(self, storage: Storage):
        self.storage = storage

    async def create(self, job: JobRecord) -> None:
        """The pending marker, then the record: a failure between the two leaves a
        marker without a record (dropped by the reaper once no write of the record can still be under
        way), never a record the reaper cannot see."""
        await self.mark_pending(job)
        await self.save(job)

    async def mark_pending(self, job: JobRecord) -> None:
        """List the job for the reaper (and in its key's count of jobs in flight)."""
        marker = json.dumps({"marked_at": time.time()}).encode()
        await self.storage.put(_marker(job.key_id, job.id), marker, "application/json")

    async def marked_at(self, key_id: str, job_id: str) -> float | None:
        """When a job's pending marker was written; None without one, 0 if it does not say."""
        raw = await self.storage.get(_marker(key_id, job_id))
        if raw is None:
            return None
        try:
            return float(json.loads(raw)["marked_at"])
        except (ValueError, KeyError, TypeError):
            return 0.0

    async def unmark(self, key_id: str, job_id: str) -> None:
        await self.storage.delete(_marker(key_id, job_id))

    async def save(self, job: JobRecord) -> None:
        """Write the record over the version `job` was read or last written as; a record never stored
        is created, only if none with its id exists. Else Superseded, and nothing is written."""
        job.updated_at = time.time()
        data = job.model_dump_json().encode()
        try:
            job._etag = await self.storage.put(f"jobs/{job.id}.json", data, "application/json",
                                               if_match=job._etag, if_none_match=job._etag is None)  # fmt: skip
        except PreconditionFailed:
            raise Superseded(job.id) from None

    async def get(self, job_id: str, retry_s: float | None = None) -> JobRecord | None:
        if not (job_id.isascii() and job_id.isalnum()) or len(job_id) > 64:  # ids are ASCII hex
            return None
        for attempt in range(6):
            found = await self.storage.get_versioned(f"jobs/{job_id}.json", retry_s=retry_s)
            if found is None:
                return None
            try:
                job = JobRecord.model_validate_json(found[0])
                job._etag = found[1]
                return job
            except ValueError:  # a non-atomic S3-compatible server served a half-written object
                if attempt == 5:
                    raise StorageError(f"job record {job_id} is unreadable") from None
                await asyncio.sleep(0.05 * 2**attempt)

    async def finish(self, job: JobRecord) -> None:
        """Save a terminal record, then drop the pending marker (in this order: never lost)."""
        assert job.status.terminal
        await self.save(job)
        await self.unmark(job.key_id, job.id)

    async def pending(self) -> list[tuple[str, str]]:
        """(key_id, job_id) of every job not yet terminal."""
        return [tuple(k.split("/")[1:3]) for k in await self.storage.list("pending") if k.count("/") == 2]

    async def in_flight_ids(self, key_id: str) -> set[str]:
        """Ids of the key's jobs not yet terminal."""
        return {key.rsplit("/", 1)[1] for key in await self.storage.list(f"pending/{key_id}")}

    async def in_flight(self, key_id: str) -> int:
        return len(await self.in_flight_ids(key_id))

    async def request_cancel(self, job_id: str) -> None:
        await self.storage.put(f"cancel/{job_id}", b"", "text/plain")

    async def cancel_requested(self, job_id: str) -> bool:
        return await self.storage.get(f"cancel/{job_id}") is not None
