"""Locust users for klein-serve: BFL-style async jobs (submit -> poll -> fetch) and OpenAI-style sync
requests, over a mix of sizes (512^2 to 2 MP), edits with 1-4 references and repeated prompts.

    locust -f serve/locustfile.py --host http://HOST:8000 [-u 16 -r 4 -t 5m | KLEIN_SHAPE=ramp]

(loadtest/locustfile.py re-exports this file for runs from a checkout; it lives in the package so
that an installed klein-serve, `klein loadtest`, has it.)

Environment: KLEIN_API_KEY (sent as x-key and Bearer), KLEIN_LOAD_MODEL (default: the first of
GET /v1/models), KLEIN_SIZES ("WxH,..."), KLEIN_REFERENCE_SIZES (of the generated reference
images, "WxH,..."; 256^2 to 1 MP), KLEIN_EDIT_SHARE (0.3), KLEIN_SYNC_SHARE (weight of sync
users, 1 vs 3 async), KLEIN_REPEAT_SHARE (0.5: prompts drawn from a small pool), KLEIN_JOB_DEADLINE_S
(300), KLEIN_SHAPE (ramp | burst | soak | drain, with KLEIN_PEAK_USERS and KLEIN_DURATION_S),
KLEIN_STATS_FILE (JSON written at the end: completed images, megapixels, job latencies, errors by
kind; `klein loadtest` turns it into the summary).

The end-to-end job latency (submit to image fetched) is reported as its own entry, type "JOB".
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import threading
import time
from collections import Counter

from locust import HttpUser, LoadTestShape, between, events, task


def _sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(map(int, s.split("x"))) for s in text.split(",")]


API_KEY = os.environ.get("KLEIN_API_KEY", "")
SIZES = _sizes(os.environ.get("KLEIN_SIZES", "512x512,768x768,1024x1024,1024x768,1408x1408,1920x1088"))
REFERENCE_SIZES = _sizes(os.environ.get("KLEIN_REFERENCE_SIZES", "256x256,512x384,768x768,1024x1024"))
EDIT_SHARE = float(os.environ.get("KLEIN_EDIT_SHARE", "0.3"))
REPEAT_SHARE = float(os.environ.get("KLEIN_REPEAT_SHARE", "0.5"))
DEADLINE_S = float(os.environ.get("KLEIN_JOB_DEADLINE_S", "300"))
PROMPT_POOL = [
    "a lighthouse at dusk, long exposure",
    "a red fox in fresh snow",
    "an isometric city block at night",
    "a bowl of ramen, studio lighting",
    "a watercolor map of an imaginary island",
    "portrait of an astronaut, film grain",
]
HEADERS = {"x-key": API_KEY, "Authorization": f"Bearer {API_KEY}"} if API_KEY else {}


class Stats:
    """What the summary needs beyond Locust's own CSVs (one process: headless runs)."""

    lock = threading.Lock()
    images = 0
    megapixels = 0.0
    job_latencies: list[float] = []
    errors: Counter = Counter()
    status: Counter = Counter()
    requests = 0  # HTTP requests and their failures, counted here: Locust's final CSV can be written
    request_failures = 0  # before the last users finish within --stop-timeout
    started = time.time()

    @classmethod
    def error(cls, kind: str) -> None:
        with cls.lock:
            cls.errors[kind] += 1

    @classmethod
    def done(cls, mp: float, latency: float | None) -> None:
        with cls.lock:
            cls.images += 1
            cls.megapixels += mp
            if latency is not None:
                cls.job_latencies.append(latency)


@events.request.add_listener
def _request(request_type, exception=None, **_):
    if request_type == "JOB":
        return
    with Stats.lock:
        Stats.requests += 1
        Stats.request_failures += exception is not None


@events.test_start.add_listener
def _start(environment, **_):
    Stats.started = time.time()


@events.test_stop.add_listener
def _stop(environment, **_):
    path = os.environ.get("KLEIN_STATS_FILE")
    if not path:
        return
    with Stats.lock:
        data = {
            "started": Stats.started,
            "stopped": time.time(),
            "images": Stats.images,
            "megapixels": Stats.megapixels,
            "job_latencies": Stats.job_latencies,
            "errors": dict(Stats.errors),
            "status": dict(Stats.status),
            "requests": Stats.requests,
            "request_failures": Stats.request_failures,
        }
    with open(path, "w") as f:
        json.dump(data, f)


def _reference(seed: int) -> str:
    from PIL import Image

    rng = random.Random(seed)
    w, h = rng.choice(REFERENCE_SIZES)
    img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(12):
        x, y = rng.randrange(w), rng.randrange(h)
        img.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, min(w, x + w // 4), min(h, y + h // 4)))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


REFERENCES = [_reference(i) for i in range(8)]


def _prompt() -> str:
    if random.random() < REPEAT_SHARE:
        return random.choice(PROMPT_POOL)  # repeated: the TextEmbedder's cache answers
    return f"{random.choice(PROMPT_POOL)}, variation {random.randrange(10**9)}"


def _failed(response) -> bool:
    """Not a 200: counted by kind (429 and 503 apart; 0 is a dropped connection) and marked failed."""
    code = response.status_code
    if code == 200:
        return False
    Stats.error("connection" if code == 0 else f"HTTP {code}")
    response.failure(f"HTTP {code}")
    return True


class KleinUser(HttpUser):
    abstract = True
    wait_time = between(0.05, 0.5)
    model = os.environ.get("KLEIN_LOAD_MODEL")

    def on_start(self):
        if KleinUser.model is None:
            r = self.client.get("/v1/models", headers=HEADERS, name="models")
            KleinUser.model = r.json()["data"][0]["id"] if r.status_code == 200 else "flux-2-klein-4b"


class AsyncUser(KleinUser):
    weight = 3

    @task
    def generate(self):
        w, h = random.choice(SIZES)
        body = {
            "prompt": _prompt(),
            "width": w,
            "height": h,
            "seed": random.randrange(2**31),
            "output_format": "jpeg",
        }
        refs = random.randint(1, 4) if random.random() < EDIT_SHARE else 0
        for k in range(refs):
            body["input_image" if k == 0 else f"input_image_{k + 1}"] = random.choice(REFERENCES)
        kind = f"edit {refs} ref" if refs else "t2i"
        t0 = time.perf_counter()
        with self.client.post(
            f"/v1/{self.model}", json=body, headers=HEADERS, name=f"submit {kind}", catch_response=True
        ) as r:
            if _failed(r):
                return
            job = r.json()
        delay, deadline = 0.2, time.monotonic() + DEADLINE_S
        while True:
            if time.monotonic() > deadline:
                Stats.error("deadline")
                self._job_event(kind, t0, "deadline exceeded")
                return
            time.sleep(delay)
            delay = min(delay * 1.5, 2.0)
            with self.client.get(
                f"/v1/get_result?id={job['id']}", headers=HEADERS, name="poll", catch_response=True
            ) as p:
                if _failed(p):
                    continue
                res = p.json()
            if res["status"] == "Pending":
                continue
            with Stats.lock:
                Stats.status[res["status"]] += 1
            if res["status"] != "Ready":
                Stats.error(res["status"])
                self._job_event(kind, t0, res["status"])
                return
            with self.client.get(res["result"]["sample"], name="fetch image", catch_response=True) as img:
                if img.status_code != 200:
                    Stats.error(f"fetch HTTP {img.status_code}")
                    img.failure(f"HTTP {img.status_code}")
                    return
            latency = time.perf_counter() - t0
            Stats.done(job["output_mp"], latency)
            self._job_event(kind, t0, None)
            return

    def _job_event(self, kind: str, t0: float, error: str | None) -> None:
        self.environment.events.request.fire(
            request_type="JOB",
            name=f"job {kind}",
            response_time=(time.perf_counter() - t0) * 1000,
            response_length=0,
            exception=RuntimeError(error) if error else None,
            context={},
        )


class SyncUser(KleinUser):
    weight = int(os.environ.get("KLEIN_SYNC_SHARE", "1"))

    @task
    def generate(self):
        w, h = random.choice(SIZES)
        body = {
            "model": self.model,
            "prompt": _prompt(),
            "size": f"{w}x{h}",
            "response_format": "url",
            "seed": random.randrange(2**31),
        }
        t0 = time.perf_counter()
        with self.client.post(
            "/v1/images/generations", json=body, headers=HEADERS, name="sync generate", catch_response=True
        ) as r:
            if _failed(r):
                return
            data = r.json()
        with Stats.lock:
            Stats.status["Ready"] += 1
        Stats.done(data["metering"]["output_mp"], time.perf_counter() - t0)


# --- load shapes (KLEIN_SHAPE); without it, -u/-r/-t drive the run ---

PEAK = int(os.environ.get("KLEIN_PEAK_USERS", "16"))
DURATION = float(os.environ.get("KLEIN_DURATION_S", "300"))
SHAPE = os.environ.get("KLEIN_SHAPE", "")


def shape_at(shape: str, t: float, peak: int, duration: float) -> tuple[int, float] | None:
    """(users, spawn rate) at time t, or None when the run is over."""
    if t >= duration:
        return None
    if shape == "ramp":  # 0 -> peak linearly
        return max(1, round(peak * t / duration)), max(1.0, peak / 10)
    if shape == "burst":  # quiet, a burst of peak users for the middle fifth, quiet again
        return (peak, float(peak)) if 0.4 * duration <= t < 0.6 * duration else (1, float(peak))
    if shape == "soak":  # steady at peak
        return peak, max(1.0, peak / 10)
    if shape == "drain":  # peak, then no new users: in-flight jobs finish
        return (peak, max(1.0, peak / 10)) if t < duration / 2 else (0, float(peak))
    raise ValueError(f"KLEIN_SHAPE must be ramp, burst, soak or drain, got {shape!r}")


if SHAPE:

    class KleinShape(LoadTestShape):
        def tick(self):
            return shape_at(SHAPE, self.get_run_time(), PEAK, DURATION)
