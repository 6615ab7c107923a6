"""Inpainting through the served APIs (in process, over ASGI): `mask_image` + `strength` on the BFL
route and OpenAI's `mask` (transparent repaints) on /v1/images/edits give the image `klein generate`
makes; requests of different strengths share a transformer batch call and each keeps its own
image; the source is metered as input; bad masks and strengths are 422s naming the field."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from klein import GenerationRequest, ModelSource, Pipeline
from tests.serving.inprocess import build

MODEL = "/v1/flux-2-klein-tiny"


@pytest.fixture
def ingress(tmp_path):
    return build(tmp_path / "data")


@pytest.fixture(scope="module")
def local():
    return Pipeline(ModelSource.preset("tiny"))


def _client(ingress):
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=ingress.__serve_build_asgi_app__()), base_url="http://t"
    )


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _b64(image: Image.Image) -> str:
    return base64.b64encode(_png(image)).decode()


def _source(w=96, h=80, seed=1) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)).resize((w, h))


def _mask(w=96, h=80) -> Image.Image:
    mask = Image.new("L", (w, h), 0)
    mask.paste(255, (16, 16, w - 16, h - 32))
    return mask


def _transparent_mask() -> Image.Image:
    """OpenAI's form of `_mask()`: opaque, with the region to repaint transparent."""
    rgba = Image.new("RGBA", (96, 80), (0, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (16, 16, 80, 48))
    return rgba


async def _image(c, job_id) -> np.ndarray:
    await asyncio.sleep(0)
    res = (await c.get("/v1/get_result", params={"id": job_id})).json()
    assert res["status"] == "Ready", res
    data = (await c.get(res["result"]["sample"].removeprefix("http://t"))).content
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def _wanted(local, strength, seed, source=None, mask=None, refs=()) -> np.ndarray:
    req = GenerationRequest("a red door", seed=seed, steps=4, references=(source or _source(), *refs),
                            mask=mask or _mask(), strength=strength)  # fmt: skip
    return np.asarray(local.generate([req])[0]).astype(int)


def test_bfl_route_inpaints_as_klein_does_and_meters_the_source(ingress, local):
    async def go():
        async with _client(ingress) as c:
            body = {"prompt": "a red door", "input_image": _b64(_source()), "mask_image": _b64(_mask()),
                    "strength": 0.5, "seed": 4, "steps": 4, "output_format": "png"}  # fmt: skip
            r = await c.post(MODEL, json=body)
            assert r.status_code == 200, r.text
            assert r.json()["input_mp"] == pytest.approx(96 * 80 / 1e6)  # the source is an input
            await asyncio.gather(*list(ingress.service.runner.running.values()))
            got = await _image(c, r.json()["id"])
            assert got.shape == (80, 96, 3)
            assert np.abs(got - _wanted(local, 0.5, 4)).max() <= 1

    asyncio.run(go())


def test_openai_edits_mask_transparent_repaints(ingress, local):
    """OpenAI's mask: transparent pixels are repainted; a second image is a reference."""
    rgba = _transparent_mask()
    ref = _source(64, 64, 2)

    async def go():
        async with _client(ingress) as c:
            files = [("image", ("s.png", _png(_source()), "image/png")), ("image", ("r.png", _png(ref), "image/png")),
                     ("mask", ("m.png", _png(rgba), "image/png"))]  # fmt: skip
            data = {
                "prompt": "a red door",
                "seed": "6",
                "steps": "4",
                "strength": "0.75",
                "response_format": "b64_json",
            }
            r = await c.post("/v1/images/edits", data=data, files=files)
            assert r.status_code == 200, r.text
            got = np.asarray(
                Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
            ).astype(int)
            assert np.abs(got - _wanted(local, 0.75, 6, refs=(ref,))).max() <= 1

    asyncio.run(go())


def test_strengths_batch_together_each_its_own(ingress, local):
    """Inpaintings of different strengths and a plain edit submitted at once: the transformer
    groups them by start step (one group per strength) and every image equals its solo run."""
    ft = ingress.service.stages.transformer.obj
    calls_before = len(list(ft.batch_sizes))

    async def go():
        async with _client(ingress) as c:
            bodies = [{"prompt": "a red door", "input_image": _b64(_source()), "mask_image": _b64(_mask()),
                       "strength": st, "seed": s, "steps": 4, "output_format": "png"}
                      for s, st in ((1, 0.5), (2, 1.0), (3, 0.5))]  # fmt: skip
            ids = [(await c.post(MODEL, json=b)).json()["id"] for b in bodies]
            await asyncio.gather(*list(ingress.service.runner.running.values()))
            for (s, st), job_id in zip(((1, 0.5), (2, 1.0), (3, 0.5)), ids, strict=True):
                assert np.abs(await _image(c, job_id) - _wanted(local, st, s)).max() <= 1

    asyncio.run(go())
    assert sum(list(ft.batch_sizes)[calls_before:]) == 3


def test_bad_masks_and_strengths_name_the_field(ingress):
    async def go():
        async with _client(ingress) as c:
            base = {"prompt": "x", "input_image": _b64(_source())}
            for extra, field in [
                ({"mask_image": _b64(_mask(64, 64))}, "mask_image"),  # another size
                ({"mask_image": "bm90IGFuIGltYWdl"}, "mask_image"),  # undecodable
                ({"mask_image": _b64(_mask()), "strength": 0.0}, "strength"),
                ({"mask_image": _b64(_mask()), "strength": 1.5}, "strength"),
                ({"strength": 0.5}, "strength"),  # no mask
            ]:
                r = await c.post(MODEL, json=base | extra)
                assert r.status_code == 422, (field, r.text)
                assert r.json()["detail"][0]["loc"][-1] == field, (field, r.text)
            r = await c.post(MODEL, json={"prompt": "x", "mask_image": _b64(_mask())})
            assert (
                r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "mask_image"
            )  # nothing to repaint
            files = [
                ("image", ("s.png", _png(_source()), "image/png")),
                ("mask", ("m.png", _png(_mask()), "image/png")),
            ]
            r = await c.post("/v1/images/edits", data={"prompt": "x"}, files=files)  # no alpha
            assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "mask" and "alpha" in r.text
            assert await ingress.service.store.pending() == []

    asyncio.run(go())


def test_openai_n2_inpaintings_share_the_stored_inputs(ingress, local):
    """n=2: two jobs (seeds s, s+1) repaint the same source with the one stored mask."""
    rgba = _transparent_mask()

    async def go():
        async with _client(ingress) as c:
            files = [
                ("image", ("s.png", _png(_source()), "image/png")),
                ("mask", ("m.png", _png(rgba), "image/png")),
            ]
            data = {
                "prompt": "a red door",
                "seed": "8",
                "steps": "4",
                "n": "2",
                "response_format": "b64_json",
            }
            r = await c.post("/v1/images/edits", data=data, files=files)
            assert r.status_code == 200, r.text
            jobs = [await ingress.service.store.get(j) for j in r.json()["metering"]["job_ids"]]
            assert jobs[0].request.mask_key == jobs[1].request.mask_key is not None
            for i, item in enumerate(r.json()["data"]):
                got = np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))).astype(int)
                assert np.abs(got - _wanted(local, 0.8, 8 + i)).max() <= 1

    asyncio.run(go())
