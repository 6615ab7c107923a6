"""Ingress logic without Ray: the real stage classes behind fake handles, real local storage."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from deployments.jobs.errors import FieldError
from deployments.jobs.idempotency import IdempotencyClaim, IdempotencyIndex
from deployments.jobs.records import Status
from deployments.storage import StorageError
from tests.serving.inprocess import build, slow_writes, submit_job


@pytest.fixture
def ingress(tmp_path):
    return build(tmp_path / "data")


def _args(**kw) -> dict:
    return dict(prompt="a fox", width=64, height=64, seed=1, steps=None, guidance=None, safety_tolerance=2,
                output_format="png", images=[]) | kw  # fmt: skip


async def _submit(ingress, **kw):
    job, _ = await submit_job(ingress, **_args(**kw))
    return job


def test_job_runs_to_ready_and_is_stored(ingress):
    async def go():
        job = await _submit(ingress)
        assert job.cost == pytest.approx(1.4)  # first MP price, below 1 MP
        result = await ingress.service.run(job, return_bytes=True)
        stored = await ingress.service.store.get(job.id)
        assert stored.status is Status.READY and stored.attempts == 1
        assert await ingress.service.store.pending() == []
        image = Image.open(io.BytesIO(await ingress.service.storage.get(stored.result.key)))
        assert image.size == (64, 64) and result.data == await ingress.service.storage.get(stored.result.key)
        assert stored.result.key.startswith("images/") and stored.result.key.endswith(f"{job.id}.png")

    asyncio.run(go())


def test_stage_failures_are_retried_then_error(ingress):
    async def go():
        ingress.service.stages.transformer.fail_next["denoise"] = [RuntimeError("replica died")]
        job = await _submit(ingress)
        assert await ingress.service.run(job) is not None
        assert (await ingress.service.store.get(job.id)).attempts == 2

        ingress.service.stages.codec.fail_next["finish"] = [RuntimeError("boom")] * 3
        job = await _submit(ingress)
        assert await ingress.service.run(job) is None
        stored = await ingress.service.store.get(job.id)
        assert stored.status is Status.ERROR and stored.attempts == 3 and "3 attempts" in stored.error
        assert await ingress.service.store.pending() == []  # terminal: no longer pending

    asyncio.run(go())


def test_reaper_reruns_abandoned_jobs_with_the_same_output_key(ingress):
    async def go():
        job = await _submit(ingress)
        job.attempts, job.lease_until = 1, time.time() - 1  # its ingress died during attempt 1
        await ingress.service.store.save(job)
        fresh = await _submit(ingress)  # leased: someone is running it
        assert await ingress.service.reaper.reap() == 1
        await asyncio.gather(*list(ingress.service.runner.running.values()))
        stored = await ingress.service.store.get(job.id)
        assert stored.status is Status.READY and stored.attempts == 2
        assert stored.result.key == job.output_key
        assert (await ingress.service.store.get(fresh.id)).status is Status.PENDING

        job = await _submit(ingress)
        job.attempts, job.lease_until = 3, time.time() - 1
        await ingress.service.store.save(job)
        await ingress.service.reaper.reap()
        assert (await ingress.service.store.get(job.id)).status is Status.ERROR

    asyncio.run(go())


def test_pending_markers_from_before_they_held_a_time_still_work(ingress):
    """Markers written by earlier versions are empty: with its record, such a job is reaped as any
    other; without one, its marker is dropped (it cannot say when it was written)."""

    async def go():
        job = await _submit(ingress)
        job.attempts, job.lease_until = 1, time.time() - 1
        await ingress.service.store.save(job)
        await ingress.service.storage.put(f"pending/anonymous/{job.id}", b"", "text/plain")
        orphan = "f" * 32
        await ingress.service.storage.put(f"pending/anonymous/{orphan}", b"", "text/plain")
        assert await ingress.service.reaper.reap() == 1
        await asyncio.gather(*list(ingress.service.runner.running.values()))
        assert (await ingress.service.store.get(job.id)).status is Status.READY
        assert await ingress.service.store.pending() == []

    asyncio.run(go())


def test_cancel_between_steps(ingress):
    async def go():
        job = await _submit(ingress, width=256, height=256, steps=40)
        task = asyncio.ensure_future(ingress.service.run(job))
        await asyncio.sleep(0.3)
        await ingress.service.cancel(job.id)
        assert await task is None
        assert (await ingress.service.store.get(job.id)).status is Status.CANCELLED

    asyncio.run(go())


def test_submit_validation_names_fields(ingress):
    from deployments.jobs.errors import FieldError

    async def go():
        with pytest.raises(FieldError) as e:
            await _submit(ingress, width=4096)
        assert e.value.field == "width"
        small = Image.new("RGB", (32, 64))
        with pytest.raises(FieldError) as e:
            await _submit(
                ingress,
                images=[("input_image", b"x", Image.new("RGB", (64, 64))), ("input_image_2", b"x", small)],
            )
        assert e.value.field == "input_image_2" and "at least 64 px" in e.value.message
        with pytest.raises(FieldError) as e:
            await _submit(ingress, webhook_url="http://127.0.0.1:9/hook")
        assert e.value.field == "webhook_url"

    asyncio.run(go())


def test_http_api_over_asgi(ingress):
    """The FastAPI app itself, over ASGI: submit, poll, fetch the signed local link."""
    app = ingress.__serve_build_asgi_app__()

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            r = await c.post(
                "/v1/flux-2-klein-tiny",
                json={"prompt": "x", "width": 64, "height": 64, "output_format": "webp"},
            )
            assert r.status_code == 200, r.text
            job_id = r.json()["id"]
            await asyncio.gather(*list(ingress.service.runner.running.values()))
            res = (await c.get("/v1/get_result", params={"id": job_id})).json()
            assert res["status"] == "Ready"
            url = res["result"]["sample"].removeprefix("http://test")
            img = await c.get(url)
            assert img.status_code == 200 and img.headers["content-type"] == "image/webp"
            assert (await c.get(url.replace("signature=", "signature=0"))).status_code == 403
            traversal = "/v1/files/images/%2E%2E/%2E%2E/.signing-key?expires=99999999999&signature=x"
            assert (await c.get(traversal)).status_code == 404
            r = await c.post("/v1/images/generations", json={"prompt": "x", "size": "64x64", "n": 5})
            assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "n"
            r = await c.post("/v1/images/generations", json={"prompt": "x", "size": "64x100"})
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "size"]
            r = await c.post("/v1/images/generations", json={"prompt": "x", "size": "big"})
            assert r.status_code == 422 and "WIDTHxHEIGHT" in r.json()["detail"][0]["msg"]
            r = await c.post("/v1/images/edits", data={"prompt": "x"}, files={"mask": ("m.png", b"x")})
            assert r.status_code == 422

    asyncio.run(go())


def test_openai_edit_with_n_images_stores_its_references_once(ingress, tmp_path):
    app = ingress.__serve_build_asgi_app__()

    def png(seed):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            files = [("image[]", ("a.png", png(0), "image/png")), ("image[]", ("b.png", png(1), "image/png"))]
            r = await c.post("/v1/images/edits", data={"prompt": "x", "n": "3", "response_format": "b64_json"},
                             files=files)  # fmt: skip
            assert r.status_code == 200, r.text
            assert len(r.json()["data"]) == 3
            jobs = [await ingress.service.store.get(j) for j in r.json()["metering"]["job_ids"]]
        assert [j.status for j in jobs] == [Status.READY] * 3
        keys = {tuple(j.request.input_keys) for j in jobs}
        assert len(keys) == 1 and len(next(iter(keys))) == 2  # one stored copy, shared by the three
        stored = [p for p in (tmp_path / "data" / "inputs").rglob("*") if p.is_file()]
        assert len(stored) == 2
        assert (await ingress.service.stages.codec.obj.stats())["references"][
            "misses"
        ] == 1  # encoded once too

    asyncio.run(go())


def test_reaper_leaves_other_models_jobs_ends_sync_ones_and_survives_a_bad_record(ingress):
    """Deployments of several models may share a bucket: each reaps only its own jobs. A sync job
    whose replica died is ended, not re-run (its caller's connection is gone: nobody would get the
    image, but it would be billed). An unreadable record does not stop the pass."""

    async def expired(job, **fields):
        for name, value in {"attempts": 1, "lease_until": time.time() - 1, **fields}.items():
            setattr(job, name, value)
        await ingress.service.store.save(job)
        return job

    async def go():
        other = await expired(await _submit(ingress), model="flux-2-klein-9b")
        sync = await expired(await _submit(ingress, sync=True))
        mine = await expired(await _submit(ingress))
        bad = "0" * 32  # listed first
        await ingress.service.storage.put(f"pending/anonymous/{bad}", b"")
        await ingress.service.storage.put(f"jobs/{bad}.json", b"{half a record")
        assert await ingress.service.reaper.reap() == 1
        await asyncio.gather(*list(ingress.service.runner.running.values()))
        assert (await ingress.service.store.get(mine.id)).status is Status.READY
        assert (await ingress.service.store.get(other.id)).status is Status.PENDING
        ended = await ingress.service.store.get(sync.id)
        assert ended.status is Status.ERROR and "not run again" in ended.error
        usage = await ingress.service.storage.list("usage")
        assert len(usage) == 1 and mine.id in usage[0]

    asyncio.run(go())


@pytest.mark.parametrize("failing", ["pending/", "jobs/"])
def test_a_submission_that_storage_fails_leaves_no_job_unseen(tmp_path, failing):
    """Storage fails for good at one of a submission's writes (the caller gets 503): no job record is
    left where the reaper cannot see it, and a pending marker left without its record stops
    counting against the key once no write of the record can still be under way."""
    ingress = build(tmp_path / "data", job_lease_s=1.0)
    storage = ingress.service.storage
    storage.retry_s, storage.call_timeout_s = 0.2, 0.1  # a marker is stale 1.6 s after it was stamped
    real_put = storage._put

    def put(key, *args):
        if key.startswith(failing):
            raise StorageError("the bucket is unreachable")
        return real_put(key, *args)

    storage._put = put

    async def go():
        with pytest.raises(StorageError):
            await _submit(ingress)
        storage._put = real_put
        listed = {job_id for _, job_id in await ingress.service.store.pending()}
        records = {key.removeprefix("jobs/").removesuffix(".json") for key in await storage.list("jobs")}
        assert records <= listed, "a record the reaper does not list: Pending forever if its replica dies"
        assert await ingress.service.reaper.reap() == 0 and await ingress.service.store.in_flight(
            "anonymous"
        ) == len(listed)
        await asyncio.sleep(1.8)
        assert await ingress.service.reaper.reap() == 0
        assert await ingress.service.store.pending() == [] and await storage.list("jobs") == []
        job = await _submit(ingress)  # and the key submits as before
        assert await ingress.service.store.pending() == [("anonymous", job.id)]

    asyncio.run(go())


def test_a_record_write_slower_than_a_lease_keeps_its_pending_marker(tmp_path):
    """The reaper drops a pending marker without a record only once no write of the record can still
    be under way (a lease, plus storage's longest operation for the marker and again for the
    record): a write that outlasts a lease does not leave a Pending record unlisted."""
    ingress = build(tmp_path / "data", job_lease_s=1.0)
    slow_writes(
        ingress.service.storage, "jobs/", 1.6, times=1
    )  # retrying through a storage hiccup, past the lease

    async def go():
        submitting = asyncio.ensure_future(_submit(ingress))
        await asyncio.sleep(1.3)  # the marker is a lease old, its record not yet written
        assert await ingress.service.reaper.reap() == 0
        job = await submitting
        assert await ingress.service.store.pending() == [("anonymous", job.id)]

    asyncio.run(go())


def test_a_job_cancelled_while_it_waited_stops_before_its_first_step(ingress):
    """Cancel (DELETE) while the job waits in a queue: the transformer checks before the first step
    once a job has waited cancel_check_interval_s, so it ends Cancelled and unbilled even when its
    denoise is shorter than the interval (a 4-step model on a GPU)."""
    ft = ingress.service.stages.transformer.obj
    ft.options.cancel_check_interval_s = 0.5
    gate, denoise, started = asyncio.Event(), ft.denoise, asyncio.Event()
    steps, real = [], ft._start

    async def queued(*args):
        started.set()
        await gate.wait()
        return await denoise(*args)

    def start(items, lora=None, hook=None):
        for out in real(items, lora, hook):
            steps.append(1)
            yield out

    ft.denoise, ft._start = queued, start

    async def go():
        job = await _submit(ingress)
        task = asyncio.ensure_future(ingress.service.run(job))
        await started.wait()
        await ingress.service.cancel(job.id)
        await asyncio.sleep(0.6)
        gate.set()
        assert await task is None
        assert (await ingress.service.store.get(job.id)).status is Status.CANCELLED
        assert steps == [] and await ingress.service.storage.list("usage") == []

    asyncio.run(go())


def test_an_attempt_ends_and_renews_its_lease_before_the_lease_runs_out(tmp_path):
    """A hung attempt times out shortly before its lease ends, and the next attempt's lease is
    written before the old one expires: no reaper elsewhere may start a second run meanwhile."""
    ingress = build(tmp_path / "data", job_lease_s=1.0, max_attempts=2)
    never = asyncio.Event()

    async def hung(*args):
        await never.wait()

    ingress.service.stages.transformer.obj.denoise = hung
    saves, save = [], ingress.service.store.save

    async def recording(job):
        saves.append((time.time(), job.lease_until))
        await save(job)

    ingress.service.store.save = recording

    async def go():
        job = await _submit(ingress)
        await asyncio.sleep(0.3)  # the lease runs from the record's creation (inputs are stored after)
        await ingress.service.run(job, fresh=True)  # as the routes run a job they just submitted
        assert (await ingress.service.store.get(job.id)).status is Status.ERROR
        previous, renewed = saves[0][1], 0
        for t, lease in saves[1:]:
            if lease != previous:  # a renewal: written while the previous lease still held
                assert t < previous, f"lease renewed {t - previous:.2f} s after it expired"
                previous, renewed = lease, renewed + 1
        assert renewed >= 1, saves

    asyncio.run(go())


def test_a_request_over_the_transformers_batch_cap_is_refused_at_submission(tmp_path):
    """`max_batch_tokens` caps a transformer batch; a request above it alone could never run (it
    failed its three attempts): it is a 422 naming the field, before anything is stored."""
    ingress = build(tmp_path / "data", max_batch_tokens=64)  # 64 tokens: 128x128 with no references
    png = io.BytesIO()
    Image.new("RGB", (128, 128), "red").save(png, "PNG")
    reference = ("input_image", png.getvalue(), Image.open(io.BytesIO(png.getvalue())))
    transport = httpx.ASGITransport(app=ingress.__serve_build_asgi_app__())

    async def go():
        assert (await _submit(ingress, width=128, height=128)).status is Status.PENDING
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            r = await c.post("/v1/flux-2-klein-tiny", json={"prompt": "x", "width": 144, "height": 128})
        assert (
            r.status_code == 422 and "width" in r.text and "72 tokens" in r.text and "limit of 64" in r.text
        )
        with pytest.raises(FieldError) as e:  # 16 image tokens + 64 of the reference's
            await _submit(ingress, images=[reference], field_names={"references": "input_image"})
        assert e.value.field == "input_image" and "80 tokens" in str(e.value)
        assert len(await ingress.service.storage.list("jobs")) == 1  # only the first

    asyncio.run(go())


@pytest.mark.parametrize("leaves_during", ["the record's write", "the idempotency record's write"])
def test_an_async_job_whose_caller_left_during_submission_still_runs(tmp_path, leaves_during):
    """The caller goes away (its handler is cancelled) once its job is being stored: the job runs
    to Ready now, not after its lease when the reaper finds it."""
    ingress = build(tmp_path / "data")
    slow = "jobs/" if leaves_during == "the record's write" else "idempotency/"
    real_put, writing = ingress.service.storage._put, threading.Event()

    def slow_put(key, *args):
        if key.startswith(slow):
            writing.set()
            time.sleep(0.3)
        return real_put(key, *args)

    ingress.service.storage._put = slow_put

    async def go():
        submitting = asyncio.ensure_future(
            submit_job(ingress, **_args(), idempotency_key="k", body_hash="h", start=True)
        )
        while not writing.is_set():
            await asyncio.sleep(0.01)
        submitting.cancel()
        await asyncio.gather(submitting, return_exceptions=True)
        assert submitting.cancelled()
        job_id = IdempotencyIndex.job_id("anonymous", IdempotencyClaim("k", "h"))
        if slow == "idempotency/":  # started before that write: running, and counted as such
            assert job_id in ingress.service.runner.running and job_id in ingress.service.admission.admitted
        for _ in range(100):  # the background work: the rest of the write, then the job's run
            if job_id in ingress.service.runner.running:
                await ingress.service.runner.running[job_id]
                break
            await asyncio.sleep(0.05)
        stored = await ingress.service.store.get(job_id)
        assert (
            stored.status is Status.READY
            and ingress.service.admission.admitted == set()
            and ingress.service.runner.inputs == {}
        )

    asyncio.run(go())
