"""Progress, previews and event streams, in process (real stages behind fake handles, local storage):
the feed's order and resumption, get_result's moving progress, previews that never change the image,
and the stream's answers over ASGI."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time

import httpx
import pytest
from PIL import Image

from deployments.jobs.progress import FINAL
from deployments.jobs.records import Status, preview_steps
from tests.serving.inprocess import build, submit_job

MODEL = "flux-2-klein-tiny"


@pytest.fixture
def ingress(tmp_path):
    return build(tmp_path / "data")


def _args(**kw) -> dict:
    return dict(prompt="a fox", width=64, height=64, seed=1, steps=None, guidance=None, safety_tolerance=2,
                output_format="png", images=[]) | kw  # fmt: skip


def slow_steps(ingress, seconds: float) -> None:
    """Each denoising step of the transformer takes `seconds` longer (a GPU-sized step)."""
    ft = ingress.service.stages.transformer.obj
    real = ft._start

    def start(items, lora=None, hook=None):
        for out in real(items, lora, hook):
            time.sleep(seconds)
            yield out

    ft._start = start


def parse_sse(text: str) -> list[dict]:
    """Server-Sent Events -> [{id, event, data}] (comments dropped)."""
    events = []
    for block in text.strip().split("\n\n"):
        fields = {}
        for line in block.splitlines():
            if line.startswith(":"):
                continue
            name, _, value = line.partition(": ")
            fields[name] = value
        if fields:
            events.append(
                {"id": fields.get("id"), "event": fields["event"], "data": json.loads(fields["data"])}
            )
    return events


def test_preview_steps_are_spread_before_the_last():
    assert preview_steps(4, 3) == [1, 2, 3]
    assert preview_steps(4, 10) == [1, 2, 3]
    assert preview_steps(50, 3) == [12, 25, 38]
    assert len(preview_steps(50, 10)) == 10 and max(preview_steps(50, 10)) < 50
    assert preview_steps(1, 3) == [] and preview_steps(8, 0) == []


def test_feed_follows_a_running_job_and_resumes_after_the_last_event_seen(ingress):
    """Status, each step polled, previews of the planned steps, then the result; a second feed
    started after an event gives only what follows it; get_result's progress moves meanwhile."""
    slow_steps(ingress, 0.3)
    service = ingress.service

    async def go():
        job, _ = await submit_job(ingress, **_args(steps=4, previews=3))
        assert job.request.previews == [1, 2, 3]
        feed = service.feed(job)
        first = await feed.poll()
        assert [(e.kind, e.data["stage"]) for e in first] == [("status", "queued")]
        run = asyncio.ensure_future(service.run(job, fresh=True))  # as the async route runs it
        seen, fractions = list(first), []
        while not feed.ended:
            seen += await feed.poll()
            stored = await service.store.get(job.id)
            if not stored.status.terminal:
                fractions.append((await service.step(stored)).fraction if await service.step(stored) else 0.0)
            await asyncio.sleep(0.05)
        await run
        positions = [e.position for e in seen if e.kind != "preview"]  # a preview may come late
        assert positions == sorted(positions) and len(set(positions)) == len(positions)
        kinds = [e.kind for e in seen]
        assert kinds[-1] == "result" and seen[-1].position == FINAL and seen[-1].data["status"] == "Ready"
        steps = [e.data["step"] for e in seen if e.kind == "progress"]
        assert steps == sorted(steps) and len(steps) >= 3 and steps[-1] <= 4
        previews = {e.data["step"]: e.data for e in seen if e.kind == "preview"}
        assert set(previews) == {1, 2, 3}
        image = Image.open(io.BytesIO(base64.b64decode(previews[2]["image"].split(",", 1)[1])))
        assert image.format == "JPEG" and image.size == (8, 8) == (
            previews[2]["width"],
            previews[2]["height"],
        )
        stages = [e.data["stage"] for e in seen if e.kind == "status"]
        assert stages[0] == "queued" and "denoise" in stages
        assert any(0 < f < 1 for f in fractions), fractions  # get_result's progress moved while it ran

        # a client that saw up to the second step's progress gets what follows, nothing before
        cut = next(e.position for e in seen if e.kind == "progress" and e.data["step"] == 2)
        again = await service.feed(await service.store.get(job.id), after=cut).poll()
        assert [e.kind for e in again] == ["preview", "preview", "result"]
        assert [e.data["step"] for e in again[:2]] == [2, 3]

    asyncio.run(go())


def test_previews_never_change_the_image(ingress):
    """The same request with and without previews (batched together or alone): the same bytes."""

    async def go():
        plain, _ = await submit_job(ingress, **_args(seed=7, steps=4))
        watched, _ = await submit_job(ingress, **_args(seed=7, steps=4, previews=3))
        a, b = await asyncio.gather(
            ingress.service.run(plain, return_bytes=True), ingress.service.run(watched, return_bytes=True)
        )
        alone, _ = await submit_job(ingress, **_args(seed=7, steps=4, previews=3))
        c = await ingress.service.run(alone, return_bytes=True)
        assert a.data == b.data == c.data
        listed = await ingress.service.storage.list(f"previews/{watched.id}")
        assert len(listed) == 3 and await ingress.service.storage.list(f"previews/{plain.id}") == []

    asyncio.run(go())


def test_events_and_get_result_over_http(ingress):
    """A finished job's stream answers with its result at once (the get_result body); unknown and
    other keys' jobs are 404; `preview` and the OpenAI stream fields are checked like the others."""
    app = ingress.__serve_build_asgi_app__()

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            r = await c.post(f"/v1/{MODEL}", json={"prompt": "x", "width": 64, "height": 64, "preview": True})
            assert r.status_code == 200, r.text
            job_id = r.json()["id"]
            await asyncio.gather(*list(ingress.service.runner.running.values()))
            r = await c.get(f"/v1/jobs/{job_id}/events")
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = parse_sse(r.text)
            assert [e["event"] for e in events] == ["preview"] * 3 + ["result"]  # its previews, then it
            result = (await c.get("/v1/get_result", params={"id": job_id})).json()
            for body in (events[-1]["data"], result):  # links signed a second apart may differ
                body["result"]["sample"] = body["result"]["sample"].split("?")[0]
            assert events[-1]["data"] == result and result["status"] == "Ready" and result["progress"] == 1.0
            r = await c.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": events[-2]["id"]})
            assert [e["event"] for e in parse_sse(r.text)] == ["result"]
            assert (await c.get("/v1/jobs/0123abcd/events")).status_code == 404
            r = await c.post(f"/v1/{MODEL}", json={"prompt": "x", "preview": "yes"})
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "preview"]
            for body, field in [
                ({"stream": True, "n": 2}, "n"),
                ({"partial_images": 2}, "partial_images"),
                ({"stream": True, "partial_images": 4}, "partial_images"),
            ]:
                r = await c.post("/v1/images/generations", json={"prompt": "x", "size": "64x64", **body})
                assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == field, r.text

    asyncio.run(go())


def test_openai_stream_over_asgi(ingress):
    """stream with partial_images: partial images (0-based, each a JPEG), then the completed image,
    the same bytes as without streaming, with usage."""
    app = ingress.__serve_build_asgi_app__()

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            body = {"prompt": "x", "size": "64x64", "seed": 3, "response_format": "b64_json"}
            r = await c.post("/v1/images/generations", json=body | {"stream": True, "partial_images": 2})
            assert r.status_code == 200, r.text
            events = parse_sse(r.text)
            kinds = [e["event"] for e in events]
            assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], kinds
            assert [e["data"]["partial_image_index"] for e in events[:-1]] == [0, 1]
            done = events[-1]["data"]
            assert done["type"] == "image_generation.completed" and done["size"] == "64x64"
            assert done["usage"]["output_tokens"] == 16 and done["usage"]["total_tokens"] == 16
            plain = (await c.post("/v1/images/generations", json=body)).json()
            assert base64.b64decode(done["b64_json"]) == base64.b64decode(plain["data"][0]["b64_json"])
            stored = await ingress.service.store.get(done["metering"]["job_ids"][0])
            assert stored.status is Status.READY

    asyncio.run(go())


def test_a_late_preview_holds_the_progress_back_so_positions_only_grow(tmp_path, monkeypatch):
    """The Codec stores a preview a moment after its step is reported: the feed reports steps up to
    the one before it until it is there (then the preview, then the later steps), and gives up on
    one that never comes (withheld by the classifier) after PREVIEW_WAIT_S."""
    import deployments.jobs.progress as progress
    from deployments.jobs.records import JobRecord, JobRequest, preview_key
    from deployments.jobs.store import JobStore
    from deployments.stages.payloads import StepDone
    from deployments.storage import StorageOptions, open_storage

    monkeypatch.setattr(progress, "PREVIEW_WAIT_S", 0.3)
    storage = open_storage(StorageOptions(root=tmp_path))
    request = JobRequest(prompt="x", width=64, height=64, seed=1, steps=8, previews=[2, 4, 6])
    job = JobRecord(id="abc123", model="m", request=request, attempts=1)

    async def go():
        store = JobStore(storage)
        await store.save(job)
        feed = progress.EventFeed(store, job)

        async def at(step):
            await progress.write_step(storage, StepDone(job.id, 1, step, 8))
            return [(e.kind, e.data.get("step")) for e in await feed.poll()]

        assert await at(3) == [("status", None), ("progress", 1)]  # preview 2 not stored yet
        await storage.put(preview_key(job.id, 1, 2), b"jpeg2", "image/jpeg")
        assert await at(5) == [("preview", 2), ("progress", 3)]  # 4 is awaited now
        await storage.put(preview_key(job.id, 1, 4), b"jpeg4", "image/jpeg")
        assert await at(7) == [("preview", 4), ("progress", 5)]  # 6 never comes
        assert await at(7) == []
        await asyncio.sleep(0.35)
        assert await at(7) == [("progress", 7)]  # given up on 6
        resumed = progress.EventFeed(store, job, after=feed.last)
        assert await resumed.poll() == []
        positions = [e.position for e in await progress.EventFeed(store, job).poll()]
        assert positions == sorted(positions)

    asyncio.run(go())


def test_a_rerun_counts_the_attempt_its_record_never_showed(ingress):
    """A first attempt runs without rewriting its record (attempts 0); when its replica dies after
    reporting steps, the run that takes the job over is attempt 2, so its steps and previews are
    not mistaken for the dead one's."""
    from deployments.jobs.progress import write_step
    from deployments.stages.payloads import StepDone

    async def go():
        job, _ = await submit_job(ingress, **_args(steps=4, previews=3))
        await write_step(ingress.service.storage, StepDone(job.id, 1, 3, 4))  # the dead run's report
        stored = await ingress.service.store.get(job.id)
        assert stored.attempts == 0
        await ingress.service.run(stored)  # as the reaper runs it: not fresh
        done = await ingress.service.store.get(job.id)
        assert done.status is Status.READY and done.attempts == 2
        assert len(await ingress.service.storage.list(f"previews/{job.id}")) == 3
        assert all("/2-" in key for key in await ingress.service.storage.list(f"previews/{job.id}"))

    asyncio.run(go())


def test_a_stream_whose_client_left_before_its_first_byte_ends_its_job(tmp_path):
    """The client is gone by the time the answer starts (sending its head fails): the stream's
    generator never starts, so the job is ended by the response itself: Cancelled, unbilled, and
    holding no running-job place or input images on the replica."""
    import asyncio
    import contextlib
    import json as json_

    from deployments.jobs.records import Status
    from tests.serving.inprocess import build

    ingress = build(tmp_path / "data")
    app = ingress.__serve_build_asgi_app__()
    body = json_.dumps({"prompt": "gone", "size": "64x64", "stream": True}).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": "/v1/images/generations", "raw_path": b"/v1/images/generations",
        "query_string": b"", "root_path": "", "server": ("test", 80), "client": ("127.0.0.1", 1),
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
    }  # fmt: skip
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        raise OSError("the client is gone")

    async def go():
        with contextlib.suppress(Exception):  # how the server learns the client left
            await app(scope, receive, send)
        await asyncio.sleep(0.1)
        service = ingress.service
        assert service.admission.admitted == set() and service.runner.inputs == {}
        assert await service.store.pending() == []
        (key,) = await service.storage.list("jobs/")
        job = await service.store.get(key.removeprefix("jobs/").removesuffix(".json"))
        assert job.status is Status.CANCELLED and await service.storage.list("usage") == []

    asyncio.run(go())
