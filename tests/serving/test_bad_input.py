"""Bad input, field by field and endpoint by endpoint, over the real FastAPI app (in-process
stages): every rejection is a 4xx naming the field and its bound, never a 5xx, and every request
that was accepted ends Ready."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import textwrap
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.serving.inprocess import build

MODEL = "/v1/flux-2-klein-tiny"


def _png(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **kw)
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _bomb(w: int, h: int) -> bytes:
    """A valid PNG header and a tiny compressed body that claims w x h pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _animated(fmt: str) -> bytes:
    frames = [_noise(96, 96, i) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100)
    return buf.getvalue()


def _cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    _noise(96, 80).convert("CMYK").save(buf, "JPEG")
    return buf.getvalue()


def _sixteen_bit() -> bytes:
    a = (np.arange(96 * 96).reshape(96, 96) * 7 % 65536).astype(np.uint16)
    return _png(Image.fromarray(a))


def _multipage_tiff() -> bytes:
    buf = io.BytesIO()
    _noise(96, 96).save(buf, "TIFF", save_all=True, append_images=[_noise(96, 96, 1)])
    return buf.getvalue()


VALID_PNG = _png(_noise(96, 80))
GOOD = {"prompt": "a fox", "width": 64, "height": 64}

# (case, body overrides, status, field named in the error)
BFL_FIELDS = [
    ("missing prompt", {"prompt": None}, 422, "prompt"),
    ("empty prompt", {"prompt": ""}, 422, "prompt"),
    ("blank prompt", {"prompt": " \n\t "}, 422, "prompt"),
    ("prompt not a string", {"prompt": 123}, 422, "prompt"),
    ("enormous prompt", {"prompt": "x" * 10_001}, 422, "prompt"),
    ("NUL in prompt", {"prompt": "a\x00b"}, 422, "prompt"),
    ("escape in prompt", {"prompt": "a\x1b[31m"}, 422, "prompt"),
    ("width too small", {"width": 48}, 422, "width"),
    ("width too large", {"width": 4096}, 422, "width"),
    ("width not a multiple of 16", {"width": 100}, 422, "width"),
    ("width negative", {"width": -16}, 422, "width"),
    ("width fractional", {"width": 64.5}, 422, "width"),
    ("width a word", {"width": "wide"}, 422, "width"),
    ("height too large", {"height": 2064}, 422, "height"),
    ("too many pixels", {"width": 2048, "height": 2048 + 16}, 422, "height"),
    ("seed negative", {"seed": -1}, 422, "seed"),
    ("seed too large", {"seed": 2**63}, 422, "seed"),
    ("steps zero", {"steps": 0}, 422, "steps"),
    ("steps too many", {"steps": 101}, 422, "steps"),
    ("guidance on a distilled model", {"guidance": 4.0}, 422, "guidance"),
    ("guidance out of range", {"guidance": 50}, 422, "guidance"),
    ("safety_tolerance too high", {"safety_tolerance": 6}, 422, "safety_tolerance"),
    ("safety_tolerance negative", {"safety_tolerance": -1}, 422, "safety_tolerance"),
    ("output_format unknown", {"output_format": "gif"}, 422, "output_format"),
    ("unknown field", {"negative_prompt": "x"}, 422, "negative_prompt"),
    ("fifth input image", {"input_image_5": _b64(VALID_PNG)}, 422, "input_image_5"),
    ("webhook_url not a URL", {"webhook_url": "not a url"}, 422, "webhook_url"),
    ("webhook_url ftp", {"webhook_url": "ftp://example.com/x"}, 422, "webhook_url"),
    ("webhook_url loopback", {"webhook_url": "http://127.0.0.1:9/hook"}, 422, "webhook_url"),
    ("webhook_url link-local", {"webhook_url": "http://169.254.169.254/latest"}, 422, "webhook_url"),
    (
        "webhook_url host that does not resolve",
        {"webhook_url": "http://no-such-host.invalid/h"},
        422,
        "cannot resolve host",
    ),
    ("webhook_secret too long", {"webhook_secret": "s" * 257}, 422, "webhook_secret"),
    (
        "webhook_url host of 3000 characters",
        {"webhook_url": f"http://{'a' * 3000}.com/h"},
        422,
        "webhook_url",
    ),
    ("webhook_url label over 63", {"webhook_url": f"http://{'b' * 64}.example.com/h"}, 422, "webhook_url"),
    ("webhook_url bad IDNA", {"webhook_url": "http://xn--a.example.com/h"}, 422, "webhook_url"),
    ("seed true", {"seed": True}, 422, "seed"),
    ("steps true", {"steps": True}, 422, "steps"),
    ("safety_tolerance true", {"safety_tolerance": True}, 422, "safety_tolerance"),
    ("width a numeric string", {"width": "64"}, 422, "width"),
    ("guidance a numeric string", {"guidance": "1"}, 422, "guidance"),
]
BAD_IMAGES = [
    ("not base64", "@@@not-base64@@@", 422, "not valid base64"),
    ("empty string", "", 422, "is empty"),
    ("data URI not base64", "data:image/png,abc", 422, "base64"),
    ("text, not an image", _b64(b"hello, world"), 422, "cannot decode"),
    ("truncated PNG", _b64(VALID_PNG[: len(VALID_PNG) // 2]), 422, "cannot decode"),
    ("1x1", _b64(_png(Image.new("RGB", (1, 1)))), 422, "at least 64"),
    ("100000x1", _b64(_png(Image.new("L", (100_000, 1)))), 422, "at least 64"),
    ("8000x64 (aspect)", _b64(_png(Image.new("L", (8000, 64)))), 422, "aspect ratio"),
    ("decompression bomb", _b64(_bomb(50_000, 50_000)), 413, "MP"),
    ("animated GIF", _b64(_animated("GIF")), 422, "animated"),
    ("animated PNG", _b64(_animated("PNG")), 422, "animated"),
    ("animated WebP", _b64(_animated("WEBP")), 422, "animated"),
    ("multi-page TIFF", _b64(_multipage_tiff()), 422, "multi-page"),
    ("an URL (fetching is off)", "https://example.com/a.png", 422, "URL"),
    ("too large a file", _b64(b"\x89PNG" + b"\0" * (2 * 2**20)), 413, "at most 1 MB"),
]
GOOD_IMAGES = [
    ("CMYK JPEG", _cmyk_jpeg()),
    ("16-bit greyscale PNG", _sixteen_bit()),
    ("RGBA PNG", _png(_noise(96, 80).convert("RGBA"))),
    ("palette PNG", _png(_noise(96, 80).convert("P"))),
    ("1-bit PNG", _png(_noise(96, 80).convert("1"))),
]


@pytest.fixture
def client_and_ingress(tmp_path):
    ingress = build(tmp_path / "data", max_input_image_mb=1, max_body_mb=4)
    return ingress


def _named(r: httpx.Response, field: str) -> bool:
    """The response names `field`: in a 422's loc, or in its message."""
    return field in json.dumps(r.json())


def test_bad_input_matrix(client_and_ingress):
    ingress = client_and_ingress
    app = ingress.__serve_build_asgi_app__()
    tried: list[tuple[str, int]] = []

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:

            async def expect(case, status, field, method, url, **kw):
                r = await c.request(method, url, **kw)
                assert r.status_code == status, (case, r.status_code, r.text[:300])
                assert _named(r, field), (case, r.text[:300])
                tried.append((case, r.status_code))

            # --- the async API, field by field ---
            for case, over, status, field in BFL_FIELDS:
                body = {k: v for k, v in {**GOOD, **over}.items() if v is not None}
                await expect(case, status, field, "POST", MODEL, json=body)
            for case, data, status, msg in BAD_IMAGES:
                await expect(case, status, msg, "POST", MODEL, json={"prompt": "x", "input_image": data})
                await expect(f"{case} (input_image_3)", status, "input_image_3", "POST", MODEL,
                             json={"prompt": "x", "input_image_3": data})  # fmt: skip
            raw_surrogate = b'{"prompt": "a \\ud800 b", "width": 64, "height": 64}'
            await expect("unpaired surrogate", 422, "prompt", "POST", MODEL, content=raw_surrogate,
                         headers={"content-type": "application/json"})  # fmt: skip
            await expect("broken JSON", 422, "json", "POST", MODEL, content=b'{"prompt": ',
                         headers={"content-type": "application/json"})  # fmt: skip
            await expect("JSON array", 422, "body", "POST", MODEL, json=[GOOD])
            await expect("text/plain body", 415, "application/json", "POST", MODEL, content=b"a fox",
                         headers={"content-type": "text/plain"})  # fmt: skip
            await expect("no content type", 415, "application/json", "POST", MODEL, content=b"{}")
            await expect("form instead of JSON", 415, "application/json", "POST", MODEL, data={"prompt": "x"})
            big = b'{"prompt": "' + b"x" * (5 * 2**20) + b'"}'
            await expect("body over the cap", 413, "4 MB", "POST", MODEL, content=big,
                         headers={"content-type": "application/json"})  # fmt: skip

            async def chunks():
                for _ in range(5):
                    yield b" " * 2**20

            await expect("chunked body over the cap", 413, "4 MB", "POST", MODEL, content=chunks(),
                         headers={"content-type": "application/json"})  # fmt: skip
            await expect("Idempotency-Key too long", 422, "idempotency-key", "POST", MODEL, json=GOOD,
                         headers={"Idempotency-Key": "k" * 256})  # fmt: skip
            await expect("unknown model", 404, "flux-2-klein-tiny", "POST", "/v1/flux-2-pro", json=GOOD)

            # --- polling, cancelling, usage ---
            await expect("get_result without id", 422, "id", "GET", "/v1/get_result")
            await expect(
                "get_result id too long", 422, "id", "GET", "/v1/get_result", params={"id": "j" * 65}
            )
            await expect("get_result unknown id", 200, "Task not found", "GET", "/v1/get_result",
                         params={"id": "nope"})  # fmt: skip
            await expect("cancel unknown job", 404, "Task not found", "DELETE", "/v1/jobs/nope")
            usage = "/v1/usage"
            await expect("usage impossible date", 422, "start", "GET", usage, params={"start": "2026-02-30"})
            await expect("usage bad date", 422, "start", "GET", usage,
                         params={"start": "yesterday", "end": "2026-01-01"})  # fmt: skip
            await expect("usage end before start", 422, "end", "GET", usage,
                         params={"start": "2026-02-01", "end": "2026-01-01"})  # fmt: skip
            await expect("usage range too long", 422, "end", "GET", usage,
                         params={"start": "2024-01-01", "end": "2026-01-01"})  # fmt: skip
            await expect("usage group_by unknown", 422, "group_by", "GET", usage,
                         params={"start": "2026-01-01", "end": "2026-01-02", "group_by": "hour"})  # fmt: skip

            # --- the OpenAI-style API ---
            gen = "/v1/images/generations"
            ok = {"prompt": "a fox", "size": "64x64"}
            for case, over, status, field in [
                ("n zero", {"n": 0}, 422, "n"),
                ("n too many", {"n": 5}, 422, "n"),
                ("size a word", {"size": "big"}, 422, "size"),
                ("size half", {"size": "64x"}, 422, "size"),
                ("size 100000x1", {"size": "100000x1"}, 422, "size"),
                ("size not a multiple", {"size": "63x64"}, 422, "size"),
                ("size too many pixels", {"size": "2048x2064"}, 422, "size"),
                ("response_format unknown", {"response_format": "xml"}, 422, "response_format"),
                ("output_format unknown", {"output_format": "bmp"}, 422, "output_format"),
                ("unknown field", {"quality": "hd"}, 422, "quality"),
                ("user too long", {"user": "u" * 257}, 422, "user"),
                ("prompt with BEL", {"prompt": "ding\x07"}, 422, "prompt"),
                ("steps zero", {"steps": 0}, 422, "steps"),
                ("model unknown", {"model": "dall-e-3"}, 404, "model"),
                ("n a numeric string", {"n": "2"}, 422, "n"),
                ("n true", {"n": True}, 422, "n"),
                ("seed a numeric string", {"seed": "7"}, 422, "seed"),
                ("size zero", {"size": "0x0"}, 422, "size"),
                ("size zero wide", {"size": "0x512"}, 422, "size"),
                ("size in full-width digits", {"size": "\uff11\uff10\uff12\uff14x512"}, 422, "size"),
                ("stream a number", {"stream": 1}, 422, "stream"),
                ("empty prompt", {"prompt": ""}, 422, "prompt"),
            ]:
                await expect(case, status, field, "POST", gen, json={**ok, **over})
            await expect("generations as form", 415, "application/json", "POST", gen, data=ok)

            edits = "/v1/images/edits"
            png = ("a.png", VALID_PNG, "image/png")
            for case, data, files, status, field in [
                ("edit without image", {"prompt": "x"}, None, 422, "image"),
                ("edit with mask", {"prompt": "x"}, {"image": png, "mask": png}, 422, "mask"),
                ("edit image as text", {"prompt": "x", "image": "abc"}, None, 422, "image"),
                ("edit unknown field", {"prompt": "x", "style": "y"}, {"image": png}, 422, "style"),
                ("edit n a word", {"prompt": "x", "n": "two"}, {"image": png}, 422, "n"),
                ("edit missing prompt", {}, {"image": png}, 422, "prompt"),
                ("edit broken file", {"prompt": "x"}, {"image": ("a.png", b"\x89PNGxx", "image/png")}, 422,
                 "image"),
                ("edit 1x1", {"prompt": "x"}, {"image": ("a.png", _png(Image.new("RGB", (1, 1))))}, 422, "image"),
                ("edit animated", {"prompt": "x"}, {"image": ("a.gif", _animated("GIF"))}, 422, "animated"),
                ("edit bomb", {"prompt": "x"}, {"image": ("b.png", _bomb(50_000, 50_000))}, 413, "image"),
                ("edit control char", {"prompt": "x\x00"}, {"image": png}, 422, "prompt"),
                ("edit loras as a file", {"prompt": "x"}, {"image": png, "loras": ("l.json", b"[]")}, 422,
                 "loras"),
                ("edit loras nested deep", {"prompt": "x", "loras": "[" * 100_000}, {"image": png}, 422, "loras"),
            ]:  # fmt: skip
                await expect(case, status, field, "POST", edits, data=data, files=files)
            await expect("edit as JSON", 415, "multipart/form-data", "POST", edits, json={"prompt": "x"})

            # --- odd but valid images are accepted, and their jobs end Ready ---
            accepted = []
            for case, data in GOOD_IMAGES:
                r = await c.post(
                    MODEL, json={"prompt": "x", "width": 64, "height": 64, "input_image": _b64(data)}
                )
                assert r.status_code == 200, (case, r.text[:300])
                accepted.append(r.json()["id"])
                tried.append((case, 200))
            await asyncio.gather(*list(ingress.service.runner.running.values()))
            for job_id in accepted:
                res = (await c.get("/v1/get_result", params={"id": job_id})).json()
                assert res["status"] == "Ready", res
            assert (await c.get("/healthz")).status_code == 200

    asyncio.run(go())
    assert all(status < 500 for _, status in tried)
    print(
        f"bad-input matrix: {len(tried)} requests, {sum(s >= 400 for _, s in tried)} rejected, 0 server errors"
    )


def test_sixteen_bit_references_are_scaled_not_clipped():
    """PIL's convert('RGB') clips 16-bit greyscale to white; klein scales it like an 8-bit image."""
    from klein.image import to_rgb

    ramp = np.linspace(0, 65535, 96 * 96).reshape(96, 96).astype(np.uint16)
    sixteen = Image.open(io.BytesIO(_png(Image.fromarray(ramp))))
    eight = Image.fromarray((ramp / 257).round().astype(np.uint8), "L")
    got = np.asarray(to_rgb(sixteen), dtype=int)
    assert got.shape == (96, 96, 3)
    assert np.abs(got - np.asarray(eight.convert("RGB"), dtype=int)).max() <= 1
    assert got.min() == 0 and got.max() == 255


def test_accepted_input_images_are_checked_in_full_but_not_held_decoded():
    """decode_image proves the whole file decodes (a truncated one is refused), then returns an
    image opened lazily from the bytes: the ingress keeps sizes, not megapixels of pixels."""
    from deployments.api.images import decode_image
    from deployments.jobs.errors import FieldError

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), np.uint8)).save(buf, "PNG")
    raw, image = decode_image(buf.getvalue(), "input_image", 2**20, 10**6)
    assert raw == buf.getvalue() and image.size == (400, 300) and image.mode == "RGB"
    assert image._im is None  # no pixel buffer held
    assert np.asarray(image).shape == (300, 400, 3)  # still decodable where pixels are wanted
    with pytest.raises(FieldError, match="cannot decode image"):
        decode_image(buf.getvalue()[: len(raw) // 2], "input_image", 2**20, 10**6)


def test_openai_routes_answer_openais_error_object_beside_detail(client_and_ingress):
    """The official client reads `error.message`; FastAPI-style clients read `detail`: both are there,
    for the schema's refusals, the service's, the body checks' and the key check's."""
    app = client_and_ingress.__serve_build_asgi_app__()

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
            gen = "/v1/images/generations"
            for body, param in [({"prompt": "x", "n": 0}, "n"), ({"prompt": "x", "size": "0x0"}, "size")]:
                r = await c.post(gen, json=body)
                error = r.json()["error"]
                assert r.status_code == 422 and r.json()["detail"], r.text
                assert error["param"] == param and error["type"] == "invalid_request_error", error
                assert error["message"].startswith(f"{param}: ") and error["code"] == "invalid_value"
            r = await c.post(gen, content=b"x", headers={"content-type": "text/plain"})
            assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
            r = await c.post("/v1/images/edits", data={"prompt": "x"})
            assert r.status_code == 422 and r.json()["error"]["param"] == "image"
            r = await c.post(MODEL, json={"prompt": "x", "width": 0})  # the BFL route: as before
            assert r.status_code == 422 and "error" not in r.json()

    asyncio.run(go())


def _jpeg_turned(w: int, h: int, orientation: int) -> bytes:
    """A camera's JPEG: w x h pixels as stored, with an EXIF orientation saying how to turn them."""
    image = Image.new("RGB", (w, h), (200, 30, 30))
    image.paste((30, 30, 200), (0, 0, w // 4, h))  # the stored left quarter: blue
    exif = image.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def test_images_as_encoders_write_them_and_as_cameras_store_them(client_and_ingress):
    """Base64 with MIME line breaks, the URL-safe alphabet without padding, an upper-case data URI:
    accepted. A JPEG stored on its side (EXIF orientation 6, as phones write them) is used upright:
    the output takes the upright size, and the reference the model sees is upright. A reference of
    up to 8:1 gives an output within the side limit; an inpainting source that could not is refused
    naming it."""
    ingress = client_and_ingress
    app = ingress.__serve_build_asgi_app__()
    png = _png(_noise(96, 80))
    wrapped = "\n".join(textwrap.wrap(_b64(png), 76))
    urlsafe = base64.urlsafe_b64encode(png).decode().rstrip("=")
    assert "-" in urlsafe or "_" in urlsafe

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
            for case, data in [
                ("MIME line breaks", wrapped),
                ("URL-safe, unpadded", urlsafe),
                ("data URI in capitals", "DATA:image/png;BASE64," + _b64(png)),
            ]:
                r = await c.post(MODEL, json={"prompt": "x", "width": 64, "height": 64, "input_image": data})
                assert r.status_code == 200, (case, r.text)
                assert r.json()["input_mp"] == pytest.approx(96 * 80 / 1e6), case
            r = await c.post(MODEL, json={"prompt": "x", "input_image": _b64(_jpeg_turned(320, 160, 6))})
            assert r.status_code == 200, r.text
            assert r.json()["output_mp"] == pytest.approx(160 * 320 / 1e6)  # upright: 160 wide
            (stored,) = (await ingress.service.store.get(r.json()["id"])).request.input_files
            upright = Image.open(io.BytesIO(await ingress.service.storage.get(stored)))
            assert upright.size == (160, 320) and 0x0112 not in upright.getexif()
            top = np.asarray(upright.convert("RGB"))[: 320 // 4 - 8].astype(int)
            assert top[..., 2].mean() > 150 and top[..., 0].mean() < 80  # stored left is the top
            wide = _b64(_png(Image.new("L", (4800, 700), 128)))  # 6.9:1; 2620x382 at 1 MP
            r = await c.post(MODEL, json={"prompt": "x", "input_image": wide})
            assert r.status_code == 200, r.text
            assert r.json()["output_mp"] == pytest.approx(2048 * 288 / 1e6)
            r = await c.post(
                MODEL,
                json={
                    "prompt": "x",
                    "input_image": wide,
                    "mask_image": _b64(_png(Image.new("L", (4800, 700), 255))),
                },
            )
            assert r.status_code == 422 and "input_image" in r.text and "2048 px" in r.text, r.text
            await asyncio.gather(*list(ingress.service.runner.running.values()))

    asyncio.run(go())


def test_a_sixteen_bit_mask_is_scaled_not_clipped():
    """A soft 16-bit mask (a 30 % grey is 19660 of 65535) keeps its greys: PIL's own convert would
    clip every non-zero sample to white, repainting the whole image."""
    from deployments.api.images import _mask_image
    from deployments.jobs.service import InputImage
    from klein.inpaint import prepare_mask

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    data = _png(Image.fromarray(ramp))
    mask = _mask_image(
        InputImage("mask_image", data, Image.open(io.BytesIO(data))), transparent_repaints=False
    )
    grey = np.asarray(Image.open(io.BytesIO(mask.data)), dtype=int)
    assert np.abs(grey - (ramp / 257).round()).max() <= 1
    tokens = prepare_mask(Image.open(io.BytesIO(data)), 64, 64, 16).flatten()
    assert tokens.tolist() == [0.0] * 8 + [1.0] * 8  # the darker half kept (clipped: all repainted)
