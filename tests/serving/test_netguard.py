"""Outbound fetches on a user's behalf: address checks, pinning, size and time caps, redirects,
and input-image URLs through the API (off by default, private targets refused)."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
from PIL import Image

from deployments import netguard
from deployments.netguard import TargetRefused
from tests.serving.inprocess import build

PNG = io.BytesIO()
Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(PNG, "PNG")
PNG = PNG.getvalue()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/img.png":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)
        elif self.path == "/host":  # what Host header arrived (pinning keeps the name)
            body = self.headers["Host"].encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/endless":  # no Content-Length: only counting stops it
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(64):
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                pass
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "10")
            self.end_headers()
            time.sleep(3)
        elif self.path.startswith("/hop/"):
            n = int(self.path.rsplit("/", 1)[1])
            self.send_response(302)
            self.send_header("Location", f"/hop/{n - 1}" if n > 0 else "/img.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()


@pytest.fixture(scope="module")
def origin():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://localhost:{server.server_port}"
    server.shutdown()


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/", "http://localhost/", "http://[::1]/", "http://[::ffff:127.0.0.1]/", "http://10.1.2.3/",
    "http://192.168.0.1/", "http://172.16.0.1/", "http://169.254.169.254/latest/meta-data", "http://100.64.0.1/",
    "http://0.0.0.0/", "http://[fe80::1]/", "http://224.0.0.1/", "http://2130706433/",
])  # fmt: skip
def test_private_and_special_addresses_are_refused(url):
    with pytest.raises(TargetRefused, match="private, loopback or link-local"):
        netguard.resolve(url)
    assert netguard.is_private_target(url)


@pytest.mark.parametrize("url,why", [
    ("ftp://example.com/a.png", "only http and https"), ("file:///etc/passwd", "only http and https"),
    ("http://user:pw@8.8.8.8/", "credentials"), ("http:///nohost", "only http and https"),
    ("http://no-such-host.invalid/", "cannot resolve"),
])  # fmt: skip
def test_bad_urls_are_refused(url, why):
    with pytest.raises(TargetRefused, match=why):
        netguard.resolve(url)


def test_public_addresses_resolve_without_network():
    assert netguard.resolve("https://8.8.8.8/x") == ("8.8.8.8", "8.8.8.8")
    url, headers, ext = netguard.pinned("https://8.8.8.8:8443/x?y=1", False)
    assert url == "https://8.8.8.8:8443/x?y=1" and headers == {"Host": "8.8.8.8:8443"}
    assert ext == {"sni_hostname": "8.8.8.8"}


def test_fetch_caps_and_redirects(origin):
    async def go():
        with pytest.raises(TargetRefused, match="private"):
            await netguard.fetch(f"{origin}/img.png", 2**20, 5)  # loopback: refused by default
        assert await netguard.fetch(f"{origin}/img.png", 2**20, 5, allow_private=True) == PNG
        host = await netguard.fetch(f"{origin}/host", 100, 5, allow_private=True)
        assert host.decode() == origin.removeprefix("http://")  # connected to the IP, named the host
        with pytest.raises(TargetRefused) as e:
            await netguard.fetch(f"{origin}/img.png", 1000, 5, allow_private=True)
        assert e.value.too_large
        with pytest.raises(TargetRefused) as e:
            await netguard.fetch(f"{origin}/endless", 2**20, 10, allow_private=True)
        assert e.value.too_large
        t0 = time.monotonic()
        with pytest.raises(TargetRefused, match="within 1 s"):
            await netguard.fetch(f"{origin}/slow", 2**20, 1, allow_private=True)
        assert time.monotonic() - t0 < 2.5
        assert await netguard.fetch(f"{origin}/hop/2", 2**20, 5, allow_private=True) == PNG
        with pytest.raises(TargetRefused, match="more than 3 redirects"):
            await netguard.fetch(f"{origin}/hop/5", 2**20, 5, allow_private=True)
        with pytest.raises(TargetRefused, match="HTTP 404"):
            await netguard.fetch(f"{origin}/missing", 2**20, 5, allow_private=True)

    asyncio.run(go())


def _post(ingress, body):
    app = ingress.__serve_build_asgi_app__()

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as c:
            r = await c.post("/v1/flux-2-klein-tiny", json=body)
            if r.status_code == 200:
                await asyncio.gather(*list(ingress.service.runner.running.values()))
                return r, (await c.get("/v1/get_result", params={"id": r.json()["id"]})).json()
            return r, None

    return asyncio.run(go())


def test_input_image_urls_through_the_api(origin, tmp_path):
    body = {"prompt": "x", "width": 64, "height": 64, "input_image_2": f"{origin}/img.png"}
    r, _ = _post(build(tmp_path / "a"), body)  # off by default
    assert r.status_code == 422 and "fetching is off" in r.text and "input_image_2" in r.text
    r, _ = _post(build(tmp_path / "b", fetch_input_urls=True), body)  # on, but loopback is private
    assert r.status_code == 422 and "private" in r.text and "input_image_2" in r.text
    allowed = build(tmp_path / "c", fetch_input_urls=True, fetch_allow_private=True, max_input_image_mb=1)
    r, res = _post(allowed, body)
    assert r.status_code == 200 and res["status"] == "Ready", (r.text, res)
    assert r.json()["input_mp"] == pytest.approx(96 * 80 / 1e6)  # the fetched image was the reference
    r, _ = _post(allowed, {**body, "input_image_2": f"{origin}/endless"})
    assert r.status_code == 413 and "input_image_2" in r.text
    r, _ = _post(allowed, {**body, "input_image_2": f"{origin}/missing"})
    assert r.status_code == 422 and "HTTP 404" in r.text
    assert base64.b64encode(PNG)  # the same image inline is the other way in


def test_a_retry_with_its_idempotency_key_is_answered_before_its_urls_are_fetched_again(
    origin, tmp_path, monkeypatch
):
    """The first answer was lost; by the retry, the input's (presigned) URL has expired: the job
    made the first time is the answer, not a 422 about a URL the service no longer needs."""
    ingress = build(tmp_path / "d", fetch_input_urls=True, fetch_allow_private=True, max_input_image_mb=1)
    body = {"prompt": "x", "width": 64, "height": 64, "input_image": f"{origin}/img.png"}
    app = ingress.__serve_build_asgi_app__()

    async def expired(*args, **kwargs):
        raise TargetRefused("HTTP 403 from the origin")

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as c:
            headers = {"Idempotency-Key": "retry-1"}
            first = await c.post("/v1/flux-2-klein-tiny", json=body, headers=headers)
            assert first.status_code == 200, first.text
            monkeypatch.setattr(netguard, "fetch", expired)
            again = await c.post("/v1/flux-2-klein-tiny", json=body, headers=headers)
            assert again.status_code == 200 and again.json()["id"] == first.json()["id"], again.text
            other = await c.post("/v1/flux-2-klein-tiny", json=body, headers={"Idempotency-Key": "retry-2"})
            assert other.status_code == 422 and "HTTP 403" in other.text  # a new request does fetch
            await asyncio.gather(*list(ingress.service.runner.running.values()))

    asyncio.run(go())


@pytest.mark.parametrize("errno", ["EAI_AGAIN", "EAI_NONAME"])
def test_a_dns_server_that_did_not_answer_is_asked_again(monkeypatch, receiver, errno, tmp_path):
    """EAI_AGAIN ("temporary failure in name resolution") is not an answer: the webhook is retried,
    and a submission naming that host is accepted (delivery checks it again). A name that does not
    exist (EAI_NONAME) is refused at once, and never retried."""
    import socket

    from deployments.jobs.webhooks import deliver
    from tests.serving.conftest import Receiver

    port, calls, real = receiver.rsplit(":", 1)[1].split("/")[0], [], socket.getaddrinfo

    def flaky(host, *args, **kwargs):
        calls.append(host)
        if len(calls) == 1:
            raise socket.gaierror(getattr(socket, errno), "no answer")
        return real("127.0.0.1", *args, **kwargs)

    monkeypatch.setattr(netguard.socket, "getaddrinfo", flaky)
    url = f"http://hooks.example:{port}/hook"
    sent = asyncio.run(deliver(url, {"id": "j"}, None, attempts=3, backoff_s=0.01, allow_private=True))
    assert sent is (errno == "EAI_AGAIN") and len(calls) == (2 if sent else 1)
    assert len(Receiver.received) == (1 if sent else 0)

    calls.clear()
    ingress = build(tmp_path / "data")
    r, _ = _post(ingress, {"prompt": "x", "width": 64, "height": 64, "webhook_url": url})
    if errno == "EAI_AGAIN":
        assert r.status_code == 200, r.text
    else:
        assert r.status_code == 422 and "cannot resolve host" in r.text, r.text
