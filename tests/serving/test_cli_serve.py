"""`klein serve` as a user runs it: a subprocess with its own Ray, the embedded default config,
a request served, and a clean exit on SIGTERM (sent twice: a signal handler that took a lock could
deadlock on the second)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.serving.conftest import free_port

pytestmark = pytest.mark.slow  # `klein serve` with its own Ray


def test_klein_serve_starts_serves_and_stops(tmp_path):
    port = free_port()
    env = {**os.environ, "KLEIN_STORAGE__ROOT": str(tmp_path / "data"), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve.cli", "serve", "--port", str(port)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            if "klein-serve is up" in line:
                break
        assert any(f"http://127.0.0.1:{port}/" in line for line in lines), "".join(lines[-30:])
        assert any(f"are stored in {tmp_path / 'data'}" in line for line in lines), "".join(lines[-30:])
        c = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        job = c.post("/v1/flux-2-klein-tiny", json={"prompt": "hello", "width": 64, "height": 64}).json()
        for _ in range(300):
            res = c.get("/v1/get_result", params={"id": job["id"]}).json()
            if res["status"] != "Pending":
                break
            time.sleep(0.1)
        assert res["status"] == "Ready"
        assert c.get(res["result"]["sample"]).status_code == 200
        assert (
            tmp_path / "data" / "jobs" / f"{job['id']}.json"
        ).exists()  # KLEIN_ settings reach the replicas
    finally:  # twice at once, as an impatient Ctrl-C or a supervisor and its child both signal
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, out[-2000:]
    assert "shutting down" in out
