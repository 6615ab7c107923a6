"""Event streams on the real DAG (Ray Serve, S3, HTTP): the official openai client's streaming
calls, and a job's SSE stream read, left and resumed over a real connection."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.serving.test_dag import MODEL, _png_b64

pytestmark = pytest.mark.slow  # the served DAG on a local Ray


def _events(lines) -> list[dict]:
    """Server-Sent Events from an iterator of lines -> [{id, event, data}], comments dropped."""
    events, fields = [], {}
    for line in lines:
        if not line:
            if fields:
                events.append(fields | {"data": json.loads(fields["data"])})
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            fields[name] = value
    return events


def _image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_openai_client_streams_partial_images_then_the_image(app):
    import openai

    client = openai.OpenAI(base_url=f"{app.url}/v1", api_key="unused", max_retries=0)
    stream = client.images.generate(model=MODEL, prompt="a lighthouse", size="128x64", stream=True,
                                    partial_images=2, extra_body={"seed": 21})  # fmt: skip
    events = list(stream)
    partial = [e for e in events if e.type == "image_generation.partial_image"]
    assert 1 <= len(partial) <= 2 and [e.partial_image_index for e in partial] == list(range(len(partial)))
    assert _image(partial[0].b64_json).size == (16, 8) and partial[0].size == "128x64"
    done = events[-1]
    assert done.type == "image_generation.completed" and done.usage.output_tokens == 8 * 4
    plain = client.images.generate(model=MODEL, prompt="a lighthouse", size="128x64",
                                   response_format="b64_json", extra_body={"seed": 21})  # fmt: skip
    assert done.b64_json == plain.data[0].b64_json  # streaming never changes the image
    assert _image(done.b64_json).size == (128, 64)

    ref = ("ref.png", base64.b64decode(_png_b64(64, 64, 4)), "image/png")
    events = list(
        client.images.edit(model=MODEL, image=[ref], prompt="make it blue", stream=True, partial_images=1)
    )
    assert [e.type for e in events][-1] == "image_edit.completed"
    assert {e.type for e in events[:-1]} <= {"image_edit.partial_image"}
    assert _image(events[-1].b64_json).size == (64, 64)


def test_job_events_over_http_left_and_resumed(app):
    """A client that reads one event and leaves costs the job nothing; a stream read to the end
    gives positions in order and ends with the result; resuming after the last progress event
    gives only what follows; a finished job's stream is its result at once."""
    body = {"prompt": "a harbour at dawn", "width": 128, "height": 128, "seed": 5, "preview": True}
    job_id = app.http.post(f"/v1/{MODEL}", json=body).raise_for_status().json()["id"]
    with app.http.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        head = []
        for line in r.iter_lines():
            head.append(line)
            if line == "" and head[:-1]:
                break
    first = _events(head)[0]
    assert first["event"] in ("status", "progress", "preview", "result")
    assert app.wait(job_id)["status"] == "Ready"  # the stream was left; the job went on

    job_id = app.http.post(f"/v1/{MODEL}", json=body | {"seed": 6}).raise_for_status().json()["id"]
    with app.http.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        events = _events(r.iter_lines())
    assert events[-1]["event"] == "result" and events[-1]["data"]["status"] == "Ready"
    ordered = [int(e["id"]) for e in events if e["event"] != "preview"]
    assert ordered == sorted(ordered)
    previews = [e for e in events if e["event"] == "preview"]
    assert previews and all(e["data"]["width"] == 16 for e in previews)
    last_progress = [e["id"] for e in events if e["event"] == "progress"]
    if last_progress:
        resumed = _events(
            app.http.get(
                f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": last_progress[-1]}
            ).iter_lines()
        )
        assert resumed[-1]["event"] == "result" and all(
            int(e["id"]) > int(last_progress[-1]) for e in resumed
        )
    # the finished job's stream: every preview in storage, then the result. The live stream may have
    # given up on a preview that rendered late (it holds progress back for one at most 2 s), so it
    # saw these previews or fewer.
    r = httpx.get(f"{app.url}/v1/jobs/{job_id}/events", timeout=10)
    finished = _events(r.iter_lines())
    stored = [e for e in finished if e["event"] == "preview"]
    assert [e["event"] for e in finished] == ["preview"] * len(stored) + ["result"]
    assert {e["data"]["step"] for e in previews} <= {e["data"]["step"] for e in stored}
    sample = events[-1]["data"]["result"]["sample"]
    assert np.asarray(Image.open(io.BytesIO(httpx.get(sample).content))).shape == (128, 128, 3)
