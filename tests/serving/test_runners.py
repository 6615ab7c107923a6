"""One runner per job: job records are written by compare-and-swap, so racing reapers, racing
Idempotency-Key twins and a runner whose job was taken over cannot both act on one job. Two
ingress replicas are two `build`s over one storage root (their stages in this process)."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import pytest
from PIL import Image

from deployments.jobs.records import Status, idempotency_key, marker_key
from deployments.storage import StorageOptions
from tests.serving.inprocess import build, submit_job


def _args(**kw):
    return dict(prompt="a fox", width=64, height=64, seed=1, steps=None, guidance=None, safety_tolerance=2,
                output_format="png", images=[]) | kw  # fmt: skip


async def _expire(ingress, job):
    """As if the job's replica died during its first attempt: lease run out, Pending."""
    job.attempts, job.lease_until = 1, time.time() - 1
    await ingress.service.store.save(job)


def _barrier(*methods):
    """Replace each (object, name) method so that no call returns before every one has been made:
    the callers all act on what they read before any of them writes. Returns an undo."""
    arrived, calls = asyncio.Event(), [0]
    originals = [(obj, name, getattr(obj, name)) for obj, name in methods]
    for obj, name, real in originals:

        async def held(*args, real=real, **kw):
            out = await real(*args, **kw)
            calls[0] += 1
            if calls[0] == len(originals):
                arrived.set()
            await arrived.wait()
            return out

        setattr(obj, name, held)
    return lambda: [setattr(obj, name, real) for obj, name, real in originals]


@pytest.fixture(params=["local", "s3-moto"])
def shared_storage(request, tmp_path):
    """What two replicas share: a local directory, or S3 with AWS's conditional writes (moto)."""
    if request.param == "local":
        yield StorageOptions(root=tmp_path / "data")
        return
    from moto import mock_aws

    with mock_aws():
        yield StorageOptions(
            backend="s3", bucket="klein", access_key_id="k", secret_access_key="s", create_bucket=True
        )


def test_racing_reapers_restart_an_abandoned_job_once(tmp_path, shared_storage):
    a, b = build(None, storage=shared_storage), build(None, storage=shared_storage)
    denoised = []
    for ingress in (a, b):
        real = ingress.service.stages.transformer.obj.denoise

        async def denoise(params, *args, real=real):
            denoised.append(params.job_id)
            return await real(params, *args)

        ingress.service.stages.transformer.obj.denoise = denoise

    async def go():
        job, _ = await submit_job(a, **_args())
        await _expire(a, job)
        undo = _barrier(
            (a.service.store, "get"), (b.service.store, "get")
        )  # both read it expired before either writes
        restarted = await asyncio.gather(a.service.reaper.reap(), b.service.reaper.reap())
        undo()
        assert sorted(restarted) == [0, 1]
        await asyncio.gather(*a.service.runner.running.values(), *b.service.runner.running.values())
        stored = await a.service.store.get(job.id)
        assert stored.status is Status.READY and stored.attempts == 2
        assert denoised == [job.id]  # one re-run, not two

    asyncio.run(go())


def test_a_runner_whose_job_was_taken_over_stops_without_writing(tmp_path):
    a, b = build(tmp_path / "data"), build(tmp_path / "data")

    async def go():
        # taken over before the runner renews its lease: it stops before running anything
        job, _ = await submit_job(a, **_args())
        theirs = await b.service.store.get(job.id)
        theirs.attempts = 5  # another runner's mark on the record
        await b.service.store.save(theirs)
        assert await a.service.run(job) is None
        assert job.attempts == 5 and job.status is Status.PENDING  # the caller sees the stored record
        assert await a.service.storage.get(job.output_key) is None

        # taken over while it ran: its end is refused, and the charge it wrote is not left behind
        job, _ = await submit_job(a, **_args(seed=2))
        takeover = asyncio.Event()
        real = a.service.billing.record

        async def record_usage(j):
            await real(j)
            theirs = await b.service.store.get(j.id)
            theirs.status, theirs.error = Status.ERROR, "ended by another replica"
            await b.service.store.finish(theirs)
            takeover.set()

        a.service.billing.record = record_usage
        assert await a.service.run(job, fresh=True) is None
        assert takeover.is_set()
        stored = await a.service.store.get(job.id)
        assert stored.status is Status.ERROR and stored.error == "ended by another replica"
        assert job.status is Status.ERROR  # adopted
        assert await a.service.storage.list("usage") == []  # no charge for a job that ended in Error

    asyncio.run(go())


def test_a_late_charge_of_a_taken_over_job_that_cannot_be_withdrawn_is_left_to_the_reaper(tmp_path):
    """As above, but withdrawing the charge the runner wrote late fails: the job, ended elsewhere
    and unlisted there, is listed again until the reaper has withdrawn it (before, it was left)."""
    from deployments.storage import StorageError

    a, b = build(tmp_path / "data"), build(tmp_path / "data")

    async def go():
        job, _ = await submit_job(a, **_args(seed=3))
        real, withdraw, withdrawals = a.service.billing.record, a.service.billing.withdraw, []

        async def record_usage(j):
            await real(j)
            theirs = await b.service.store.get(j.id)
            theirs.status, theirs.error = Status.ERROR, "ended by another replica"
            await b.service.store.finish(theirs)

        async def blip(j):
            withdrawals.append(j.id)
            raise StorageError("storage failed while deleting the usage record")

        a.service.billing.record, a.service.billing.withdraw = record_usage, blip
        assert await a.service.run(job, fresh=True) is None
        assert withdrawals == [job.id] and len(await a.service.storage.list("usage")) == 1
        assert await a.service.store.in_flight(job.key_id) == 1  # listed again, for the reaper
        a.service.billing.withdraw = withdraw
        await b.service.reaper.reap()
        assert (
            await a.service.storage.list("usage") == [] and await a.service.store.in_flight(job.key_id) == 0
        )

    asyncio.run(go())


class _Died(BaseException):
    """The runner's process ending where it stands: nothing after it runs, no handler sees it."""


@pytest.mark.parametrize("ended", ["before the notice", "after the notice"])
def test_a_late_charge_of_a_job_ended_elsewhere_outlives_its_runner_unbilled(tmp_path, ended):
    """This runner is past the point where its usage write may land after its lease; another replica
    ends the job (settling and unlisting it) before or after the runner announces the late write;
    the runner writes the charge and dies before it can see the end. Once the write can no longer
    land, the reaper withdraws the charge and drops the notice."""
    from deployments.jobs.records import LATE

    a, b = build(tmp_path / "data"), build(tmp_path / "data")
    a.service.storage.retry_s = 2 * a.service.options.job_lease_s  # one write may outlast the lease

    async def go():
        job, _ = await submit_job(a, **_args(seed=4))
        transformer = a.service.stages.transformer.obj
        denoise, record = transformer.denoise, a.service.billing.record

        async def end_elsewhere():
            theirs = await b.service.store.get(job.id)
            theirs.status, theirs.error, theirs.finished_at = Status.ERROR, "ended by the reaper", time.time()
            await b.service.store.finish(theirs)
            assert await b.service.store.in_flight(job.key_id) == 0  # unlisted there

        async def run_then_end(params, *args):
            out = await denoise(params, *args)
            if ended == "before the notice":
                await end_elsewhere()
            return out

        async def record_then_die(j):
            if ended == "after the notice":
                await end_elsewhere()
            await record(j)
            raise _Died

        transformer.denoise, a.service.billing.record = run_then_end, record_then_die
        with pytest.raises(_Died):
            await a.service.run(job, fresh=True)
        assert len(await a.service.storage.list("usage")) == 1  # a charge for an image never delivered
        (notice,) = await a.service.storage.list(LATE)
        assert float(notice.rsplit("/", 1)[1]) > time.time() + 2 * a.service.storage.retry_s  # 2 writes
        await b.service.reaper.reap()  # the write may still land: nothing yet
        assert len(await a.service.storage.list("usage")) == 1 and await a.service.storage.list(LATE) == [
            notice
        ]
        await a.service.storage.delete(notice)
        await a.service.storage.put(notice.rsplit("/", 1)[0] + f"/{int(time.time()) - 1}", b"")  # time passed
        await b.service.reaper.reap()
        assert await a.service.storage.list("usage") == [] and await a.service.storage.list(LATE) == []
        assert (await b.service.store.get(job.id)).status is Status.ERROR
        assert await b.service.store.in_flight(job.key_id) == 0

    asyncio.run(go())


def test_a_late_charge_of_a_ready_job_stays(tmp_path):
    """A job whose usage write was announced as late, and that turned Ready: the reaper drops the
    notice once the write has landed, and the charge stands."""
    from deployments.jobs.records import LATE

    a = build(tmp_path / "data")
    a.service.storage.retry_s = 2 * a.service.options.job_lease_s

    async def go():
        job, _ = await submit_job(a, **_args(seed=5))
        await a.service.run(job, fresh=True)
        assert job.status is Status.READY and len(await a.service.storage.list("usage")) == 1
        (notice,) = await a.service.storage.list(LATE)
        await a.service.storage.delete(notice)
        await a.service.storage.put(notice.rsplit("/", 1)[0] + f"/{int(time.time()) - 1}", b"")
        foreign = tmp_path / "data" / LATE / "k" / "j" / "\u00b2"  # not ours: "²".isdigit(), float("²") fails
        foreign.parent.mkdir(parents=True)
        foreign.write_bytes(b"")  # (by another writer: storage refuses such a key)
        await a.service.reaper.reap()
        assert await a.service.storage.list(LATE) == [f"{LATE}/k/j/\u00b2"]
        assert len(await a.service.storage.list("usage")) == 1

    asyncio.run(go())


def test_a_late_charge_whose_job_cannot_be_read_is_given_up_after_a_lease(tmp_path, caplog):
    from deployments.jobs.records import LATE
    from deployments.storage import StorageError

    a = build(tmp_path / "data")

    async def go():
        notice = f"{LATE}/k/j1/{int(time.time()) - 5}"
        await a.service.storage.put(notice, b"")

        async def unreadable(job_id):
            raise StorageError("the record cannot be read")

        a.service.store.get = unreadable
        await a.service.reaper.reap()
        assert await a.service.storage.list(LATE) == [notice]  # tried again on the next pass
        old = f"{LATE}/k/j2/{int(time.time() - a.service.options.job_lease_s) - 5}"
        await a.service.storage.put(old, b"")
        with caplog.at_level("ERROR", logger="deployments.jobs.reaper"):
            await a.service.reaper.reap()
        assert (
            await a.service.storage.list(LATE) == [notice]
            and "gave up on the late charge of job j2" in caplog.text
        )

    asyncio.run(go())


def test_racing_submissions_with_one_idempotency_key_make_one_job(tmp_path):
    a, b = build(tmp_path / "data"), build(tmp_path / "data")
    png = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(png, "PNG")
    image = Image.open(io.BytesIO(png.getvalue()))

    def both_past_the_lookup(x, y):
        """Hold each submission after its idempotency lookup until both have made it: the race."""
        return _barrier((x.service.store, "in_flight"), (y.service.store, "in_flight"))

    async def go():
        # on two replicas, the same body: one job, one submission told it replays it
        undo = both_past_the_lookup(a, b)
        common = _args(images=[("input_image", png.getvalue(), image)], idempotency_key="k1", body_hash="h1")
        (j1, replay1), (j2, replay2) = await asyncio.gather(submit_job(a, **common), submit_job(b, **common))
        undo()
        assert j1.id == j2.id and sorted([replay1, replay2]) == [False, True]
        assert (
            len(await a.service.storage.list("jobs")) == 1
            and len(await a.service.storage.list("pending")) == 1
        )
        inputs = await a.service.storage.list(f"inputs/{j1.id}")
        assert inputs == (await a.service.store.get(j1.id)).request.input_keys  # the loser's copy was removed

        # on one replica: one job, and it runs
        undo = both_past_the_lookup(a, a)
        twin = _args(idempotency_key="k2", body_hash="h2")
        (j1, replay1), (j2, replay2) = await asyncio.gather(submit_job(a, **twin), submit_job(a, **twin))
        undo()
        assert j1.id == j2.id and sorted([replay1, replay2]) == [False, True]
        await a.service.run(j2 if replay1 else j1, fresh=True)
        assert (await a.service.store.get(j1.id)).status is Status.READY

        # the same key with another body: the loser is told it conflicts (409)
        undo = both_past_the_lookup(a, b)
        results = await asyncio.gather(
            submit_job(a, **_args(idempotency_key="k3", body_hash="h3")),
            submit_job(b, **_args(prompt="a cat", idempotency_key="k3", body_hash="other")),
            return_exceptions=True,
        )
        undo()
        assert sorted(type(r).__name__ for r in results) == ["IdempotencyConflict", "tuple"], results

        # a submission that ended between its record and its pending marker (the caller left) is
        # listed for the reaper again by the retry that finds it, not left Pending unseen forever
        job, _ = await submit_job(a, **_args(idempotency_key="k4", body_hash="h4"))
        await a.service.storage.delete(marker_key("anonymous", job.id))
        await a.service.storage.delete(idempotency_key("anonymous", "k4"))
        again, replayed = await submit_job(b, **_args(idempotency_key="k4", body_hash="h4"))
        assert replayed and again.id == job.id and ("anonymous", job.id) in await b.service.store.pending()

        # a twin that missed the idempotency record and arrives after the job finished: the pending
        # marker it wrote before finding the record is taken away again (no phantom job in flight)
        job, _ = await submit_job(a, **_args(idempotency_key="k5", body_hash="h5"))
        await a.service.run(job, fresh=True)
        await a.service.storage.delete(idempotency_key("anonymous", "k5"))
        late, replayed = await submit_job(b, **_args(idempotency_key="k5", body_hash="h5"))
        assert replayed and late.status is Status.READY
        assert ("anonymous", job.id) not in await b.service.store.pending()

    asyncio.run(go())


def test_a_sync_caller_leaving_while_its_charge_is_written_is_not_billed(tmp_path):
    """The usage record is written just before Ready; a sync caller leaving during that write ends
    the job Cancelled, and the charge that write left is withdrawn."""
    ingress = build(tmp_path / "data")
    storage = ingress.service.storage
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
        job, _ = await submit_job(ingress, **_args(sync=True))
        run = asyncio.ensure_future(ingress.service.run(job, fresh=True))
        while not writing.is_set():  # until the usage write is under way
            await asyncio.sleep(0.01)
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        await asyncio.to_thread(written.wait, 5)  # the write a cancel cannot stop has landed
        stored = await ingress.service.store.get(job.id)
        assert stored.status is Status.CANCELLED
        assert await storage.list("usage") == []

    asyncio.run(go())
