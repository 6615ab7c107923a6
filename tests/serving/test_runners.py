"""One runner per job: job records are written by compare-and-swap, so racing reapers, racing
Idempotency-Key twins and a runner whose job was taken over cannot both act on one job. Two
ingress replicas are two `build`s over one storage root (their stages in this process)."""

from __future__ import annotations

import asyncio
import io
import threading
import time

from PIL import Image

from deployments.jobs import Status
from tests.serving.inprocess import build


def _args(**kw):
    return dict(prompt="a fox", width=64, height=64, seed=1, steps=None, guidance=None, safety_tolerance=2,
                output_format="png", images=[]) | kw  # fmt: skip


async def _expire(ingress, job):
    """As if the job's replica died during its first attempt: lease run out, Pending."""
    job.attempts, job.lease_until = 1, time.time() - 1
    await ingress.jobs.save(job)


def test_racing_reapers_restart_an_abandoned_job_once(tmp_path):
    a, b = build(tmp_path / "data"), build(tmp_path / "data")

    async def go():
        job, _ = await a.submit(**_args())
        await _expire(a, job)
        restarted = await asyncio.gather(a.reap(), b.reap())  # both read it expired before either wrote
        assert sorted(restarted) == [0, 1]
        await asyncio.gather(*a._running.values(), *b._running.values())
        stored = await a.jobs.get(job.id)
        assert stored.status is Status.READY and stored.attempts == 2  # one re-run, not two
        assert len(await a.storage.list("usage")) == 1

    asyncio.run(go())


def test_a_runner_whose_job_was_taken_over_stops_without_writing(tmp_path):
    a, b = build(tmp_path / "data"), build(tmp_path / "data")

    async def go():
        # taken over before the runner renews its lease: it stops before running anything
        job, _ = await a.submit(**_args())
        theirs = await b.jobs.get(job.id)
        theirs.attempts = 5  # another runner's mark on the record
        await b.jobs.save(theirs)
        assert await a.run(job) is None
        assert job.attempts == 5 and job.status is Status.PENDING  # the caller sees the stored record
        assert await a.storage.get(job.output_key) is None

        # taken over while it ran: its end is refused, and the charge it wrote is not left behind
        job, _ = await a.submit(**_args(seed=2))
        takeover = asyncio.Event()
        real = a._record_usage

        async def record_usage(j):
            await real(j)
            theirs = await b.jobs.get(j.id)
            theirs.status, theirs.error = Status.ERROR, "ended by another replica"
            await b.jobs.finish(theirs)
            takeover.set()

        a._record_usage = record_usage
        assert await a.run(job, fresh=True) is None
        assert takeover.is_set()
        stored = await a.jobs.get(job.id)
        assert stored.status is Status.ERROR and stored.error == "ended by another replica"
        assert job.status is Status.ERROR  # adopted
        assert await a.storage.list("usage") == []  # no charge for a job that ended in Error

    asyncio.run(go())


def test_racing_submissions_with_one_idempotency_key_make_one_job(tmp_path):
    a, b = build(tmp_path / "data"), build(tmp_path / "data")
    png = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(png, "PNG")
    image = Image.open(io.BytesIO(png.getvalue()))

    async def both_past_the_lookup(*ingresses):
        """Hold each submission after its idempotency lookup until all have made it: the race."""
        arrived, n = asyncio.Event(), [0]
        for ing in ingresses:
            real = ing.jobs.in_flight

            async def in_flight(key_id, real=real):
                n[0] += 1
                if n[0] == len(ingresses):
                    arrived.set()
                await arrived.wait()
                return await real(key_id)

            ing.jobs.in_flight = in_flight

    async def go():
        # on two replicas, the same body: one job, one submission told it replays it
        await both_past_the_lookup(a, b)
        common = _args(images=[("input_image", png.getvalue(), image)], idempotency_key="k1", body_hash="h1")
        (j1, replay1), (j2, replay2) = await asyncio.gather(a.submit(**common), b.submit(**common))
        assert j1.id == j2.id and sorted([replay1, replay2]) == [False, True]
        assert len(await a.storage.list("jobs")) == 1 and len(await a.storage.list("pending")) == 1
        inputs = await a.storage.list(f"inputs/{j1.id}")
        assert inputs == (await a.jobs.get(j1.id)).request.input_keys  # the loser's copy was removed

        # on one replica: one job, run once; nothing stays counted as running here
        await both_past_the_lookup(a, a)
        twin = _args(idempotency_key="k2", body_hash="h2")
        (j1, replay1), (j2, replay2) = await asyncio.gather(a.submit(**twin), a.submit(**twin))
        assert j1.id == j2.id and sorted([replay1, replay2]) == [False, True]
        await a.run(j2 if replay1 else j1, fresh=True)
        assert (await a.jobs.get(j1.id)).status is Status.READY and j1.id not in a._admitted

        # the same key with another body: the loser is told it conflicts (409)
        await both_past_the_lookup(a, b)
        results = await asyncio.gather(
            a.submit(**_args(idempotency_key="k3", body_hash="h3")),
            b.submit(**_args(prompt="a cat", idempotency_key="k3", body_hash="other")),
            return_exceptions=True,
        )
        assert sorted(type(r).__name__ for r in results) == ["IdempotencyConflict", "tuple"], results

    asyncio.run(go())


def test_a_sync_caller_leaving_while_its_charge_is_written_is_not_billed(tmp_path):
    """The usage record is written just before Ready; a sync caller leaving during that write ends
    the job Cancelled, and the charge that write left is withdrawn."""
    ingress = build(tmp_path / "data")
    storage = ingress.storage
    real_put, writing, written = storage._put, threading.Event(), threading.Event()

    def slow_put(key, *args):
        if not key.startswith("usage/"):
            return real_put(key, *args)
        writing.set()
        time.sleep(0.5)
        try:
            return real_put(key, *args)
        finally:
            written.set()

    storage._put = slow_put

    async def go():
        job, _ = await ingress.submit(**_args(sync=True))
        run = asyncio.ensure_future(ingress.run(job, fresh=True))
        while not writing.is_set():  # until the usage write is under way
            await asyncio.sleep(0.01)
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        await asyncio.to_thread(written.wait, 5)  # the write a cancel cannot stop has landed
        stored = await ingress.jobs.get(job.id)
        assert stored.status is Status.CANCELLED
        assert await storage.list("usage") == []

    asyncio.run(go())
