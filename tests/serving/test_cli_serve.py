"""`klein serve` as a user runs it: a subprocess with its own Ray, the embedded default config,
a request served, and a clean exit on SIGTERM (sent twice: a signal handler that took a lock could
deadlock on the second)."""

from __future__ import annotations

import httpx
import pytest

from tests.serving.conftest import start_klein_serve, stop_klein_serve, submit_and_wait

pytestmark = pytest.mark.slow  # `klein serve` with its own Ray


def test_klein_serve_starts_serves_and_stops(tmp_path):
    proc, url, lines = start_klein_serve([], tmp_path, KLEIN_STORAGE__ROOT=str(tmp_path / "data"))
    try:
        assert any(f"{url}/" in line for line in lines), "".join(lines[-30:])
        assert any(f"are stored in {tmp_path / 'data'}" in line for line in lines), "".join(lines[-30:])
        c = httpx.Client(base_url=url, timeout=60)
        res = submit_and_wait(c, "flux-2-klein-tiny", {"prompt": "hello", "width": 64, "height": 64})
        assert res["status"] == "Ready"
        assert c.get(res["result"]["sample"]).status_code == 200
        job_id = res["id"]
        assert (tmp_path / "data" / "jobs" / f"{job_id}.json").exists()  # KLEIN_ settings reach the replicas
    finally:  # twice at once, as an impatient Ctrl-C or a supervisor and its child both signal
        status, out = stop_klein_serve(proc, signals=2)
    assert status == 0, out[-2000:]
    assert "shutting down" in out
