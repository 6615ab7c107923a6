"""Overload and storage outages at the ingress (real stage classes, fake handles): full stage
queues are waited out for accepted async jobs and answered 503 + Retry-After for waiting sync
callers; a replica at its job cap refuses new work with 503; storage failures are retried with
backoff and, past the budget, answered 503 — never a 500, never a lost or double-billed job."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from ray.serve.exceptions import BackPressureError

from deployments.jobs.errors import TooManyJobs
from deployments.jobs.records import Status
from deployments.storage import StorageError
from tests.serving.inprocess import build, slow_writes, submit_job

MODEL = "/v1/flux-2-klein-tiny"


def _full() -> BackPressureError:
    return BackPressureError(num_queued_requests=8, max_queued_requests=8)


async def _usage(ingress) -> list:
    return await ingress.service.storage.list("usage")


def _client(ingress) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=ingress.__serve_build_asgi_app__())
    return httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60)


def test_full_stage_queues(tmp_path):
    ingress = build(tmp_path / "data", retry_after_s=3)

    async def go():
        async with _client(ingress) as c:
            # async: accepted, then the full queue is waited out without using up attempts
            ingress.service.stages.transformer.fail_next["denoise"] = [
                _full()
            ] * 4  # more than max_attempts (3)
            r = await c.post(MODEL, json={"prompt": "wait for room", "width": 64, "height": 64})
            assert r.status_code == 200
            await asyncio.gather(*list(ingress.service.runner.running.values()))
            job = await ingress.service.store.get(r.json()["id"])
            assert job.status is Status.READY and job.attempts == 1, job
            assert len(await _usage(ingress)) == 1

            # sync: the caller is told to come back; the job ends unbilled
            ingress.service.stages.codec.fail_next["finish"] = [_full()]
            r = await c.post("/v1/images/generations", json={"prompt": "now", "size": "64x64"})
            assert r.status_code == 503 and r.headers["Retry-After"] == "3", r.text
            assert "overloaded" in r.json()["detail"]
            assert len(await _usage(ingress)) == 1
            assert await ingress.service.store.pending() == []  # the shed job is terminal, not left Pending

            # and afterwards the service serves normally
            r = await c.post("/v1/images/generations", json={"prompt": "again", "size": "64x64"})
            assert r.status_code == 200, r.text
            assert len(await _usage(ingress)) == 2

    asyncio.run(go())


def test_running_job_cap(tmp_path):
    ingress = build(tmp_path / "data", max_running_jobs=2)

    gate, denoise = asyncio.Event(), ingress.service.stages.transformer.obj.denoise

    async def held(*args):  # the transformer waits for the gate: both jobs stay running
        await gate.wait()
        return await denoise(*args)

    ingress.service.stages.transformer.obj.denoise = held

    async def go():
        async with _client(ingress) as c:
            body = {"prompt": "x", "width": 64, "height": 64}
            accepted = [await c.post(MODEL, json=body) for _ in range(2)]
            assert [r.status_code for r in accepted] == [200, 200]
            r = await c.post(MODEL, json=body)  # both still running on this replica
            assert r.status_code == 503 and r.headers["Retry-After"] == "2"
            r = await c.post("/v1/images/generations", json={"prompt": "x", "size": "64x64"})
            assert r.status_code == 503
            gate.set()
            await asyncio.gather(*list(ingress.service.runner.running.values()))
            for a in accepted:
                assert (await ingress.service.store.get(a.json()["id"])).status is Status.READY
            assert (await c.post(MODEL, json=body)).status_code == 200  # room again
            await asyncio.gather(*list(ingress.service.runner.running.values()))

    asyncio.run(go())


class Flaky:
    """Wraps a storage backend's blocking calls: fail the next `n` of them with StorageError."""

    def __init__(self, storage):
        self.n = 0
        for name in ("_put", "_get", "_list", "_delete"):
            setattr(storage, name, self._wrap(getattr(storage, name)))

    def _wrap(self, fn):
        def call(*args):
            if self.n:
                self.n -= 1
                raise StorageError("connection refused")
            return fn(*args)

        call.__name__ = fn.__name__
        return call


def test_storage_outages_are_retried_then_503(tmp_path):
    ingress = build(tmp_path / "data", request_storage_retry_s=0.5)
    flaky = Flaky(ingress.service.storage)

    async def go():
        async with _client(ingress) as c:
            flaky.n = 3  # a short outage while submitting and running: retried, nothing lost
            r = await c.post(MODEL, json={"prompt": "x", "width": 64, "height": 64})
            assert r.status_code == 200, r.text
            job_id = r.json()["id"]
            await asyncio.gather(*list(ingress.service.runner.running.values()))
            flaky.n = 1  # a poll retries within its short budget (0.2 s here)
            res = (await c.get("/v1/get_result", params={"id": job_id})).json()
            assert res["status"] == "Ready"
            flaky.n = 10**6  # storage down for longer than a poll may wait: 503, not 500
            r = await c.get("/v1/get_result", params={"id": job_id})
            assert r.status_code == 503 and "Retry-After" in r.headers and "storage" in r.text
            flaky.n = 0
            assert (await c.get("/v1/get_result", params={"id": job_id})).json()["status"] == "Ready"
            assert len(await _usage(ingress)) == 1

    asyncio.run(go())


def test_a_poll_and_a_cancel_wait_out_storage_for_the_short_budget_only(tmp_path):
    """A pending job's poll reads its progress, and a cancel writes a flag: while storage fails,
    each answers 503 after `request_storage_retry_s`, as reading the record does, not after the
    background budget (a minute and more)."""
    ingress = build(tmp_path / "data", request_storage_retry_s=0.3)
    storage = ingress.service.storage
    real_get, real_put = storage._get, storage._put

    def get(key, *args):
        if key.startswith("progress/"):
            raise StorageError("connection refused")
        return real_get(key, *args)

    def put(key, *args):
        if key.startswith("cancel/"):
            raise StorageError("connection refused")
        return real_put(key, *args)

    async def go():
        job, _ = await submit_job(ingress, prompt="x", width=64, height=64, seed=1, steps=None, guidance=None,
                                  safety_tolerance=2, output_format="png", images=[])  # fmt: skip
        storage._get, storage._put = get, put
        async with _client(ingress) as c:
            for method, url, kw in [
                ("GET", "/v1/get_result", {"params": {"id": job.id}}),
                ("DELETE", f"/v1/jobs/{job.id}", {}),
            ]:
                t0 = time.monotonic()
                r = await c.request(method, url, **kw)
                assert r.status_code == 503 and "Retry-After" in r.headers, (url, r.text)
                assert time.monotonic() - t0 < 10, url  # the background budget is 60 s and more

    asyncio.run(go())


def test_jobs_past_their_deadline_end_in_error(tmp_path):
    ingress = build(tmp_path / "data", job_deadline_s=0.3)
    ingress.service.options.retry_backoff_s = 0.05  # waits of 0.1, 0.2, 0.4 s for room

    async def go():
        ingress.service.stages.transformer.fail_next["denoise"] = [_full()] * 100  # never room
        job, _ = await submit_job(ingress, prompt="x", width=64, height=64, seed=1, steps=None, guidance=None,
                                      safety_tolerance=2, output_format="png", images=[])  # fmt: skip
        assert await ingress.service.run(job) is None
        stored = await ingress.service.store.get(job.id)
        assert stored.status is Status.ERROR and "within 0.3 s" in stored.error
        assert await _usage(ingress) == []

    asyncio.run(go())


@pytest.mark.parametrize("wrapped", [False, True])
def test_backpressure_is_recognised_through_chained_responses(wrapped):
    from deployments.jobs.errors import is_backpressure

    e = _full()
    if wrapped:
        try:
            raise RuntimeError("chained argument failed") from e
        except RuntimeError as outer:
            e = outer
    assert is_backpressure(e)
    assert not is_backpressure(RuntimeError("other"))


def test_a_job_waiting_for_room_can_be_cancelled_and_keeps_its_lease(tmp_path):
    ingress = build(tmp_path / "data")
    ingress.service.options.retry_backoff_s = 0.01

    async def go():
        ingress.service.stages.transformer.fail_next["denoise"] = [_full()] * 3
        job, _ = await submit_job(ingress, prompt="x", width=64, height=64, seed=1, steps=None, guidance=None,
                                      safety_tolerance=2, output_format="png", images=[])  # fmt: skip
        lease = job.lease_until
        task = asyncio.create_task(ingress.service.run(job, fresh=True))
        while len(ingress.service.stages.transformer.fail_next["denoise"]) > 1:  # it is waiting for room now
            await asyncio.sleep(0.005)
        assert (await ingress.service.store.get(job.id)).lease_until > lease  # renewed while it waits
        await ingress.service.cancel(job.id)
        assert await task is None
        assert (await ingress.service.store.get(job.id)).status is Status.CANCELLED
        assert await _usage(ingress) == []

    asyncio.run(go())


def test_a_sync_request_refused_part_way_leaves_no_job_behind(tmp_path):
    """n=2 with room for one job in flight: the first job was already made when the second was
    refused (429); it must not stay Pending for the reaper to run and bill later."""
    ingress = build(tmp_path / "data", max_jobs_in_flight=1)

    async def go():
        async with _client(ingress) as c:
            r = await c.post("/v1/images/generations", json={"prompt": "two", "size": "64x64", "n": 2})
            assert r.status_code == 429 and "Retry-After" in r.headers, r.text
            assert await ingress.service.store.pending() == [] and await _usage(ingress) == []
            assert await ingress.service.reaper.reap() == 0
            assert ingress.service.runner.inputs == {}

    asyncio.run(go())


def test_a_sync_request_that_times_out_ends_its_job(tmp_path):
    """504 after sync_timeout_s: the job is Cancelled at once, not left Pending (holding the key's
    in-flight slot until the reaper ran it again)."""
    ingress = build(tmp_path / "data", sync_timeout_s=0.5)
    gate, denoise = asyncio.Event(), ingress.service.stages.transformer.obj.denoise

    async def held(*args):
        await gate.wait()
        return await denoise(*args)

    ingress.service.stages.transformer.obj.denoise = held

    async def go():
        async with _client(ingress) as c:
            r = await c.post("/v1/images/generations", json={"prompt": "slow", "size": "64x64"})
            assert r.status_code == 504, r.text
            job = await ingress.service.store.get(r.json()["error"]["job_ids"][0])
            assert job.status is Status.CANCELLED and await ingress.service.store.pending() == []
            assert await ingress.service.store.in_flight(job.key_id) == 0 and await _usage(ingress) == []
        gate.set()

    asyncio.run(go())


def test_a_sync_job_that_ends_ready_as_its_time_runs_out_is_answered(tmp_path):
    """The request's time runs out while the Ready record is being written: the write lands (it is
    shielded) and the job is billed, so the image is the answer, not a 504 for a charged job."""
    ingress = build(tmp_path / "data", sync_timeout_s=1.0)

    async def go():
        async with _client(ingress) as c:
            slow_writes(ingress.service.storage, "jobs/", 2.0)  # the create (before the clock) and the end
            r = await c.post("/v1/images/generations", json={"prompt": "late", "size": "64x64"})
            assert r.status_code == 200, r.text
            assert len(r.json()["data"]) == 1 and len(r.json()["metering"]["job_ids"]) == 1
            (job_id,) = r.json()["metering"]["job_ids"]
            assert (await ingress.service.store.get(job_id)).status is Status.READY
            assert len(await _usage(ingress)) == 1

    asyncio.run(go())


def test_a_marker_that_cannot_be_dropped_does_not_undo_a_ready_end(tmp_path):
    """The Ready record is saved, then dropping the pending marker fails for the whole retry budget:
    the caller still gets the image it was billed for, and the reaper drops the marker later."""
    ingress = build(tmp_path / "data")
    store, failures = ingress.service.store, []
    unmark = store.unmark

    async def failing(key_id, job_id):
        failures.append(job_id)
        raise StorageError("storage failed while deleting the marker")

    async def go():
        async with _client(ingress) as c:
            store.unmark = failing
            r = await c.post("/v1/images/generations", json={"prompt": "kept", "size": "64x64"})
            assert r.status_code == 200 and len(r.json()["data"]) == 1, r.text
            assert len(failures) == 1 and len(await _usage(ingress)) == 1
            assert [job_id for _, job_id in await store.pending()] == failures  # left to the reaper
            store.unmark = unmark
            await ingress.service.reaper.reap()
            assert await store.pending() == []

    asyncio.run(go())


def test_an_unreadable_cancel_flag_after_a_failed_attempt_does_not_strand_the_job(tmp_path):
    """An attempt fails, and reading the cancel flag before the retry fails too: the job is retried
    (the stages check the flag again between steps), not left Pending until its lease runs out."""
    ingress = build(tmp_path / "data")
    store, calls = ingress.service.store, []
    readable = store.cancel_requested

    async def unreadable(job_id):  # once: the read before the retry
        calls.append(job_id)
        if len(calls) == 1:
            raise StorageError("storage failed while reading the cancel flag")
        return await readable(job_id)

    async def go():
        async with _client(ingress) as c:
            store.cancel_requested = unreadable
            ingress.service.stages.codec.fail_next["finish"] = [RuntimeError("decode failed")]
            r = await c.post("/v1/images/generations", json={"prompt": "again", "size": "64x64"})
            assert r.status_code == 200 and len(r.json()["data"]) == 1, r.text
            (job_id,) = r.json()["metering"]["job_ids"]
            job = await store.get(job_id)
            assert job.status is Status.READY and job.attempts == 2 and await store.pending() == []

    asyncio.run(go())


def test_a_burst_from_one_key_stays_within_its_caps(tmp_path):
    """Submissions racing each other: every check of a cap awaits storage, so without counting a
    submission before its first await, a burst would all pass before any of them counted."""
    ingress = build(tmp_path / "data", max_jobs_in_flight=5, max_running_jobs=8)

    async def submit(i):
        try:
            job, _ = await submit_job(ingress, prompt=f"burst {i}", width=64, height=64, seed=i, steps=None,
                                          guidance=None, safety_tolerance=2, output_format="png", images=[])  # fmt: skip
            return job
        except Exception as e:
            return e

    async def go():
        outs = await asyncio.gather(*(submit(i) for i in range(20)))
        accepted = [o for o in outs if not isinstance(o, Exception)]
        refused = {type(o).__name__ for o in outs if isinstance(o, Exception)}
        assert len(accepted) == 5 and "TooManyJobs" in refused, (len(accepted), refused)
        assert refused <= {"TooManyJobs", "Overloaded"}  # the replica's cap (8) refused some first
        assert await ingress.service.store.in_flight("anonymous") == 5
        assert (
            ingress.service.admission.admitted == {j.id for j in accepted}
            and ingress.service.admission.submitting == {}
        )
        for job in accepted:
            await ingress.service.run(job)
        assert (
            ingress.service.admission.admitted == set()
            and await ingress.service.store.in_flight("anonymous") == 0
        )

    asyncio.run(go())


def test_a_key_at_its_cap_is_not_counted_twice_while_its_jobs_are_stored(tmp_path):
    """Storage with latency (as S3 has): a job's pending marker counts for its key once it is stored,
    and this replica's own count of it drops then, so a key sending exactly its cap of jobs, one
    after another while the earlier ones are still being stored, gets every one accepted."""
    ingress = build(tmp_path / "data", max_jobs_in_flight=5)
    slow_writes(ingress.service.storage, ("pending/", "jobs/"), 0.05)

    async def submit(i):
        # each lists the key's jobs 25 ms after the one before stored its marker and 25 ms before it
        # stores its record: clear of the edges of the window where it would be counted twice
        await asyncio.sleep(0.075 * i)
        job, _ = await submit_job(ingress, prompt=f"paced {i}", width=64, height=64, seed=i, steps=None,
                                      guidance=None, safety_tolerance=2, output_format="png", images=[])  # fmt: skip
        return job

    async def go():
        jobs = await asyncio.gather(*(submit(i) for i in range(5)))  # TooManyJobs if counted twice
        assert (
            await ingress.service.store.in_flight("anonymous") == 5
            and ingress.service.admission.submitting == {}
        )
        with pytest.raises(TooManyJobs):
            await submit(5)
        for job in jobs:
            await ingress.service.run(job)

    asyncio.run(go())


def test_a_key_at_its_cap_is_refused_while_its_last_job_is_being_stored(tmp_path):
    """A listing answers with what storage held when it was taken (S3's LIST may answer later). A
    submission whose pending marker lands after that snapshot but before the listing's answer is
    still counted by the replica's own tally: the key's cap holds."""
    ingress = build(tmp_path / "data", max_jobs_in_flight=1)
    real_list = ingress.service.storage._list

    def late_list(prefix):
        keys = real_list(prefix)  # the snapshot, answered 0.2 s later
        time.sleep(0.2)
        return keys

    ingress.service.storage._list = late_list
    slow_writes(ingress.service.storage, "pending/", 0.2)

    async def submit(i, delay):
        await asyncio.sleep(delay)
        job, _ = await submit_job(ingress, prompt=f"capped {i}", width=64, height=64, seed=i, steps=None,
                                      guidance=None, safety_tolerance=2, output_format="png", images=[])  # fmt: skip
        return job

    async def go():
        # the first lists at 0 and stores its marker 0.2-0.4; the second lists at 0.3, answered at 0.5
        first, second = await asyncio.gather(submit(0, 0), submit(1, 0.3), return_exceptions=True)
        assert isinstance(second, TooManyJobs), second
        assert await ingress.service.store.in_flight("anonymous") == 1
        await ingress.service.run(first)

    asyncio.run(go())


def test_a_sync_request_shed_part_way_bills_none_of_its_images(tmp_path):
    """n=3 where one job finds the transformer's queue full: the caller gets 503, and its other
    jobs are stopped and end unbilled instead of running on to Ready for nobody."""
    ingress = build(tmp_path / "data", sync_timeout_s=20)  # a run not stopped fails in 20 s, not 300
    gate, denoise = asyncio.Event(), ingress.service.stages.transformer.obj.denoise
    calls = []

    async def held(params, *args):
        calls.append(params.job_id)
        if len(calls) == 2:
            raise _full()
        await gate.wait()
        return await denoise(params, *args)

    ingress.service.stages.transformer.obj.denoise = held
    ingress.service.stages.transformer.obj.options.cancel_check_interval_s = (
        3600  # a short denoise never checks
    )

    async def go():
        async with _client(ingress) as c:
            t0 = time.monotonic()
            r = await c.post("/v1/images/generations", json={"prompt": "three", "size": "64x64", "n": 3})
            assert r.status_code == 503 and "Retry-After" in r.headers, r.text
            assert time.monotonic() - t0 < 10  # stopped by the refusal, not by the request's 20 s
        gate.set()
        await asyncio.sleep(0.5)  # anything still running would finish now
        records = [await ingress.service.store.get(j) for _, j in await ingress.service.store.pending()]
        assert records == [], records
        statuses = {(await ingress.service.store.get(j)).status for j in calls}
        assert Status.READY not in statuses and len(calls) == 3, (statuses, calls)
        assert await _usage(ingress) == [] and ingress.service.admission.admitted == set()

    asyncio.run(go())


def test_a_caller_leaving_during_the_submissions_leaves_no_job_behind(tmp_path):
    """n=3 where the caller disconnects while the second job is being submitted (Starlette cancels
    the handler): the job already made is discarded, Cancelled and unbilled, not left Pending for the
    reaper, and nothing stays counted against the replica's or the key's caps."""
    ingress = build(tmp_path / "data")
    submit, entered, made = ingress.service.submit, asyncio.Event(), []

    async def slow_second(submission, **kw):
        if made:
            entered.set()
            await asyncio.sleep(3600)  # the caller leaves meanwhile
        job, replayed = await submit(submission, **kw)
        made.append(job)
        return job, replayed

    ingress.service.submit = slow_second

    async def go():
        async with _client(ingress) as c:
            request = asyncio.ensure_future(
                c.post("/v1/images/generations", json={"prompt": "three", "size": "64x64", "n": 3})
            )
            await entered.wait()
            request.cancel()
            await asyncio.gather(request, return_exceptions=True)
        assert len(made) == 1
        assert (await ingress.service.store.get(made[0].id)).status is Status.CANCELLED
        assert await ingress.service.store.pending() == [] and await _usage(ingress) == []
        assert (
            ingress.service.admission.admitted == set()
            and ingress.service.admission.submitting == {}
            and ingress.service.runner.running == {}
        )

    asyncio.run(go())
