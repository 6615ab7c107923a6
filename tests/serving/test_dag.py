"""The served DAG end to end: a real local Ray, real HTTP, a real S3-compatible server."""

from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from klein import GenerationRequest, ModelSource, Pipeline

pytestmark = pytest.mark.slow  # a local Ray with the served DAG

MODEL = "flux-2-klein-tiny"


def _png_b64(w: int, h: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _fetch(url: str) -> Image.Image:
    r = httpx.get(url, timeout=30)
    assert r.status_code == 200, r.text
    return Image.open(io.BytesIO(r.content))


@pytest.mark.parametrize("fmt, pil", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_async_flow_on_s3(app, s3, fmt, pil):
    r = app.http.post(f"/v1/{MODEL}", json={"prompt": "a red fox", "width": 96, "height": 64, "seed": 5,
                                            "output_format": fmt})  # fmt: skip
    assert r.status_code == 200, r.text
    sub = r.json()
    assert set(sub) == {"id", "polling_url", "cost", "input_mp", "output_mp"}
    assert sub["output_mp"] == pytest.approx(96 * 64 / 1e6) and sub["input_mp"] == 0
    res = app.wait(sub["id"])
    assert res["status"] == "Ready", res
    sample = res["result"]["sample"]
    assert sample.startswith(s3.endpoint) and "X-Amz-Signature" in sample  # a presigned S3 URL
    image = _fetch(sample)
    assert image.format == pil and image.size == (96, 64)
    assert res["result"]["seed"] == 5 and res["result"]["prompt"] == "a red fox"
    assert httpx.get(sample.replace("X-Amz-Signature=", "X-Amz-Signature=0"), timeout=10).status_code == 403


def test_edit_with_two_references(app):
    body = {"prompt": "combine them", "input_image": _png_b64(80, 64, 1), "input_image_2": _png_b64(64, 96, 2),
            "seed": 9, "output_format": "png"}  # fmt: skip
    sub = app.http.post(f"/v1/{MODEL}", json=body).json()
    assert sub["input_mp"] == pytest.approx((80 * 64 + 64 * 96) / 1e6)
    res = app.wait(sub["id"])
    assert res["status"] == "Ready", res
    assert _fetch(res["result"]["sample"]).size == (80, 64)  # the first reference's size by default


def test_same_seed_same_image_as_the_pipeline(app):
    """Served (async API) == klein Pipeline in this process, for the same seed."""
    sub = app.http.post(f"/v1/{MODEL}", json={"prompt": "a lighthouse", "width": 64, "height": 64, "seed": 77,
                                              "output_format": "png"}).json()  # fmt: skip
    served = np.asarray(_fetch(app.wait(sub["id"])["result"]["sample"]).convert("RGB")).astype(int)
    local = np.asarray(
        Pipeline(ModelSource.preset("tiny")).generate([GenerationRequest("a lighthouse", 64, 64, 77)])[0]
    )
    assert np.abs(served - local).max() <= 1


def _put_adapter(s3, tmp_path, name: str) -> None:
    """A kohya adapter (the tiny model's, seed 7, alpha 2) into the bucket's registry prefix."""
    import asyncio

    from deployments.storage import StorageOptions, open_storage
    from tests.klein.test_lora import _factors, write

    write(tmp_path / "ink.safetensors", "kohya", _factors(7), alpha=2.0)
    data = (tmp_path / "ink.safetensors").read_bytes()
    asyncio.run(open_storage(StorageOptions(**s3.options())).put(f"loras/{name}.safetensors", data))


def test_lora_adapter_from_the_bucket(app, s3, tmp_path):
    """An adapter the operator put under the bucket's loras/ prefix, named by the request: the image
    `klein generate --lora` makes, loaded once by the transformer replica (its span in the trace)."""
    import json

    from klein.lora import LoraOptions
    from klein.request import LoraRequest

    _put_adapter(s3, tmp_path, "styles/ink")
    trace_id = "5bf92f3577b34da6a3ce929d0e0e4737"
    body = {"prompt": "inked", "width": 64, "height": 64, "seed": 3, "output_format": "png",
            "loras": [{"path": "styles/ink", "scale": 1.5}]}  # fmt: skip
    sub = app.http.post(
        f"/v1/{MODEL}", json=body, headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    )
    assert sub.status_code == 200, sub.text
    res = app.wait(sub.json()["id"])
    assert res["status"] == "Ready" and res["result"]["loras"] == [{"path": "styles/ink", "scale": 1.5}], res
    served = np.asarray(_fetch(res["result"]["sample"]).convert("RGB")).astype(int)
    local = Pipeline(ModelSource.preset("tiny"), lora=LoraOptions())
    want = local.generate(
        [GenerationRequest("inked", 64, 64, 3, loras=(LoraRequest(str(tmp_path / "ink.safetensors"), 1.5),))]
    )
    assert np.abs(served - np.asarray(want[0]).astype(int)).max() <= 1
    plain = local.generate([GenerationRequest("inked", 64, 64, 3)])[0]
    assert np.abs(served - np.asarray(plain).astype(int)).max() > 8  # the adapter did change the image
    r = app.http.post(f"/v1/{MODEL}", json=body | {"loras": [{"path": "styles/missing"}]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "loras", 0, "path"], r.text
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        spans = [json.loads(line) for line in app.traces.read_text().splitlines()]
        lora = [s for s in spans if s["trace_id"] == trace_id and s["name"] == "lora"]
        if lora:
            break
        time.sleep(0.2)
    assert lora[0]["component"] == "FlowTransformer" and lora[0]["attributes"]["loaded"] == 1, lora


def test_openai_client(app):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{app.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]

    r = client.images.generate(model=MODEL, prompt="a cat", size="64x64", response_format="b64_json",
                               extra_body={"seed": 3})  # fmt: skip
    b64_image = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
    assert b64_image.size == (64, 64) and b64_image.format == "PNG"

    r = client.images.generate(model=MODEL, prompt="a cat", size="64x64", n=2, extra_body={"seed": 3})
    assert len(r.data) == 2
    first = _fetch(r.data[0].url)
    assert np.array_equal(np.asarray(first), np.asarray(b64_image))  # same seed, same image, both APIs
    assert not np.array_equal(np.asarray(first), np.asarray(_fetch(r.data[1].url)))  # n=2: seeds 3, 4

    ref = io.BytesIO(base64.b64decode(_png_b64(96, 64, 4)))
    ref.name = "ref.png"
    r = client.images.edit(model=MODEL, image=[ref, ("b.png", base64.b64decode(_png_b64(64, 64, 5)), "image/png")],
                           prompt="make it blue", response_format="url")  # fmt: skip
    assert _fetch(r.data[0].url).size == (96, 64)

    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="dall-e-3", prompt="x")
    with pytest.raises(openai.UnprocessableEntityError):
        client.images.generate(model=MODEL, prompt="x", size="100x64")


def test_batches_form_under_load_and_do_not_change_images(app):
    transformer = app.handle("FlowTransformer")
    before = len(transformer.stats.remote().result()["batch_sizes"])

    def submit(i: int) -> str:
        body = {
            "prompt": f"prompt {i % 3}",
            "width": 64,
            "height": 64,
            "seed": 1000 + i,
            "output_format": "png",
        }
        return app.http.post(f"/v1/{MODEL}", json=body).json()["id"]

    with ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(submit, range(16)))
    results = [app.wait(i) for i in ids]
    assert all(r["status"] == "Ready" for r in results)
    sizes = transformer.stats.remote().result()["batch_sizes"][before:]
    assert max(sizes) > 1, f"no batch larger than 1 formed: {sizes}"
    assert sum(sizes) == 16

    alone = app.wait(submit(5))  # the same request (prompt, seed) again, now alone
    a = np.asarray(_fetch(alone["result"]["sample"]))
    b = np.asarray(_fetch(results[5]["result"]["sample"]))
    assert np.array_equal(a, b)


def test_validation_errors(app):
    def post(body, model=MODEL):
        return app.http.post(f"/v1/{model}", json={"prompt": "x", **body})

    r = post({"width": 100})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "width"]
    assert "multiple of 16" in r.json()["detail"][0]["msg"]
    assert post({"height": 4096}).status_code == 422
    assert post({}, model="flux-2-klein-99b").status_code == 404
    r = post({"guidance": 3.0})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "guidance"]
    assert "guidance must be 1 or unset, got 3" in r.json()["detail"][0]["msg"]
    r = post({"guidance": 1.0, "width": 64, "height": 64})  # 1: no guidance, as the model card passes it
    assert r.status_code == 200, r.text
    assert app.wait(r.json()["id"])["status"] == "Ready"
    r = post({"input_image": "not base64!"})
    assert r.status_code == 422 and "input_image" in r.json()["detail"][0]["loc"]
    r = post({"input_image": _png_b64(32, 64, 1)})
    assert r.status_code == 422 and "at least 64 px" in r.json()["detail"][0]["msg"]
    r = post({"seed": -1})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "seed"]
    r = post({"unknown_field": 1})
    assert r.status_code == 422
    assert app.http.get("/v1/get_result", params={"id": "nope"}).json()["status"] == "Task not found"
    assert app.http.get("/healthz").status_code == 200
    assert "/v1/images/generations" in app.http.get("/openapi.json").json()["paths"]


def test_cancel(app):
    """A job far too long to finish before the cancel arrives (50 steps at 512² on the CPU: a second
    or more) is cancelled: 202, then Cancelled (it cannot pass as Ready)."""
    sub = app.http.post(
        f"/v1/{MODEL}", json={"prompt": "slow", "width": 512, "height": 512, "steps": 50}
    ).json()
    r = app.http.delete(f"/v1/jobs/{sub['id']}")
    assert r.status_code == 202, r.text
    # by its own run, between two steps: well before its lease (20 s here) would let a reaper end it
    res = app.wait(sub["id"], timeout=10)
    assert res["status"] == "Cancelled", res


def test_killed_transformer_replica_job_still_terminates(app, ray_local):
    """Kill the FlowTransformer replica mid-job: the ingress retries on the replacement."""
    import ray

    sub = app.http.post(
        f"/v1/{MODEL}", json={"prompt": "endure", "width": 256, "height": 256, "steps": 30}
    ).json()
    time.sleep(1.0)
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "FlowTransformer" in a["name"]]
    assert replicas
    for a in replicas:
        ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=False)
    res = app.wait(sub["id"], timeout=180)
    assert res["status"] in ("Ready", "Error"), res
    assert res["status"] == "Ready"  # a fresh replica comes up and the retry succeeds


def test_abandoned_job_is_run_again(app, s3):
    """A Pending job whose lease expired (its ingress died) is picked up by the reaper."""
    import asyncio

    from deployments.jobs.records import JobRecord, JobRequest
    from deployments.jobs.store import JobStore
    from deployments.storage import StorageOptions, open_storage

    jobs = JobStore(open_storage(StorageOptions(**s3.options())))
    job = JobRecord(id="abandoned0001", model=MODEL, attempts=1, lease_until=time.time() - 1,
                    request=JobRequest(prompt="left behind", width=64, height=64, seed=8, steps=4, output_format="png"))  # fmt: skip
    asyncio.run(jobs.create(job))
    res = app.wait(job.id, timeout=60)
    assert res["status"] == "Ready" and _fetch(res["result"]["sample"]).size == (64, 64)
    assert asyncio.run(jobs.get(job.id)).attempts == 2


def test_killed_ingress_replica_job_is_run_again(app, ray_local):
    import ray

    sub = app.http.post(
        f"/v1/{MODEL}", json={"prompt": "orphan", "width": 256, "height": 256, "steps": 40}
    ).json()
    time.sleep(0.5)

    def ingress_replicas() -> set[tuple[str, str]]:
        return {
            (a["name"], a["namespace"])
            for a in ray.util.list_named_actors(all_namespaces=True)
            if "Ingress" in a["name"]
        }

    killed = ingress_replicas()
    assert killed
    for name, namespace in killed:
        ray.kill(ray.get_actor(name, namespace=namespace), no_restart=False)
    # ray.kill is asynchronous and the proxy learns of the replacement by long poll: until both
    # have happened the proxy may still answer from, or 500 for, the dead replica (Serve's own
    # behaviour, see README). Wait for a replacement replica and for the proxy to route to it.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if ingress_replicas() - killed:
            try:
                if app.http.get("/v1/get_result", params={"id": sub["id"]}, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    else:
        raise AssertionError("no replacement ingress replica answered within 60 s")
    res = app.wait(sub["id"], timeout=120)  # lease 20 s, then the new replica's reaper re-runs it
    assert res["status"] == "Ready", res


def test_one_trace_spans_every_stage(app):
    """A request's trace holds spans from the ingress and all three stage deployments, and joins
    the caller's trace when it sends a traceparent."""
    import json

    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    body = {"prompt": "traced", "width": 64, "height": 64, "input_image": _png_b64(64, 64, 3)}
    sub = app.http.post(f"/v1/{MODEL}", json=body, headers=headers).json()
    assert app.wait(sub["id"])["status"] == "Ready"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        spans = [json.loads(line) for line in app.traces.read_text().splitlines()]
        mine = [s for s in spans if s["trace_id"] == trace_id]
        if {"upload", "denoise", "embed", "job"} <= {s["name"] for s in mine}:
            break
        time.sleep(0.2)
    names = {s["name"] for s in mine}
    assert {"submit", "job", "embed", "encode", "denoise", "decode", "postprocess", "upload"} <= names, names
    components = {s["component"] for s in mine}
    assert components == {"Ingress", "TextEmbedder", "FlowTransformer", "Codec"}
    assert len({s["pid"] for s in mine}) == 4  # four replica processes, one trace
    job = next(s for s in mine if s["name"] == "job")
    assert all(s["parent_id"] == job["span_id"] for s in mine if s["component"] != "Ingress")
    assert job["attributes"]["job_id"] == sub["id"]


def test_prometheus_metrics(app, s3, tmp_path):
    """/metrics: klein's jobs by status, megapixels, batch sizes and stage times, adapters loaded and
    found in the bank, and Serve's queue and latency metrics, gathered from the node's Ray metrics
    agent (exported every ~10 s)."""
    sub = app.http.post(f"/v1/{MODEL}", json={"prompt": "metered", "width": 64, "height": 64}).json()
    assert app.wait(sub["id"])["status"] == "Ready"
    _put_adapter(s3, tmp_path, "metered")
    for _ in range(2):  # loaded, then resident
        body = {"prompt": "metered", "width": 64, "height": 64, "loras": [{"path": "metered"}]}
        assert app.wait(app.http.post(f"/v1/{MODEL}", json=body).json()["id"])["status"] == "Ready"
    deadline = time.monotonic() + 60
    text = ""
    while time.monotonic() < deadline:
        r = app.http.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        text = r.text
        if (
            "ray_klein_jobs_total{" in text
            and "ray_klein_batch_size_bucket" in text
            and "ray_klein_megapixels_total" in text
            and 'outcome="hit"' in text
        ):
            break
        time.sleep(2)
    lines = text.splitlines()
    ready = [ln for ln in lines if ln.startswith("ray_klein_jobs_total{") and 'status="Ready"' in ln]
    assert ready and float(ready[0].rsplit(" ", 1)[1]) >= 1
    assert any(ln.startswith("ray_klein_megapixels_total{") and 'direction="output"' in ln for ln in lines)
    for stage in ("embed", "denoise", "decode"):
        assert any(
            ln.startswith("ray_klein_batch_size_bucket{") and f'stage="{stage}"' in ln for ln in lines
        ), stage
        assert any(
            ln.startswith("ray_klein_stage_seconds_sum{") and f'stage="{stage}"' in ln for ln in lines
        ), stage
    for outcome in ("load", "hit"):
        assert any(
            ln.startswith("ray_klein_lora_adapters_total{") and f'outcome="{outcome}"' in ln for ln in lines
        )
    assert any(ln.startswith("ray_klein_lora_load_seconds_sum") for ln in lines)
    assert any(ln.startswith("ray_serve_") for ln in lines)  # Serve's own: queues, per-deployment latency


def test_loadtest_runner_against_the_service(app, tmp_path):
    """`klein loadtest` for a few seconds against the tiny service; its figures agree with the
    service's own records (usage) and with each other."""
    from datetime import UTC, datetime

    from serve.loadtest import run

    today = datetime.now(UTC).strftime("%Y-%m-%d")

    def usage_jobs() -> int:
        return app.http.get("/v1/usage", params={"start": today, "end": today}).json()["total"]["jobs"]

    before = usage_jobs()
    env = {"KLEIN_SIZES": "64x64,64x128", "KLEIN_EDIT_SHARE": "0.2", "KLEIN_JOB_DEADLINE_S": "60",
           "KLEIN_REFERENCE_SIZES": "64x64,96x80"}  # fmt: skip
    s = run(
        app.url,
        tmp_path / "lt",
        users=3,
        spawn_rate=3,
        run_time="8s",
        shape=None,
        api_key=None,
        extra_env=env,
    )
    after = usage_jobs()
    assert s["images"] > 0 and s["errors_by_kind"] == {} and s["request_failures"] == 0
    assert s["requests"] > s["images"] and sum(s["jobs_by_status"].values()) == s["images"]
    assert s["images"] <= after - before  # every image the clients got is a billed Ready job
    assert s["images_per_s"] == pytest.approx(s["images"] / s["seconds"], rel=1e-2)
    assert 64 * 64 / 1e6 * s["images"] <= s["megapixels"] <= 64 * 128 / 1e6 * s["images"] + 1e-9
    lat = s["job_latency_s"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
    assert (s["http_429"], s["http_503"]) == (0, 0)
    for name in ("locust_stats.csv", "report.html", "summary.json", "summary.md"):
        assert (tmp_path / "lt" / name).exists(), name
    stats = (tmp_path / "lt" / "locust_stats.csv").read_text()
    assert "JOB" in stats and "poll" in stats  # end-to-end job latency is its own entry
