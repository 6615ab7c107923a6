"""Secrets stay secret (API keys, S3 credentials, webhook secrets: never in logs, error answers or
traces), and CORS is off unless origins are configured."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import httpx
import pytest

from deployments.api.auth import KeyRing
from serve.settings import Settings
from tests.serving.conftest import S3_KEY, S3_SECRET
from tests.serving.inprocess import build

MODEL = "flux-2-klein-tiny"
WEBHOOK_SECRET = "whsec_SENTINEL_8c1f0e2d"


def _files_containing(root: Path, needles: list[str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in root.rglob("*"):
        if path.is_file() and path.stat().st_size < 256 * 2**20:
            text = path.read_bytes().decode("utf-8", "replace")
            hits = [n for n in needles if n in text]
            if hits:
                found[str(path)] = hits
    return found


@pytest.mark.slow
def test_no_secret_in_logs_errors_or_traces(app, ray_local):
    """The served DAG on S3 (its credentials in every replica's options) runs a job with a webhook
    secret (kept in its job record to sign deliveries) and rejects requests carrying it; then every
    log file of the Ray session, the traces file and every answer are searched for the secrets."""
    import ray

    body = {"prompt": "secret keeper", "width": 64, "height": 64, "webhook_secret": WEBHOOK_SECRET}
    r = app.http.post(f"/v1/{MODEL}", json=body)
    assert r.status_code == 200, r.text
    answers = [r.text]
    res = app.wait(r.json()["id"])
    assert res["status"] == "Ready"
    answers.append(app.http.get("/v1/get_result", params={"id": res["id"]}).text)
    bad = app.http.post(f"/v1/{MODEL}", json={**body, "webhook_secret": WEBHOOK_SECRET * 40})
    assert bad.status_code == 422 and "webhook_secret" in bad.text
    answers.append(bad.text)
    bad = app.http.post(f"/v1/{MODEL}", json={**body, "steps": 0})
    answers.append(bad.text)
    assert not [a for a in answers if WEBHOOK_SECRET in a or S3_SECRET in a]

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    leaks = _files_containing(session / "logs", [WEBHOOK_SECRET, S3_SECRET])
    assert not leaks, leaks
    assert _files_containing(session / "logs" / "serve", [res["id"]])  # the search does see the job's logs
    traces = app.traces.read_text()
    assert res["id"] in traces  # the search does see this job's spans (tracing is on)
    assert WEBHOOK_SECRET not in traces and S3_SECRET not in traces
    assert S3_KEY  # the access key id is not a secret (it names the credential), the secret key is


def test_api_keys_never_logged_or_echoed(tmp_path, caplog):
    key, wrong = "sk-klein-SENTINEL-good-0001", "sk-klein-SENTINEL-wrong-0002"
    ingress = build(tmp_path / "data", keys=KeyRing.from_keys([key]))

    async def go():
        transport = httpx.ASGITransport(app=ingress.__serve_build_asgi_app__())
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            answers = []
            for headers in ({"x-key": wrong}, {"Authorization": f"Bearer {wrong}"}, {"x-key": key}):
                r = await c.post(
                    f"/v1/{MODEL}", json={"prompt": "x", "width": 64, "height": 64}, headers=headers
                )
                answers.append(r)
            await asyncio.gather(*list(ingress.service.runner.running.values()))
            job = answers[-1].json()["id"]
            answers.append(await c.get("/v1/get_result", params={"id": job}, headers={"x-key": key}))
            answers.append(await c.get("/v1/usage?start=2026-01-01&end=2026-12-31", headers={"x-key": key}))
            return answers

    with caplog.at_level(logging.DEBUG):
        answers = asyncio.run(go())
    assert [a.status_code for a in answers] == [401, 401, 200, 200, 200]
    for text in [a.text for a in answers] + [caplog.text]:
        assert key not in text and wrong not in text
    stored = _files_containing(tmp_path / "data", [key, wrong])
    assert not stored, stored  # storage names keys by id; only digests exist anywhere


def test_settings_never_print_secrets():
    s = Settings(api_keys="sk-one,sk-two", storage={"backend": "s3", "secret_access_key": "s3-SENTINEL"})
    for text in (repr(s), str(s), s.model_dump_json()):
        assert "sk-one" not in text and "s3-SENTINEL" not in text


def test_cors_is_off_by_default_and_exact_when_configured(tmp_path):
    async def preflight(ingress, origin):
        transport = httpx.ASGITransport(app=ingress.__serve_build_asgi_app__())
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.options(f"/v1/{MODEL}", headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                                           "Access-Control-Request-Headers": "x-key, content-type"})  # fmt: skip

    r = asyncio.run(preflight(build(tmp_path / "a"), "https://evil.example"))
    assert "access-control-allow-origin" not in r.headers
    allowed = build(tmp_path / "b", cors_origins=["https://app.example"])
    r = asyncio.run(preflight(allowed, "https://app.example"))
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-key" in r.headers["access-control-allow-headers"].lower()
    r = asyncio.run(preflight(allowed, "https://evil.example"))
    assert r.headers.get("access-control-allow-origin") != "https://evil.example"
