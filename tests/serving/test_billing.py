"""API keys, per-key limits, idempotency, usage metering and webhooks, on the in-process DAG
(real stage classes behind fake handles, real local storage, the real FastAPI app over ASGI)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from datetime import UTC, datetime

import httpx
import pytest

from deployments.api.auth import KeyRing, key_id
from deployments.jobs.records import Status
from deployments.jobs.webhooks import SIGNATURE_HEADER
from deployments.options import IngressOptions
from tests.serving.conftest import Receiver
from tests.serving.inprocess import build

KEY_A, KEY_B = "key-a-0123456789abcdef", "key-b-0123456789abcdef"
MODEL = "flux-2-klein-tiny"
TODAY = datetime.now(UTC).strftime("%Y-%m-%d")


def client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def drain(ingress) -> None:
    while ingress.service.runner.running:
        await asyncio.gather(*list(ingress.service.runner.running.values()), return_exceptions=True)


@pytest.fixture
def ingress(tmp_path):
    return build(tmp_path / "data", keys=KeyRing.from_keys([KEY_A, KEY_B]), max_jobs_in_flight=3, webhook_allow_private=True,
                 webhook_attempts=3)  # fmt: skip


def test_auth_matrix(ingress):
    app = ingress.__serve_build_asgi_app__()
    routes = [
        ("GET", "/v1/models", None),
        ("GET", "/openapi.json", None),
        ("GET", "/docs", None),
        ("GET", "/v1/get_result?id=abc", None),
        ("DELETE", "/v1/jobs/abc", None),
        ("GET", f"/v1/usage?start={TODAY}&end={TODAY}", None),
        ("POST", f"/v1/{MODEL}", {"prompt": "x", "width": 64, "height": 64}),
        ("POST", "/v1/images/generations", {"prompt": "x", "size": "64x64"}),
    ]

    async def go():
        async with client(app) as c:
            assert (await c.get("/healthz")).status_code == 200  # the one open route
            for method, url, body in routes:
                for headers in (
                    {},
                    {"x-key": "wrong-key-0000000000"},
                    {"Authorization": "Bearer nope"},
                    {"Authorization": f"Basic {KEY_A}"},
                ):
                    r = await c.request(method, url, json=body, headers=headers)
                    assert r.status_code == 401, (method, url, headers, r.status_code)
                    assert "x-key" in r.json()["detail"]
                for headers in ({"x-key": KEY_A}, {"Authorization": f"Bearer {KEY_A}"}):
                    r = await c.request(method, url, json=body, headers=headers)
                    assert r.status_code in (200, 404), (method, url, r.status_code, r.text)
            await drain(ingress)

    asyncio.run(go())


def test_metrics_are_for_the_operators_keys_only(tmp_path):
    """/metrics totals every tenant's jobs: with keys configured, only the keys listed in
    ingress.metrics_key_ids read it; another valid key gets 403 naming the setting, none gets 401."""
    ingress = build(
        tmp_path / "data", keys=KeyRing.from_keys([KEY_A, KEY_B]), metrics_key_ids=[key_id(KEY_B)]
    )

    async def go():
        async with client(ingress.__serve_build_asgi_app__()) as c:
            assert (await c.get("/metrics")).status_code == 401
            r = await c.get("/metrics", headers={"x-key": KEY_A})
            assert r.status_code == 403 and "ingress.metrics_key_ids" in r.json()["detail"]
            r = await c.get("/metrics", headers={"Authorization": f"Bearer {KEY_B}"})
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")

    asyncio.run(go())
    with pytest.raises(ValueError, match="'KEY-B' is not a key id: 16 lowercase hex digits"):
        IngressOptions(metrics_key_ids=["KEY-B"])


def test_jobs_belong_to_their_key_and_result_links_need_no_key(ingress):
    app = ingress.__serve_build_asgi_app__()

    async def go():
        async with client(app) as c:
            r = await c.post(
                f"/v1/{MODEL}", json={"prompt": "x", "width": 64, "height": 64}, headers={"x-key": KEY_A}
            )
            job_id = r.json()["id"]
            await drain(ingress)
            mine = (await c.get(f"/v1/get_result?id={job_id}", headers={"x-key": KEY_A})).json()
            theirs = (await c.get(f"/v1/get_result?id={job_id}", headers={"x-key": KEY_B})).json()
            assert mine["status"] == "Ready" and theirs["status"] == "Task not found"
            assert (await c.delete(f"/v1/jobs/{job_id}", headers={"x-key": KEY_B})).status_code == 404
            sample = mine["result"]["sample"].removeprefix("http://test")
            assert (await c.get(sample)).status_code == 200  # signed link, like a presigned S3 URL

    asyncio.run(go())


def test_jobs_in_flight_limit_per_key(ingress):
    app = ingress.__serve_build_asgi_app__()
    ingress.start = lambda job, fresh=False: None  # submitted jobs stay in flight

    async def go():
        async with client(app) as c:
            body = {"prompt": "x", "width": 64, "height": 64}
            for _ in range(3):
                assert (await c.post(f"/v1/{MODEL}", json=body, headers={"x-key": KEY_A})).status_code == 200
            r = await c.post(f"/v1/{MODEL}", json=body, headers={"x-key": KEY_A})
            assert r.status_code == 429 and r.headers["Retry-After"] == "2"
            assert "at most 3 jobs in flight" in r.json()["detail"]
            assert (await c.post(f"/v1/{MODEL}", json=body, headers={"x-key": KEY_B})).status_code == 200

    asyncio.run(go())


def test_idempotency_key(ingress):
    app = ingress.__serve_build_asgi_app__()

    async def go():
        async with client(app) as c:
            body = {"prompt": "same", "width": 64, "height": 64, "seed": 4}
            h = {"x-key": KEY_A, "Idempotency-Key": "order-17"}
            first = (await c.post(f"/v1/{MODEL}", json=body, headers=h)).json()
            await drain(ingress)
            again = (await c.post(f"/v1/{MODEL}", json=body, headers=h)).json()
            assert again == first  # same job, same cost, no second run
            assert not ingress.service.runner.running
            assert (await ingress.service.store.get(first["id"])).attempts == 1
            r = await c.post(f"/v1/{MODEL}", json={**body, "seed": 5}, headers=h)
            assert r.status_code == 409
            other = (
                await c.post(
                    f"/v1/{MODEL}", json=body, headers={"x-key": KEY_B, "Idempotency-Key": "order-17"}
                )
            ).json()
            assert other["id"] != first["id"]  # idempotency keys are per API key
            await drain(ingress)

    asyncio.run(go())


def test_usage_counts_ready_jobs_exactly_once(ingress):
    """Mixed traffic: successes, failures, a cancelled job, idempotent retries, a re-run job ->
    /v1/usage totals equal the megapixels of the Ready jobs, once each."""
    app = ingress.__serve_build_asgi_app__()

    async def go():
        async with client(app) as c:
            ready: list[str] = []

            async def submit(body, headers=None):
                r = await c.post(
                    f"/v1/{MODEL}", json={"prompt": "x", **body}, headers={"x-key": KEY_A, **(headers or {})}
                )
                assert r.status_code == 200, r.text
                return r.json()["id"]

            ready.append(await submit({"width": 64, "height": 64}))
            ready.append(await submit({"width": 128, "height": 64}))
            for _ in range(3):  # a retried submit with an Idempotency-Key: one job
                job = await submit({"width": 96, "height": 96}, {"Idempotency-Key": "retry-me"})
            ready.append(job)
            await drain(ingress)
            ingress.service.stages.codec.fail_next["finish"] = [RuntimeError("decode failed")] * 3
            failed = await submit({"width": 64, "height": 80})
            await drain(ingress)
            ingress.service.stages.transformer.fail_next["denoise"] = [
                RuntimeError("replica died")
            ]  # retried: Ready, billed once
            ready.append(await submit({"width": 80, "height": 64}))
            await drain(ingress)
            cancelled = await submit({"width": 256, "height": 256, "steps": 40})
            await asyncio.sleep(0.2)
            await c.delete(f"/v1/jobs/{cancelled}", headers={"x-key": KEY_A})
            await drain(ingress)
            # a job whose ingress died after finishing the image: re-run by the reaper, same usage key
            rerun = await ingress.service.store.get(ready[0])
            rerun.status, rerun.lease_until = Status.PENDING, 0
            await ingress.service.store.create(rerun)
            assert await ingress.service.reaper.reap() == 1
            await drain(ingress)

            statuses = {
                j: (await ingress.service.store.get(j)).status.value for j in [*ready, failed, cancelled]
            }
            assert [statuses[j] for j in ready] == ["Ready"] * 4
            assert statuses[failed] == "Error" and statuses[cancelled] == "Cancelled"

            expected_out = sum([(await ingress.service.store.get(j)).output_mp for j in ready])
            u = (await c.get(f"/v1/usage?start={TODAY}&end={TODAY}", headers={"x-key": KEY_A})).json()
            assert u["total"]["jobs"] == 4
            assert u["total"]["output_mp"] == pytest.approx(expected_out)
            assert u["total"]["output_mp"] == pytest.approx((64 * 64 + 128 * 64 + 96 * 96 + 80 * 64) / 1e6)
            assert u["total"]["cost"] == pytest.approx(4 * 1.4)  # below 1 MP: the first-MP price each
            assert u["groups"] == [
                {"day": TODAY, **{k: u["total"][k] for k in ("jobs", "input_mp", "output_mp", "cost")}}
            ]
            by_model = (
                await c.get(f"/v1/usage?start={TODAY}&end={TODAY}&group_by=model", headers={"x-key": KEY_A})
            ).json()
            assert by_model["groups"][0]["model"] == MODEL and by_model["groups"][0]["jobs"] == 4
            other = (await c.get(f"/v1/usage?start={TODAY}&end={TODAY}", headers={"x-key": KEY_B})).json()
            assert other["total"]["jobs"] == 0
            default = (await c.get("/v1/usage", headers={"x-key": KEY_A})).json()  # this UTC month to date
            assert (default["start"], default["end"]) == (TODAY[:8] + "01", TODAY)
            assert default["total"] == u["total"]
            r = await c.get(f"/v1/usage?start={TODAY}&end=2000-01-01", headers={"x-key": KEY_A})
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "end"]
            r = await c.get(f"/v1/usage?start={TODAY}&end={TODAY}&group_by=week", headers={"x-key": KEY_A})
            assert r.status_code == 422
            assert len(await ingress.service.storage.list(f"usage/{key_id(KEY_A)}")) == 4

    asyncio.run(go())


def test_signed_webhook_delivered_and_retried(ingress, receiver, monkeypatch):
    import deployments.jobs.webhooks as webhooks

    real_sleep = asyncio.sleep
    monkeypatch.setattr(webhooks.asyncio, "sleep", lambda s: real_sleep(0))  # no backoff waits in tests
    app = ingress.__serve_build_asgi_app__()
    Receiver.failures_left = 2  # the receiver fails twice, then accepts
    submitted = {}

    async def go():
        async with client(app) as c:
            body = {
                "prompt": "x",
                "width": 64,
                "height": 64,
                "webhook_url": receiver,
                "webhook_secret": "s3cret",
            }
            submitted["id"] = (await c.post(f"/v1/{MODEL}", json=body, headers={"x-key": KEY_A})).json()["id"]
            await drain(ingress)
            deadline = time.monotonic() + 10
            while not Receiver.received and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            sample = json.loads(Receiver.received[0][0])["result"]["sample"]
            assert sample.startswith("http://test/")  # a link the receiver can fetch, signed
            assert (await c.get(sample.removeprefix("http://test"))).status_code == 200

    asyncio.run(go())
    ((raw, headers),) = Receiver.received
    expected = "sha256=" + hmac.new(b"s3cret", raw, hashlib.sha256).hexdigest()
    assert headers[SIGNATURE_HEADER] == expected
    payload = json.loads(raw)
    assert (
        payload["id"] == submitted["id"] and payload["status"] == "Ready" and payload["result"]["seed"] >= 0
    )
    assert Receiver.failures_left == 0  # two failed deliveries were retried


def test_private_webhook_targets_refused_by_default(tmp_path):
    ingress = build(tmp_path / "d")
    app = ingress.__serve_build_asgi_app__()

    async def go():
        async with client(app) as c:
            for url in (
                "http://127.0.0.1:9/h",
                "http://10.0.0.1/h",
                "http://169.254.169.254/latest",
                "http://localhost/h",
            ):
                r = await c.post(f"/v1/{MODEL}", json={"prompt": "x", "webhook_url": url})
                assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "webhook_url"], url

    asyncio.run(go())


def test_serve_refuses_public_bind_without_keys(capsys, monkeypatch):
    from serve.cli import main

    monkeypatch.delenv("KLEIN_API_KEYS", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["serve", "--host", "0.0.0.0"])
    assert e.value.code == 2
    assert "refusing to serve on 0.0.0.0 without API keys" in capsys.readouterr().err


def test_keys_file_and_short_keys(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# rotated 2026-11\n" + KEY_A + "\n")
    ring = KeyRing.from_keys([], f)
    assert ring.identify(KEY_A) == key_id(KEY_A) and ring.identify(KEY_B) is None
    time.sleep(0.01)
    f.write_text(KEY_B + "\n")
    import os

    os.utime(f, (time.time() + 5, time.time() + 5))
    assert ring.identify(KEY_B) == key_id(KEY_B) and ring.identify(KEY_A) is None  # rotation picked up
    with pytest.raises(ValueError, match="at least 16 characters"):
        KeyRing.from_keys(["short"])
    import pickle

    assert KEY_A.encode() not in pickle.dumps(KeyRing.from_keys([KEY_A]))  # only digests travel


def test_a_sync_job_the_reaper_ends_is_not_billed(tmp_path):
    """A sync job's image was made and its usage written, then storage failed on its final record
    (the caller got an error); the reaper ends it as Error on its first attempt. Unbilled: its
    usage record is withdrawn, and get_result shows no cost."""
    from deployments.storage import StorageError
    from tests.serving.inprocess import submit_job

    ingress = build(tmp_path / "data")
    service = ingress.service

    async def go():
        job, _ = await submit_job(ingress, prompt="x", width=64, height=64, seed=1, sync=True)
        finish, calls = service.store.finish, []

        async def blip(j, settle=None):
            calls.append(j.status)
            if len(calls) == 1:
                raise StorageError("storage failed while writing the terminal record")
            return await finish(j, settle)

        service.store.finish = blip
        with pytest.raises(StorageError):
            await service.run(job, return_bytes=True, fresh=True, shed=True)
        assert calls == [Status.READY] and len(await _usage_keys(service)) == 1  # written before Ready
        stored = await service.store.get(job.id)
        stored.lease_until = 0
        await service.store.save(stored)
        await service.reaper.reap()
        stored = await service.store.get(job.id)
        assert stored.status is Status.ERROR and stored.attempts == 0 and stored.sync
        assert await _usage_keys(service) == []
        async with client(ingress.__serve_build_asgi_app__()) as c:
            body = (await c.get("/v1/get_result", params={"id": job.id})).json()
        assert body["status"] == "Error" and body["cost"] == 0 and body["output_mp"] > 0

    asyncio.run(go())


def test_a_withdrawal_that_fails_is_retried_by_the_reaper(tmp_path):
    """The reaper ends a job as Error (as above) but storage fails on withdrawing its usage record:
    the job is terminal, still listed, and still billed; the reaper's next pass withdraws the
    record and unlists the job. Before, the marker was dropped first and the charge stayed."""
    from deployments.storage import StorageError

    ingress = build(tmp_path / "data")
    service = ingress.service

    async def go():
        job = await _left_to_the_reaper(ingress)
        withdraw, withdrawals = service.billing.withdraw, []

        async def blip(j):
            withdrawals.append(j.status)
            if len(withdrawals) == 1:
                raise StorageError("storage failed while deleting the usage record")
            return await withdraw(j)

        service.billing.withdraw = blip
        await service.reaper.reap()  # ends it as Error; the withdrawal fails (logged)
        assert (await service.store.get(job.id)).status is Status.ERROR and withdrawals == [Status.ERROR]
        assert len(await _usage_keys(service)) == 1 and await service.store.in_flight(job.key_id) == 1
        await service.reaper.reap()
        assert withdrawals == [Status.ERROR] * 2
        assert await _usage_keys(service) == [] and await service.store.in_flight(job.key_id) == 0

    asyncio.run(go())


def test_a_charge_that_cannot_be_withdrawn_is_unlisted_after_a_lease_with_an_error(tmp_path, caplog):
    """Deleting the usage record keeps failing (a bucket policy that denies it, say): the ended job
    stays listed, and counted in flight, for one lease, then the reaper unlists it and logs an
    error naming the record to delete, so its key is not throttled for good."""
    from deployments.jobs.records import usage_key

    ingress = build(tmp_path / "data")
    service = ingress.service

    async def go():
        job = await _left_to_the_reaper(ingress)
        _deny_usage_deletions(service.storage)
        await service.reaper.reap()  # ends it as Error; its charge cannot go
        await service.reaper.reap()  # within a lease of its end: tried again, kept listed
        assert await service.store.in_flight(job.key_id) == 1
        stored = await service.store.get(job.id)
        stored.finished_at -= service.options.job_lease_s + 1
        await service.store.save(stored)
        with caplog.at_level("ERROR", logger="deployments.jobs.reaper"):
            await service.reaper.reap()
        assert await service.store.in_flight(job.key_id) == 0 and len(await _usage_keys(service)) == 1
        assert usage_key(job.key_id, job.day, job.id) in caplog.text and "still billed" in caplog.text

    asyncio.run(go())


def test_an_unbilled_end_with_no_charge_needs_no_deletion(tmp_path):
    """Most jobs that end unbilled never had a usage record: withdrawing looks first, so a storage
    that refuses deletions does not keep them listed (nor their key throttled)."""
    from tests.serving.inprocess import submit_job

    ingress = build(tmp_path / "data")
    service = ingress.service

    async def go():
        job, _ = await submit_job(ingress, prompt="x", width=64, height=64, seed=1)
        _deny_usage_deletions(service.storage)
        await service.runner.end(job, Status.CANCELLED, "cancelled before it ran")
        assert (await service.store.get(job.id)).status is Status.CANCELLED
        assert await service.store.in_flight(job.key_id) == 0

    asyncio.run(go())


def _deny_usage_deletions(storage) -> None:
    """A storage whose policy refuses deleting usage records (and allows everything else)."""
    from deployments.storage import StorageError

    delete = storage.delete

    async def denied(key, *args, **kwargs):
        if key.startswith("usage/"):
            raise StorageError("access denied")
        return await delete(key, *args, **kwargs)

    storage.delete = denied


async def _left_to_the_reaper(ingress):
    """A sync job whose image and usage record were made but whose terminal record failed to be
    written (its caller got an error), its lease expired: the reaper's to end, as Error."""
    from deployments.storage import StorageError
    from tests.serving.inprocess import submit_job

    service = ingress.service
    job, _ = await submit_job(ingress, prompt="x", width=64, height=64, seed=1, sync=True)
    finish = service.store.finish

    async def lost_record(j, settle=None):
        service.store.finish = finish
        raise StorageError("storage failed while writing the terminal record")

    service.store.finish = lost_record
    with pytest.raises(StorageError):
        await service.run(job, return_bytes=True, fresh=True, shed=True)
    stored = await service.store.get(job.id)
    stored.lease_until = 0
    await service.store.save(stored)
    return job


async def _usage_keys(service) -> list[str]:
    return await service.storage.list("usage")


def test_openai_n_images_partly_made_bills_and_answers_what_was_made(tmp_path):
    """n=2, one image fails after its retries: the answer carries the one made, metered as billed
    (usage agrees), the other under metering.failed; when none is made, an error naming all."""
    ingress = build(tmp_path / "data", max_attempts=1)
    app = ingress.__serve_build_asgi_app__()

    async def go():
        async with client(app) as c:
            ingress.service.stages.codec.fail_next["finish"] = [RuntimeError("decode failed")]
            r = await c.post(
                "/v1/images/generations", json={"prompt": "x", "size": "64x64", "n": 2, "seed": 3}
            )
            assert r.status_code == 200, r.text
            body = r.json()
            assert len(body["data"]) == 1 and len(body["metering"]["job_ids"]) == 1
            (failed,) = body["metering"]["failed"]
            assert failed["status"] == "Error" and failed["job_id"] not in body["metering"]["job_ids"]
            usage = (await c.get("/v1/usage")).json()["total"]
            assert usage["jobs"] == 1 and usage["cost"] == pytest.approx(body["metering"]["cost"])
            assert usage["output_mp"] == pytest.approx(body["metering"]["output_mp"]) == 64 * 64 / 1e6
            ingress.service.stages.codec.fail_next["finish"] = [RuntimeError("decode failed")] * 2
            r = await c.post("/v1/images/generations", json={"prompt": "y", "size": "64x64", "n": 2})
            assert r.status_code == 500 and len(r.json()["error"]["job_ids"]) == 2, r.text
            assert (await c.get("/v1/usage")).json()["total"]["jobs"] == 1

    asyncio.run(go())


async def _ready(ingress) -> int:
    store, ready = ingress.service.store, 0
    for key in await ingress.service.storage.list("jobs/"):
        job = await store.get(key.removeprefix("jobs/").removesuffix(".json"))
        ready += job is not None and job.status is Status.READY
    return ready


def test_openai_n_images_one_too_slow_or_refused_still_answers_and_bills_the_others(tmp_path):
    """n=2 where one job outruns the request's time, then where a full stage refuses one after its
    sibling was made: the image made is answered and billed (it was made: dropping it would charge
    for nothing delivered), the other ends unbilled and is named under metering.failed with why.
    (A refusal before any image is made stops the rest and answers 503: test_overload.)"""
    from ray.serve.exceptions import BackPressureError

    ingress = build(tmp_path / "data", sync_timeout_s=1.0)
    app = ingress.__serve_build_asgi_app__()
    codec, gate = ingress.service.stages.codec, asyncio.Event()
    finish, calls = codec.obj.finish, []

    async def second_waits(*args):
        calls.append(1)
        if len(calls) == 2:
            await gate.wait()
        return await finish(*args)

    async def go():
        async with client(app) as c:
            codec.obj.finish = second_waits
            r = await c.post("/v1/images/generations", json={"prompt": "x", "size": "64x64", "n": 2})
            assert r.status_code == 200, r.text
            body = r.json()
            assert len(body["data"]) == 1 and len(body["metering"]["job_ids"]) == 1
            (late,) = body["metering"]["failed"]
            assert late["status"] == "Cancelled" and "no result within 1 s" in late["error"], late
            assert (await c.get("/v1/usage")).json()["total"]["jobs"] == 1
            assert await ingress.service.store.pending() == []
            gate.set()

            calls.clear()

            async def full_once_the_first_is_ready(*args):  # the sibling made first, then shed
                calls.append(1)
                if len(calls) == 1:
                    return await finish(*args)
                while await _ready(ingress) < 2:  # the first request's, and this one's sibling
                    await asyncio.sleep(0.02)
                raise BackPressureError(num_queued_requests=8, max_queued_requests=8)

            codec.obj.finish = full_once_the_first_is_ready
            r = await c.post("/v1/images/generations", json={"prompt": "y", "size": "64x64", "n": 2})
            assert r.status_code == 200, r.text
            body = r.json()
            assert len(body["data"]) == 1, body
            (shed,) = body["metering"]["failed"]
            assert shed["status"] == "Error" and "overloaded" in shed["error"], shed
            assert shed["job_id"] not in body["metering"]["job_ids"]
            assert (await c.get("/v1/usage")).json()["total"]["jobs"] == 2
            assert await ingress.service.store.pending() == []

    asyncio.run(go())


def test_job_log_lines_name_the_job_under_a_key_ray_leaves_alone(tmp_path, caplog):
    """Ray's log filter writes its own `job_id` (the Ray job) over any record's: the job id travels
    as `klein_job_id`, which Ray's JSON logs keep."""
    import logging

    from ray._common.logging_constants import LogKey

    from tests.serving.inprocess import submit_job

    ingress = build(tmp_path / "data")

    async def go():
        job, _ = await submit_job(ingress, prompt="x", width=64, height=64, seed=1, sync=True)
        with caplog.at_level(logging.INFO, logger="deployments"):
            await ingress.service.run(job, return_bytes=True, fresh=True, shed=True)
        return job

    job = asyncio.run(go())
    ended = [r for r in caplog.records if getattr(r, "klein_job_id", None) == job.id]
    assert ended and ended[-1].status == "Ready" and ended[-1].key_id == job.key_id
    assert {"klein_job_id", "status", "key_id"}.isdisjoint(k.value for k in LogKey)
