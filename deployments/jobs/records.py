"""Job records and the storage layout: every object key the service writes is named here.

jobs/{id}.json                         the job record (compare-and-swap on its ETag)
pending/{key_id}/{id}                  a job not yet terminal: the reaper scans these, and a key's
                                       count of them is its jobs in flight; written before the
                                       record, dropped after its terminal version
cancel/{id}                            a client asked to cancel; the transformer checks between steps
progress/{id}.json                     the running attempt's last denoising step (the transformer's)
previews/{id}/{attempt}-{step}.jpeg    a preview of the image at that step (the Codec's), for
                                       requests that asked; these two may expire after a day
inputs/{id}/{nonce}-{k}                reference image k (an inpainting's mask after them), kept
                                       so the job can be run again
images/{yyyy}/{mm}/{dd}/{id}.{ext}     the output, at a key fixed at submission: every attempt
                                       writes the same object
idempotency/{key_id}/{sha256(token)}   which job an Idempotency-Key stands for (a bucket lifecycle
                                       rule may expire these after 24 h or more)
usage/{key_id}/{yyyy}/{mm}/{dd}/{id}.json   one usage record per Ready job, on its submission day
late/{key_id}/{id}/{until}             a runner's usage write that may land after the job's lease
                                       (until that time): the reaper withdraws it then if the job
                                       did not end Ready, and drops the notice
compile-cache/{stage}/{digest}.bin     code inductor compiled for a stage (stages.compile_cache)
"""

from __future__ import annotations

import hashlib
import math
import time
import uuid
from datetime import UTC, datetime
from enum import StrEnum

from pydantic import BaseModel, Field, PrivateAttr

from klein.image import EXTENSIONS
from klein.request import steps_run

ANONYMOUS = "anonymous"  # the key id when the service runs without keys (loopback only)


def job_key(job_id: str) -> str:
    return f"jobs/{job_id}.json"


PENDING = "pending"  # the prefix of every pending marker


def marker_prefix(key_id: str) -> str:
    return f"{PENDING}/{key_id}"


def marker_key(key_id: str, job_id: str) -> str:
    return f"{marker_prefix(key_id)}/{job_id}"


LATE = "late"  # the prefix of every late-charge notice


def late_charge_key(key_id: str, job_id: str, until: float) -> str:
    """A runner writing a job's usage record late: it may land until `until` (whole seconds)."""
    return f"{LATE}/{key_id}/{job_id}/{math.ceil(until)}"


def cancel_key(job_id: str) -> str:
    return f"cancel/{job_id}"


def progress_key(job_id: str) -> str:
    return f"progress/{job_id}.json"


def preview_prefix(job_id: str) -> str:
    return f"previews/{job_id}/"


def preview_key(job_id: str, attempt: int, step: int) -> str:
    return f"{preview_prefix(job_id)}{attempt}-{step}.jpeg"


def input_key(job_id: str, nonce: str, k: int) -> str:
    return f"inputs/{job_id}/{nonce}-{k}"


def output_key(day: str, job_id: str, output_format: str) -> str:
    """`day` is YYYY-MM-DD (UTC, the job's submission)."""
    return f"images/{day.replace('-', '/')}/{job_id}.{EXTENSIONS[output_format]}"


def idempotency_key(key_id: str, token: str) -> str:
    return f"idempotency/{key_id}/{hashlib.sha256(token.encode()).hexdigest()[:32]}.json"


def usage_prefix(key_id: str, day: str) -> str:
    """Where a key's usage records for one day (YYYY-MM-DD) live."""
    return f"usage/{key_id}/{day.replace('-', '/')}"


def usage_key(key_id: str, day: str, job_id: str) -> str:
    """One object per Ready job at a key fixed by the job: re-runs overwrite it, never add one."""
    return f"{usage_prefix(key_id, day)}/{job_id}.json"


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
    loras: list[dict] = Field(default_factory=list)  # LoRA adapters: {path, scale, key (versioned)}
    previews: list[int] = Field(default_factory=list)  # the steps whose preview the client gets
    mask_key: str | None = None  # inpainting: the mask (white repaints input 0), stored with the inputs
    strength: float | None = None  # inpainting: how much of the schedule runs

    @property
    def input_files(self) -> list[str]:
        """Storage keys of every input file: the images, then the mask."""
        return [*self.input_keys, *([self.mask_key] if self.mask_key else [])]

    @property
    def run_steps(self) -> int:
        """The steps that run (an inpainting runs the last `strength` part of the schedule)."""
        return steps_run(self.steps, self.strength)


class JobResult(BaseModel):
    key: str
    width: int
    height: int
    content_type: str
    size_bytes: int

    @classmethod
    def of(cls, finished) -> JobResult:
        """From the Codec's FinishResult."""
        fields = ("key", "width", "height", "content_type", "size_bytes")
        return cls(**{name: getattr(finished, name) for name in fields})


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
    def charge(self) -> float:
        """What the caller is charged: the price while the job may still make its image, the price
        once Ready, nothing once it ended otherwise (errors, cancellations, moderation are free)."""
        return self.cost if self.status in (Status.PENDING, Status.READY) else 0.0

    @property
    def day(self) -> str:
        """The UTC day it was submitted on, YYYY-MM-DD: its usage is metered to that day."""
        return datetime.fromtimestamp(self.created_at, UTC).strftime("%Y-%m-%d")

    @property
    def output_key(self) -> str:
        return output_key(self.day, self.id, self.request.output_format)

    def adopt(self, stored: JobRecord) -> None:
        """Become the stored version (this copy was stale)."""
        for name in JobRecord.model_fields:
            setattr(self, name, getattr(stored, name))
        self._etag = stored._etag

    def summary(self, sample: str | None) -> dict | None:
        """The `result` of a Ready job as BFL's get_result and the webhooks give it; `sample` is a
        link to the image (its storage key when there is none)."""
        if self.status is not Status.READY or self.result is None:
            return None
        return {
            "sample": sample or self.result.key,
            "prompt": self.request.prompt,
            "seed": self.request.seed,
            "width": self.result.width,
            "height": self.result.height,
            "output_format": self.request.output_format,
            "start_time": self.started_at,
            "end_time": self.finished_at,
            "duration": (self.finished_at or 0) - (self.started_at or 0),
        } | ({"loras": self.adapters()} if self.request.loras else {})

    def adapters(self) -> list[dict]:
        """The LoRA adapters the job used, as the request named them."""
        return [{"path": lora["path"], "scale": lora["scale"]} for lora in self.request.loras]


MAX_PREVIEWS = 10  # a job's previews when it asks for them (`preview: true`)


def preview_steps(steps: int, count: int) -> list[int]:
    """Up to `count` steps, evenly spread, before the last one (whose image is the result)."""
    count = min(count, steps - 1)
    if count <= 0:
        return []
    return sorted({round(steps * j / (count + 1)) for j in range(1, count + 1)} - {0, steps})


def new_job_id() -> str:
    return uuid.uuid4().hex
