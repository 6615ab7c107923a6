"""What watching a job costs and gives: event latencies, the stream's storage reads, preview cost
against a step, and throughput with streamed previews on vs off (tiny preset, CPU by default).

    python benchmarks/job_events.py [--size 256] [--steps N] [--jobs 10] [--concurrency 16]
        [--seconds 20] [--rounds 2] [--preset tiny] [--parts latency cost throughput]

latency: one job at a time on the served DAG (real HTTP): submit with `preview: true`, read
GET /v1/jobs/{id}/events, and time the first event, the first progress event, the first preview
and the result after the submission was answered; beside them, the time to Ready seen by polling
get_result every 50 ms on an identical job. Meanwhile an EventFeed over the same storage, polling
as an ingress does, counts the storage reads the stream costs per job.

cost: in process, the work a preview adds: on the transformer's worker thread (x0 for one row and
its copy to the CPU) and in the Codec (the linear map and the JPEG), against one denoising step of
the same batch, at each size.

throughput: `concurrency` closed-loop clients on the OpenAI route, plain (b64_json) vs
`stream: true, partial_images: 3` (the stream read to its completed event), alternating `rounds`
times: requests/s and p50 latency of each.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import tempfile
import time

import httpx
import torch


def served(preset: str, root: str, port: int):
    import ray  # noqa: F401  (serve.start starts it)
    from ray import serve

    from klein import ModelSource
    from serve.app import build_app
    from serve.settings import Settings

    stage = {"deployment": {"num_replicas": 1, "ray_actor": {"num_cpus": 0.25}, "max_ongoing_requests": 64},
             "placement": {"torch_threads": 1}}  # fmt: skip
    settings = Settings(
        preset=preset,
        random_weights=ModelSource.preset_spec(preset).random_seed is None,
        storage={"root": root},
        text_embedder={**stage, "max_batch_size": 16},
        transformer_stage={**stage, "max_batch_tokens": 32768},
        codec={**stage, "max_batch_size": 16},
        ingress={
            "deployment": {"num_replicas": 1, "ray_actor": {"num_cpus": 0.25}, "max_ongoing_requests": 512},
            "max_jobs_in_flight": 1024,
        },
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(settings), name="events", route_prefix="/")
    return f"http://127.0.0.1:{port}", settings.model_id or _model_id(settings)


def _model_id(settings) -> str:
    from serve.settings import api_model_id

    return api_model_id(settings.model_source().spec.name)


class CountingStorage:
    """A storage's reads, counted (calls and bytes)."""

    def __init__(self, storage):
        self.storage, self.gets, self.bytes = storage, 0, 0

    async def get(self, key, **kw):
        self.gets += 1
        data = await self.storage.get(key, **kw)
        self.bytes += len(data or b"")
        return data

    async def get_versioned(self, key, **kw):
        self.gets += 1
        found = await self.storage.get_versioned(key, **kw)
        self.bytes += len(found[0]) if found else 0
        return found


async def _count_reads(root: str, job_id: str, poll_s: float) -> tuple[int, int, int]:
    """An ingress's EventFeed over the service's storage, to the job's end: (polls, reads, bytes)."""
    from deployments.jobs.progress import EventFeed
    from deployments.jobs.store import JobStore
    from deployments.storage import StorageOptions, open_storage

    counting = CountingStorage(open_storage(StorageOptions(root=root)))
    store = JobStore(counting)
    job = None
    while job is None:
        job = await store.get(job_id)
    feed, polls = EventFeed(store, job), 0
    while not feed.ended:
        await feed.poll()
        polls += 1
        await asyncio.sleep(poll_s)
    return polls, counting.gets, counting.bytes


def _body(size: int, seed: int, steps: int | None) -> dict:
    body = {"prompt": f"a lighthouse {seed}", "width": size, "height": size, "seed": seed}
    return body | ({"steps": steps} if steps else {})


async def _watch_one(http: httpx.AsyncClient, model: str, size: int, steps, seed: int, root: str) -> dict:
    body = _body(size, seed, steps) | {"preview": True}
    t0 = time.perf_counter()
    job_id = (await http.post(f"/v1/{model}", json=body)).raise_for_status().json()["id"]
    submitted = time.perf_counter() - t0
    counting = asyncio.ensure_future(_count_reads(root, job_id, 0.25))
    times: dict[str, float] = {}
    async with http.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                kind = line[7:]
                times.setdefault("first event", time.perf_counter() - t0)
                times.setdefault(f"first {kind}", time.perf_counter() - t0)
    polls, reads, nbytes = await counting
    return {"submit": submitted, **times, "polls": polls, "reads": reads, "read bytes": nbytes}


async def _poll_one(http: httpx.AsyncClient, model: str, size: int, steps, seed: int) -> float:
    body = _body(size, seed, steps)
    t0 = time.perf_counter()
    job_id = (await http.post(f"/v1/{model}", json=body)).raise_for_status().json()["id"]
    while (await http.get("/v1/get_result", params={"id": job_id})).json()["status"] == "Pending":
        await asyncio.sleep(0.05)
    return time.perf_counter() - t0


def run_latency(url: str, model: str, root: str, size: int, steps: int | None, jobs: int) -> None:
    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            await _poll_one(http, model, size, steps, 0)  # warm up
            watched, polled = [], []
            for i in range(jobs):
                watched.append(await _watch_one(http, model, size, steps, 100 + i, root))
                polled.append(await _poll_one(http, model, size, steps, 200 + i))
            return watched, polled

    watched, polled = asyncio.run(go())
    what = f"{size}x{size}, {steps or 'default'} steps"
    print(f"\nlatency, {jobs} jobs one at a time, {what}, seconds after submitting (median, min-max):")
    for name in ("submit", "first event", "first status", "first progress", "first preview", "first result"):
        values = [w[name] for w in watched if name in w]
        if values:
            print(f"  {name:>15}  {statistics.median(values):.3f}  ({min(values):.3f}-{max(values):.3f})"
                  f"  [{len(values)}/{jobs} jobs]")  # fmt: skip
    print(
        f"  {'Ready (polling)':>15}  {statistics.median(polled):.3f}  ({min(polled):.3f}-{max(polled):.3f})"
    )
    for name in ("polls", "reads", "read bytes"):
        values = [w[name] for w in watched]
        print(
            f"  stream cost per job: {name} {statistics.median(values):.0f} (median; {min(values)}-{max(values)})"
        )


def run_cost(preset: str, sizes: list[int], repeats: int = 20) -> None:
    """A preview's work against one step, in process, on this machine's threads."""
    from PIL import Image

    from klein import ModelSource
    from klein.preview import LatentPreview, predicted_x0
    from klein.sampler import sample

    source = ModelSource.preset(preset)
    model = source.load_transformer("cpu", torch.float32)
    vae = source.load_vae("cpu", torch.float32)
    preview = LatentPreview.fit_to(vae)
    ctx = torch.randn(1, 32, model.config.context_in_dim)
    print(
        f"\npreview cost vs one step ({preset}, CPU, {torch.get_num_threads()} threads, median of {repeats}):"
    )
    seen = {}

    def hook(step, x_t, v, sigma):
        seen["args"] = (x_t, v, sigma)

    for size in sizes:
        steps = sample(model, ctx, [0], size, size, repeats + 1, hook=hook)
        with torch.inference_mode():
            next(steps)  # warm up
            step_times = []
            for _ in range(repeats):
                t = time.perf_counter()
                next(steps)
                step_times.append(time.perf_counter() - t)
            x_t, v, sigma = seen["args"]
            hook_times, render_times = [], []
            for _ in range(repeats):
                t = time.perf_counter()
                x0 = predicted_x0(x_t[:1], v[:1], sigma).to(x_t.dtype).cpu()
                hook_times.append(time.perf_counter() - t)
                t = time.perf_counter()
                pixels = preview.render(x0[0], size // 16, size // 16)
                Image.fromarray(pixels.numpy()).save(io.BytesIO(), "JPEG", quality=80)
                render_times.append(time.perf_counter() - t)
        step, hook_s, render = (statistics.median(x) for x in (step_times, hook_times, render_times))
        print(f"  {size}x{size}: step {step * 1e3:.2f} ms; preview on the transformer {hook_s * 1e3:.3f} ms"
              f" ({hook_s / step:.2%} of a step), in the Codec {render * 1e3:.3f} ms ({render / step:.2%})")  # fmt: skip
    print(f"  map fit: R^2 {preview.fit.r2:.3f} on held-out images ({preview.fit.tokens} tokens)")


async def _client_loop(
    http: httpx.AsyncClient, size: int, stop: float, i: int, stream: bool, out: list
) -> None:
    n = 0
    while time.monotonic() < stop:
        body = {
            "prompt": f"p {i} {n}",
            "size": f"{size}x{size}",
            "seed": i * 1000 + n,
            "response_format": "b64_json",
        }
        if stream:
            body |= {"stream": True, "partial_images": 3}
        t0 = time.perf_counter()
        if stream:
            async with http.stream("POST", "/v1/images/generations", json=body) as r:
                last = ""
                async for line in r.aiter_lines():
                    if line.startswith("event: "):
                        last = line
                ok = r.status_code == 200 and last.endswith(".completed")
        else:
            r = await http.post("/v1/images/generations", json=body)
            ok = r.status_code == 200
        if ok:
            out.append(time.perf_counter() - t0)
        n += 1


def run_throughput(url: str, size: int, c: int, seconds: float, rounds: int) -> None:
    async def load(stream: bool) -> tuple[list[float], float]:
        latencies: list[float] = []
        stop = time.monotonic() + seconds
        async with httpx.AsyncClient(
            base_url=url, timeout=120, limits=httpx.Limits(max_connections=c + 4)
        ) as http:
            t0 = time.monotonic()
            await asyncio.gather(*(_client_loop(http, size, stop, i, stream, latencies) for i in range(c)))
            return latencies, time.monotonic() - t0

    print(
        f"\nthroughput at c={c}, {size}x{size}, {seconds:g} s per point, {rounds} rounds (plain, streamed):"
    )
    rates: dict[str, list[float]] = {"plain": [], "streamed": []}
    for _ in range(rounds):
        for name, stream in (("plain", False), ("streamed", True)):
            latencies, elapsed = asyncio.run(load(stream))
            rate, p50 = (
                len(latencies) / elapsed,
                statistics.median(latencies) * 1e3 if latencies else float("nan"),
            )
            print(
                f"  {name:>9}: {rate:6.2f} req/s  p50 {p50:7.1f} ms  ({len(latencies)} requests)", flush=True
            )
            rates[name].append(rate)
    ratio = statistics.median(s / p for s, p in zip(rates["streamed"], rates["plain"], strict=True))
    print(f"  streamed / plain requests/s, median of rounds: {ratio:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, help="denoising steps of the latency jobs (default: the model's)")
    p.add_argument("--jobs", type=int, default=10)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cost-sizes", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--parts", nargs="+", default=["latency", "cost", "throughput"])
    args = p.parse_args()
    if "cost" in args.parts:
        run_cost(args.preset, args.cost_sizes)
    if {"latency", "throughput"} & set(args.parts):
        from ray import serve

        root = tempfile.mkdtemp(prefix="klein-events-")
        url, model = served(args.preset, root, 8731)
        try:
            if "latency" in args.parts:
                run_latency(url, model, root, args.size, args.steps, args.jobs)
            if "throughput" in args.parts:
                run_throughput(url, args.size, args.concurrency, args.seconds, args.rounds)
        finally:
            serve.shutdown()
    print(json.dumps({"args": vars(args)}))


if __name__ == "__main__":
    main()
