"""LoRA adapters through the served APIs (in process, over ASGI): the image `klein generate` makes,
mixed adapters in one transformer batch with each request's own image, adapters named in results,
usage and cost, and bad adapters refused at submission (422 naming loras[i].path) while the service
and batch-mates are unharmed."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import pickle
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx
import numpy as np
import pytest
from PIL import Image

from deployments.jobs.metering import Price
from deployments.jobs.records import Status
from deployments.stages.adapters import LoraSettings
from klein import GenerationRequest, ModelSource, Pipeline
from klein.lora import LoraOptions
from klein.request import LoraRequest
from tests.klein.test_lora import _factors, write
from tests.serving.conftest import Receiver
from tests.serving.inprocess import build

MODEL = "/v1/flux-2-klein-tiny"
pytest.importorskip("peft")  # only for the shared writers' module


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    write(root / "style.safetensors", "ai-toolkit", _factors(1))
    write(root / "detail.safetensors", "kohya", _factors(2), alpha=2.0)
    (root / "team").mkdir()
    write(root / "team" / "faces.safetensors", "diffusers", _factors(3))
    write(root / "wide.safetensors", "ai-toolkit", _other_width())
    write(root / "unknown.safetensors", "ai-toolkit", {"double_blocks.9.img_attn.proj": _pair(64, 64)})
    write(root / "big-rank.safetensors", "ai-toolkit", _factors(4, rank=32))
    (root / "pickled.safetensors").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    (root / "truncated.safetensors").write_bytes((root / "style.safetensors").read_bytes()[:-64])
    (root / "large.safetensors").write_bytes(b"\0" * (2 * 2**20))
    return root


def _pair(fan_in, fan_out, rank=4):
    import torch

    return torch.randn(rank, fan_in), torch.randn(fan_out, rank)


def _other_width():
    return {"double_blocks.0.img_attn.proj": _pair(128, 128)}


def _ingress(tmp_path, registry, **lora):
    settings = LoraSettings(**{"root": str(registry), "max_mb": 1, "max_rank": 16, "slots": 4} | lora)
    price = Price(first_mp=1.4, per_mp=0.1, lora_per_mp=0.5)
    return build(tmp_path / "data", lora=settings, price=price, webhook_allow_private=True)


def _client(ingress):
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=ingress.__serve_build_asgi_app__()), base_url="http://t"
    )


async def _image(c, job_id) -> np.ndarray:
    res = (await c.get("/v1/get_result", params={"id": job_id})).json()
    assert res["status"] == "Ready", res
    data = (await c.get(res["result"]["sample"].removeprefix("http://t"))).content
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def test_served_adapters_match_klein_generate_and_are_named_and_billed(tmp_path, registry, receiver):
    ingress = _ingress(tmp_path, registry)
    body = {"prompt": "a fox", "width": 64, "height": 64, "seed": 5, "output_format": "png",
            "loras": [{"path": "style", "scale": 0.8}, {"path": "team/faces.safetensors", "scale": -0.5}],
            "webhook_url": receiver}  # fmt: skip
    local = Pipeline(ModelSource.preset("tiny"), lora=LoraOptions(slots=4, max_rank=16))
    loras = (
        LoraRequest(str(registry / "style.safetensors"), 0.8),
        LoraRequest(str(registry / "team/faces.safetensors"), -0.5),
    )
    want = np.asarray(local.generate([GenerationRequest("a fox", 64, 64, seed=5, loras=loras)])[0]).astype(
        int
    )

    async def go():
        async with _client(ingress) as c:
            r = await c.post(MODEL, json=body)
            assert r.status_code == 200, r.text
            assert r.json()["cost"] == pytest.approx(1.4 + 0.004096 * 0.5)  # the LoRA surcharge per output MP
            await asyncio.gather(*list(ingress.service.runner.running.values()))
            got = await _image(c, r.json()["id"])
            assert np.abs(got - want).max() <= 1
            res = (await c.get("/v1/get_result", params={"id": r.json()["id"]})).json()
            assert res["result"]["loras"] == [
                {"path": "style", "scale": 0.8},
                {"path": "team/faces.safetensors", "scale": -0.5},
            ]
            usage = await ingress.service.storage.list("usage")
            record = await ingress.service.storage.get(usage[0])
            assert b'"loras":["style","team/faces.safetensors"]' in record
            deadline = time.monotonic() + 10
            while not Receiver.received and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert json.loads(Receiver.received[0][0])["result"]["loras"] == res["result"]["loras"]
            # the OpenAI routes take the same extension field, JSON and multipart
            r = await c.post("/v1/images/generations", json={"prompt": "a fox", "size": "64x64", "seed": 5,
                                                              "response_format": "b64_json", "loras": body["loras"]})  # fmt: skip
            assert r.status_code == 200, r.text
            png = base64.b64decode(r.json()["data"][0]["b64_json"])
            assert (
                np.abs(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int) - want).max() <= 1
            )
            ref = io.BytesIO()
            Image.new("RGB", (64, 64), "red").save(ref, "PNG")
            r = await c.post("/v1/images/edits", data={"prompt": "x", "loras": '[{"path": "style"}]', "size": "64x64"},
                             files={"image": ("r.png", ref.getvalue(), "image/png")})  # fmt: skip
            assert r.status_code == 200, r.text
        lora = ingress.service.stages.transformer.obj.bank.stats()
        assert lora["loads"] == 2 and lora["hits"] >= 2  # loaded once each, then resident

    asyncio.run(go())


def test_a_batch_with_four_adapter_sets_gives_each_its_own_image(tmp_path, registry):
    ingress = _ingress(tmp_path, registry)
    sets = [
        [],
        [{"path": "style"}],
        [{"path": "detail", "scale": 1.5}, {"path": "team/faces"}],
        [{"path": "style", "scale": -1}],
    ]
    bodies = [{"prompt": f"p{i}", "width": 64, "height": 64, "seed": i, "output_format": "png", "loras": s}
              for i, s in enumerate(sets)]  # fmt: skip
    ft = ingress.service.stages.transformer.obj

    async def go():
        async with _client(ingress) as c:
            ids = [(await c.post(MODEL, json=b)).json()["id"] for b in bodies]  # submitted together
            await asyncio.gather(*list(ingress.service.runner.running.values()))
            together = [await _image(c, i) for i in ids]
            assert max(ft.batch_sizes) > 1, list(ft.batch_sizes)  # they did share a batch
            for body, image in zip(bodies, together, strict=True):
                r = await c.post(MODEL, json=body)
                await asyncio.gather(*list(ingress.service.runner.running.values()))
                assert np.array_equal(await _image(c, r.json()["id"]), image)

    asyncio.run(go())


class _Files(BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def do_GET(self):
        data = self.files.get(self.path)
        self.send_response(200 if data else 404)
        self.end_headers()
        self.wfile.write(data or b"")

    def log_message(self, *args):
        pass


@pytest.fixture
def origin(registry):
    _Files.files = {"/style.safetensors": (registry / "style.safetensors").read_bytes()}
    server = HTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_bad_adapters_are_refused_naming_the_field(tmp_path, registry, origin):
    ingress = _ingress(tmp_path, registry)
    cases = [
        ("style-missing", "no adapter named"),
        ("pickled", "not a safetensors file"),
        ("truncated", "not a safetensors file"),
        ("wide", "lora_A takes 128 inputs, the layer 64"),
        ("unknown", "fit no layer of this model: double_blocks.9.img_attn.proj"),
        ("big-rank", "over this deployment's max_rank 16"),
        ("large", "over the 1 MB cap"),
        ("../style", "must be a relative name"),
        (f"{origin}/style.safetensors", "URLs are not accepted here"),
    ]

    async def go():
        async with _client(ingress) as c:
            good = asyncio.ensure_future(
                c.post(
                    MODEL, json={"prompt": "mate", "width": 64, "height": 64, "loras": [{"path": "style"}]}
                )
            )
            for path, why in cases:
                r = await c.post(
                    MODEL,
                    json={
                        "prompt": "x",
                        "width": 64,
                        "height": 64,
                        "loras": [{"path": "style"}, {"path": path}],
                    },
                )
                assert r.status_code == 422, (path, r.text)
                detail = r.json()["detail"][0]
                assert detail["loc"] == ["body", "loras", 1, "path"] and why in detail["msg"], (path, detail)
            r = await c.post(MODEL, json={"prompt": "x", "loras": [{"path": "style", "scale": 5}]})
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "loras", 0, "scale"]
            r = await c.post(MODEL, json={"prompt": "x", "loras": [{"path": "style"}] * 4})
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "loras"]
            assert (await good).status_code == 200
            await asyncio.gather(*list(ingress.service.runner.running.values()))
            assert (await ingress.service.store.get((await good).json()["id"])).status is Status.READY
            assert len(await ingress.service.store.pending()) == 0  # nothing refused was kept
            assert (await c.get("/healthz")).status_code == 200

    asyncio.run(go())


def test_adapter_urls_when_allowed_and_never_private(tmp_path, registry, origin):
    open_to_private = _ingress(tmp_path / "a", registry, allow_urls=True, allow_private=True)
    guarded = _ingress(tmp_path / "b", registry, allow_urls=True)

    async def go():
        async with _client(open_to_private) as c:
            r = await c.post(
                MODEL,
                json={
                    "prompt": "x",
                    "width": 64,
                    "height": 64,
                    "loras": [{"path": f"{origin}/style.safetensors"}],
                },
            )
            assert r.status_code == 200, r.text
            await asyncio.gather(*list(open_to_private.service.runner.running.values()))
            assert (await c.get("/v1/get_result", params={"id": r.json()["id"]})).json()["status"] == "Ready"
            assert await open_to_private.service.storage.list(
                "loras/url"
            )  # fetched once, kept for the replicas
        async with _client(guarded) as c:
            r = await c.post(MODEL, json={"prompt": "x", "loras": [{"path": f"{origin}/style.safetensors"}]})
            assert r.status_code == 422 and "private, loopback" in r.json()["detail"][0]["msg"]

    asyncio.run(go())


def test_the_deployment_sets_how_many_adapters_and_none_means_none(tmp_path, registry):
    without = build(tmp_path / "data")
    one = _ingress(tmp_path / "one", registry, max_loras=1)
    five = _ingress(tmp_path / "five", registry, max_loras=5, slots=6)
    with pytest.raises(ValueError, match="lora.slots must be at least lora.max_loras \\+ 1 = 6"):
        LoraSettings(max_loras=5, slots=4)
    names = ["style", "detail", "team/faces", "style", "detail"]

    async def go():
        async with _client(without) as c:
            r = await c.post(MODEL, json={"prompt": "x", "loras": [{"path": "style"}]})
            assert r.status_code == 422 and "serves no LoRA adapters" in r.text
        async with _client(one) as c:
            r = await c.post(MODEL, json={"prompt": "x", "loras": [{"path": "style"}, {"path": "detail"}]})
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "loras"]
            assert "at most 1 adapters per request, got 2" in r.json()["detail"][0]["msg"]
        async with _client(five) as c:
            body = {"prompt": "x", "width": 64, "height": 64, "loras": [{"path": n} for n in names]}
            r = await c.post(MODEL, json=body)
            assert r.status_code == 200, r.text
            await asyncio.gather(*list(five.service.runner.running.values()))
            assert (await c.get("/v1/get_result", params={"id": r.json()["id"]})).json()["status"] == "Ready"
            body["loras"] *= 2
            r = await c.post(MODEL, json=body)
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == [
                "body",
                "loras",
            ]  # the hard cap, 8

    asyncio.run(go())
