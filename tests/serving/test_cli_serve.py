"""`klein serve` as a user runs it: a subprocess with its own Ray, the embedded default config,
a request served, `klein loadtest` run against it for a few seconds, and a clean exit on SIGTERM."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.serving.conftest import free_port


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
        _loadtest(f"http://127.0.0.1:{port}", tmp_path / "loadtest")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, out[-2000:]
    assert "shutting down" in out


def _loadtest(host: str, out):
    """`klein loadtest` for a few seconds against the live service: the summary must agree with Locust's
    own CSV (every JOB entry is an image) and with the service's usage (megapixels of what it made)."""
    env = {
        **os.environ,
        "KLEIN_SIZES": "64x64,128x64",
        "KLEIN_EDIT_SHARE": "0.25",
        "KLEIN_REFERENCE_SIZES": "64x64,96x80",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "serve.cli", "loadtest", "--host", host, "--users", "3", "--spawn-rate", "3",
         "--run-time", "8s", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] >= 3, summary
    assert summary["errors_by_kind"] == {}, summary
    assert summary["http_429"] == summary["http_503"] == 0
    assert summary["requests"] > summary["images"] and summary["request_failures"] == 0
    # Every completed image is one of the two sizes asked for, so megapixels lie between the bounds.
    assert summary["images"] * 64 * 64 / 1e6 <= summary["megapixels"] <= summary["images"] * 128 * 64 / 1e6
    assert summary["images_per_s"] == pytest.approx(summary["images"] / summary["seconds"], rel=1e-2)
    lat = summary["job_latency_s"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] < 60
    assert sum(summary["jobs_by_status"].values()) == summary["images"]
    rows = {r["Name"]: r for r in csv.DictReader((out / "locust_stats.csv").open())}
    assert rows["Aggregated"]["Failure Count"] == "0" and any(r["Type"] == "JOB" for r in rows.values())
    assert (out / "report.html").stat().st_size > 0 and "Load test against" in (
        out / "summary.md"
    ).read_text()
