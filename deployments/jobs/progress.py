"""A job's progress while it runs, kept in storage so that any ingress replica can report it.

The FlowTransformer reports denoising steps through a `ProgressBoard` (one small object per job,
`progress/{id}.json`, overwritten); the Codec stores the previews a request asked for
(`previews/{id}/{attempt}-{step}.jpeg`). An `EventFeed` turns the record, that object and the
previews into the events of one job, each with a position that orders them:

    attempt * 10000 + rank   rank: 0 queued, 1 embedding, 2 denoising, 10 + 2 step (the step done),
                             11 + 2 step (its preview), 9000 decoding; the result is FINAL

A client that reconnects with the last position it saw gets only what comes after it; a retried job
(a new attempt) starts again at step 1 with higher positions. A job's first attempt does not write
its record when it starts (it was just written), so until its first step it shows as queued.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from deployments.jobs.records import JobRecord, Status, preview_key, progress_key
from deployments.jobs.store import JobStore
from deployments.stages.payloads import StepDone
from deployments.storage import Storage, StorageOptions, open_storage

FINAL = 10**9  # the result's position: always last
PREVIEW_WAIT_S = 2.0  # how long a stream holds its progress back for a preview not yet stored
_ATTEMPT = 10_000
_FINISH_RANK = 9_000


@dataclass(frozen=True)
class Event:
    position: int
    kind: str  # status | progress | preview | result
    data: dict


@dataclass(frozen=True)
class Step:
    """A job's last reported step, as stored."""

    attempt: int
    step: int
    steps: int

    @property
    def fraction(self) -> float:
        """Of the work: the steps and the decode count as steps + 1 equal parts."""
        return round(self.step / (self.steps + 1), 4)


def current(job: JobRecord, step: Step | None) -> tuple[int, Step | None]:
    """The attempt under way and its step (None: an earlier attempt's, or none yet). A job's first
    attempt starts without writing its record again (it was just written), so a step newer than the
    record's attempt count is that attempt's."""
    attempt = max(job.attempts, step.attempt if step is not None else 0)
    return attempt, step if step is not None and step.attempt == attempt else None


def progress_of(job: JobRecord, step: Step | None) -> float:
    """`progress` in get_result: 1 once terminal, else the share of the running attempt done."""
    if job.status.terminal:
        return 1.0
    _, step = current(job, step)
    return step.fraction if step is not None else 0.0


class ProgressBoard:
    """The FlowTransformer's progress sink (stages.payloads.ProgressSink) over storage: picklable
    (its storage options travel; the replica that unpickles it opens storage there)."""

    def __init__(self, storage: StorageOptions):
        self.options = storage
        self._storage = open_storage(storage)

    def __getstate__(self):
        return {"options": self.options}

    def __setstate__(self, state):
        self.__init__(state["options"])

    async def __call__(self, done: list[StepDone]) -> None:
        await asyncio.gather(*(write_step(self._storage, d) for d in done))


async def write_step(storage: Storage, done: StepDone) -> None:
    body = {"attempt": done.attempt, "step": done.step, "steps": done.steps, "at": time.time()}
    await storage.put(progress_key(done.job_id), json.dumps(body).encode(), "application/json")


async def read_step(storage: Storage, job_id: str, retry_s: float | None = None) -> Step | None:
    raw = await storage.get(progress_key(job_id), retry_s=retry_s)
    if raw is None:
        return None
    try:
        body = json.loads(raw)
        return Step(int(body["attempt"]), int(body["step"]), int(body["steps"]))
    except (ValueError, KeyError, TypeError):  # half-written on a non-atomic server: next time
        return None


class EventFeed:
    """The events of one job, polled from storage. `poll` returns what is new since the last call
    (or since position `after`), in strictly increasing positions; once the job is terminal, its
    last event is the result, given as `describe(job, step)` makes it (the API's get_result body),
    whatever `after` was.

    A preview is stored a moment after its step is reported (the Codec renders it), so the feed
    holds the progress back at a planned preview's step until it is there, for at most
    PREVIEW_WAIT_S (a preview the classifier withheld never comes): a client that reconnects after
    a later position has never been owed an earlier preview."""

    def __init__(
        self,
        store: JobStore,
        job: JobRecord,
        *,
        after: int = -1,
        describe: Callable[[JobRecord, Step | None], dict] | None = None,
        reread: bool = True,
    ):
        """`reread`: read the record from storage at each poll but the first (`job` was just read);
        False: `job` is the live record of a run in this process."""
        self.store, self.storage, self.job = store, store.storage, job
        self.last, self.describe, self.reread = after, describe, reread  # the last position given
        self.waiting: dict[tuple[int, int], float] = {}  # (attempt, step) of a due preview -> since
        self.given_up: set[tuple[int, int]] = set()
        self.ended, self.polls = False, 0

    def _given(self, candidates: list[tuple[int, str, dict]]) -> list[Event]:
        """The candidates after the last position given, in order; the last position moves on."""
        events = []
        for position, kind, data in sorted(candidates, key=lambda c: c[0]):
            if position > self.last:
                self.last = position
                events.append(Event(position, kind, {"id": self.job.id, **data}))
        return events

    async def poll(self) -> list[Event]:
        if self.ended:
            return []
        if self.reread and self.polls:
            self.job = await self.store.get(self.job.id) or self.job
        self.polls += 1
        job = self.job
        attempt, step = current(job, await read_step(self.storage, job.id))
        if job.status.terminal:  # the previews it has not given (a fast job's), then the result
            self.ended = True
            previews = []
            if job.status is Status.READY:
                previews = await self._previews(job, attempt, job.request.run_steps, wait=False)
            body = self.describe(job, step) if self.describe else {"status": job.status.value}
            return self._given(previews) + [Event(FINAL, "result", body)]
        candidates = [self._status(attempt, step)]
        if step is not None:
            previews = await self._previews(job, attempt, step.step, wait=True)
            held = min([step.step, *(s - 1 for s in self._awaited(attempt))])  # not past a due preview
            step = Step(step.attempt, held, step.steps)
            candidates = [self._status(attempt, step), *previews]
            if held > 0:
                data = {"stage": "denoise", "step": held, "steps": step.steps, "progress": step.fraction}
                candidates.append((attempt * _ATTEMPT + 10 + 2 * held, "progress", data))
        return self._given(candidates)

    def _status(self, attempt: int, step: Step | None) -> tuple[int, str, dict]:
        if attempt == 0:
            stage, rank = "queued", 0
        elif step is None:
            stage, rank = "embed", 1
        elif step.step < step.steps:
            stage, rank = "denoise", 2
        else:
            stage, rank = "finish", _FINISH_RANK
        data = {"status": Status.PENDING.value, "stage": stage, "attempt": attempt}
        return attempt * _ATTEMPT + rank, "status", data

    def _awaited(self, attempt: int) -> list[int]:
        """Steps of this attempt whose preview is due, not stored yet, and still waited for."""
        now = time.monotonic()
        return [s for (a, s), since in self.waiting.items() if a == attempt and now - since < PREVIEW_WAIT_S]

    async def _previews(self, job: JobRecord, attempt: int, done: int, wait: bool) -> list[tuple]:
        """Candidates for the due previews (steps up to `done`) not given yet, read from storage; with
        `wait`, up to the first one not stored yet that is still waited for."""
        base, r = attempt * _ATTEMPT, job.request
        due = [
            s
            for s in r.previews
            if s <= done and base + 11 + 2 * s > self.last and (attempt, s) not in self.given_up
        ]
        files = await asyncio.gather(*(self.storage.get(preview_key(job.id, attempt, s)) for s in due))
        now, size, out = time.monotonic(), {"width": r.width // 8, "height": r.height // 8}, []
        for s, data in zip(due, files, strict=True):
            if data is not None:
                self.waiting.pop((attempt, s), None)
                image = {"step": s, "steps": r.run_steps, "image": _data_uri(data), **size}
                out.append((base + 11 + 2 * s, "preview", image))
            elif wait:
                if now - self.waiting.setdefault((attempt, s), now) < PREVIEW_WAIT_S:
                    break  # the ones after it wait with it
                self.waiting.pop((attempt, s))
                self.given_up.add((attempt, s))  # withheld by the classifier, or lost
        return out


def _data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
