"""Served DAG vs the in-process Pipeline, and the DAG with batching on vs off (tiny preset, CPU).

    python benchmarks/serve_throughput.py [--size 64] [--concurrency 1 16] [--seconds 20]
        [--modes inprocess batched unbatched noop model] [--threads 1] [--inprocess-threads 2]
        [--preset tiny] [--device cpu|cuda] [--spans FILE] [--cpu] [--rounds 1]

On a GPU: `--preset klein-4b --device cuda --size 1024` serves the real architecture with random
weights (no checkpoint needed), the three stages sharing the GPU.

For each mode: a closed loop of `concurrency` clients, each sending one request after another for
`--seconds`; requests/s and p50/p95 latency. The served modes use real HTTP against the OpenAI-
compatible sync endpoint (b64_json: the response carries the image, so the latency covers the
whole pipeline including the upload to storage). "unbatched" caps every stage at one request per
batch. The in-process mode calls Pipeline.generate from `concurrency` threads. "noop" is the
same Serve topology with stages that do nothing: the floor of Ray Serve's own per-request cost.
`--rounds N` runs the modes N times over, alternating (this machine's speed drifts by more than
the effects measured), then prints each figure's median and spread, and the batching and overhead
figures taken round by round. `--cpu` adds, for each served point, the CPU time per request that each process spent (stages,
ingress, proxy, Ray's own processes, the load generator): where a saturated machine's cores go.
"model" times the stages' model work alone (embed, denoise, decode per image, batch 1 and 8, on
the stages' `--threads`); with it the run ends with two bounds (`report_bounds`): the most that
batching can gain given the CPU the rest of the service spends per request (with `--cpu`), and the
least overhead over in-process that Serve's bare hops and the stages' threads allow (with
inprocess and noop).

Threads: each served stage uses `--threads` intra-op threads (1, as serve/configs/local-cpu.yaml:
three stages share the cores) and its replicas run with OMP_WAIT_POLICY=PASSIVE, as `klein serve`
sets; the in-process baseline gets `--inprocess-threads` (all cores) and OpenMP's default policy,
its fastest setting here (PASSIVE costs small ops a thread wake-up each).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import threading
import time

import httpx

# (mode, concurrency) -> {round: (requests/s, p50 ms)}: what `--rounds` summarizes
RESULTS: dict[tuple[str, int], dict[int, tuple[float, float]]] = {}
ROUND = [0]  # the round under way


def summarize(name: str, c: int, latencies: list[float], seconds: float) -> None:
    if not latencies:
        print(f"{name:>10} c={c:<3} no successful requests", flush=True)
        return
    lat = sorted(latencies)
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3  # noqa: E731
    RESULTS.setdefault((name, c), {})[ROUND[0]] = (len(lat) / seconds, p(0.5))
    print(f"{name:>10} c={c:<3} {len(lat) / seconds:7.2f} req/s   p50 {p(0.5):7.1f} ms   p95 {p(0.95):7.1f} ms"
          f"   ({len(lat)} requests)", flush=True)  # fmt: skip


def source(preset: str):
    """The preset's own weights where it has them (tiny), else its architecture with random ones."""
    from klein import ModelSource

    if ModelSource.preset_spec(preset).random_seed is not None:
        return ModelSource.preset(preset)
    return ModelSource.random_weights(preset)


def run_inprocess(args, size: int, concurrency: list[int], seconds: float, threads: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from klein import GenerationRequest, Pipeline

    # One thread does all torch work, as in a stage replica (a second thread entering OpenMP regions
    # gets its own team, which halves the speed on 2 cores); clients queue for it.
    worker = ThreadPoolExecutor(1)
    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    pipe = worker.submit(Pipeline, source(args.preset), args.device, dtype).result()
    for _ in range(3):
        worker.submit(pipe.generate, [GenerationRequest("warm up", size, size, 0)]).result()

    def client(i: int, stop: float, latencies: list[float]) -> None:
        n = 0
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            req = GenerationRequest(f"prompt {i} {n}", size, size, i * 1000 + n)
            worker.submit(pipe.generate, [req]).result()
            latencies.append(time.perf_counter() - t0)
            n += 1

    for c in concurrency:
        latencies: list[float] = []
        stop = time.monotonic() + seconds
        threads = [threading.Thread(target=client, args=(i, stop, latencies)) for i in range(c)]
        t0 = time.monotonic()
        [t.start() for t in threads]
        [t.join() for t in threads]
        summarize("inprocess", c, latencies, time.monotonic() - t0)
    worker.shutdown()
    pipe = None  # noqa: F841 (frees the model before the served modes load theirs)
    if args.device == "cuda":
        torch.cuda.empty_cache()  # the served stages need the memory next


# per image, ms, at the stages' thread count: {"batch 1": {...}, "batch 8": {...}} (mode "model")
MODEL: dict[str, dict[str, float]] = {}


def run_model(args, size: int, threads: int, n: int = 20) -> None:
    """The stages' model work alone, in process, on `threads` threads as a served stage has: text
    embedding, denoising and VAE decode, per image at batch 1 and batch 8 (medians of `n` calls;
    over rounds, each part's fastest, which makes the bounds the most generous to the served DAG).
    What no serving can go below: `report_bounds` sets the served figures against it."""
    import statistics
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from klein import GenerationRequest, Pipeline
    from klein.request import validate

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    sync = torch.cuda.synchronize if args.device == "cuda" else lambda: None

    def timed(fn) -> float:
        fn()
        times = []
        for _ in range(n):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def per_image(pipe: Pipeline, batch: int) -> dict[str, float]:
        # as served: validated requests at the preset's defaults (steps, guidance), no references
        requests = [
            validate(pipe.spec, GenerationRequest(f"prompt {i}", size, size, seed=i)) for i in range(batch)
        ]
        prompts, refs = [r.prompt for r in requests], [pipe.encode_references(())] * batch
        ctx = pipe.embed(prompts)
        latents = pipe.denoise(requests, ctx, refs)
        parts = {"embed": timed(lambda: pipe.embed(prompts)),
                 "denoise": timed(lambda: pipe.denoise(requests, ctx, refs)),
                 "decode": timed(lambda: pipe.decode(latents))}  # fmt: skip
        out = {k: v / batch * 1e3 for k, v in parts.items()}
        return {**out, "total": sum(out.values())}

    def measure() -> None:
        torch.set_num_threads(threads)  # on this thread, as a stage sets it on its worker
        pipe = Pipeline(source(args.preset), args.device, dtype)
        for batch in (1, 8):
            ms = per_image(pipe, batch)
            best = MODEL.setdefault(f"batch {batch}", ms)  # over rounds: each part's fastest
            for part in ("embed", "denoise", "decode"):
                best[part] = min(best[part], ms[part])
            best["total"] = best["embed"] + best["denoise"] + best["decode"]
            cells = ", ".join(f"{k} {v:.1f}" for k, v in ms.items())
            print(f"{'model':>10} batch {batch}: ms per image on {threads} thread(s): {cells}", flush=True)

    worker = ThreadPoolExecutor(1)
    worker.submit(measure).result()
    worker.shutdown()


async def load(url: str, size: int, c: int, seconds: float) -> tuple[list[float], float, int]:
    latencies: list[float] = []
    errors = 0
    stop = time.monotonic() + seconds
    async with httpx.AsyncClient(
        base_url=url, timeout=120, limits=httpx.Limits(max_connections=c + 4)
    ) as http:

        async def client(i: int) -> None:
            nonlocal errors
            n = 0
            while time.monotonic() < stop:
                body = {"prompt": f"prompt {i} {n}", "size": f"{size}x{size}", "seed": i * 1000 + n,
                        "response_format": "b64_json"}  # fmt: skip
                t0 = time.perf_counter()
                r = await http.post("/v1/images/generations", json=body)
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1
                n += 1

        t0 = time.monotonic()
        await asyncio.gather(*(client(i) for i in range(c)))
        return latencies, time.monotonic() - t0, errors


def _process_group(proc) -> str | None:
    """A process's role in the served DAG, from its name and Ray title; None outside Ray."""
    try:
        name, title = proc.name(), " ".join(proc.cmdline())
    except Exception:
        return None
    if proc.pid == os.getpid():
        return "load generator (this script)"
    if name in ("raylet", "gcs_server"):
        return "raylet + GCS"
    if title.startswith("ray::ServeReplica:"):
        return title.split(":")[4].split(".")[0].split()[0]  # ray::ServeReplica:<app>:<Deployment>...
    if title.startswith("ray::ProxyActor"):
        return "HTTP proxy"
    if title.startswith("ray::ServeController"):
        return "Serve controller"
    if title.startswith("ray::") or "site-packages/ray/" in title:
        return "other Ray processes"
    return None


def cpu_snapshot() -> dict[tuple[int, float], tuple[str, float]]:
    """CPU seconds (user + system) so far of every process in the DAG, by (pid, start time)."""
    import psutil

    out = {}
    for proc in psutil.process_iter():
        group = _process_group(proc)
        if group is None:
            continue
        try:
            t = proc.cpu_times()
            out[(proc.pid, proc.create_time())] = (group, t.user + t.system)
        except Exception:
            continue
    return out


# (mode, concurrency) -> {round: {process group: CPU ms per request}} (`--cpu`)
CPU: dict[tuple[str, int], dict[int, dict[str, float]]] = {}
STAGES = ("TextEmbedder", "FlowTransformer", "Codec")
NOOP_STAGES = ("Noop0", "Noop1", "Noop2")  # the same hops doing nothing (mode "noop")
MODES = ("inprocess", "batched", "unbatched", "noop", "model")


def cpu_report(mode: str, c: int, before: dict, after: dict, requests: int, elapsed: float) -> None:
    groups: dict[str, float] = {}
    for key, (group, cpu) in after.items():
        groups[group] = groups.get(group, 0.0) + cpu - before.get(key, (group, 0.0))[1]
    total = sum(groups.values())
    print(
        f"{'':>10} CPU: {total / elapsed:.2f} cores busy, {total / max(requests, 1) * 1e3:.1f} ms per request:"
    )
    for group, cpu in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"{'':>12} {cpu / max(requests, 1) * 1e3:6.1f} ms  {group}")
    if requests:
        CPU.setdefault((mode, c), {})[ROUND[0]] = {g: cpu / requests * 1e3 for g, cpu in groups.items()}


def run_served(args, mode: str, size: int, concurrency: list[int], seconds: float, threads: int) -> None:
    import ray
    from ray import serve

    from klein import ModelSource
    from serve.app import build_app
    from serve.settings import Settings

    batched = mode == "batched"
    gpus = 0.3 if args.device == "cuda" else 0  # three stages share one GPU
    stage = {"deployment": {"num_replicas": 1, "ray_actor": {"num_cpus": 0.25, "num_gpus": gpus},
                            "max_ongoing_requests": 64},
             "placement": {"torch_threads": threads, "device": args.device}}  # fmt: skip
    one = (size // 16) ** 2
    settings = Settings(
        preset=args.preset,
        random_weights=ModelSource.preset_spec(args.preset).random_seed is None,
        storage={"root": tempfile.mkdtemp(prefix="klein-bench-")},
        text_embedder={**stage, "max_batch_size": 16 if batched else 1},
        transformer_stage={
            **stage,
            "max_batch_tokens": 16 * one if batched else one,
        },
        codec={**stage, "max_batch_size": 16 if batched else 1},
        ingress={
            "deployment": {"num_replicas": 1, "ray_actor": {"num_cpus": 0.25}, "max_ongoing_requests": 512},
            "max_jobs_in_flight": 1024,  # one anonymous caller: its per-key cap would answer 429
        },
        telemetry={"traces": "file", "file": spans}
        if (spans := args.spans and f"{args.spans}.{mode}")
        else {},
    )
    port = 8700 + (1 if batched else 2)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(settings), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    asyncio.run(load(url, size, 2, 3.0))  # warm up every stage
    for c in concurrency:
        since = time.time_ns()
        before = cpu_snapshot() if args.cpu else {}
        latencies, elapsed, errors = asyncio.run(load(url, size, c, seconds))
        summarize(mode, c, latencies, elapsed)
        if args.cpu:
            cpu_report(mode, c, before, cpu_snapshot(), len(latencies), elapsed)
        if spans:
            breakdown(spans, since, latencies)
        if errors:
            print(f"{'':>10} {errors} errors")
        for name in STAGES:
            sizes = STATS_LOOP.run_until_complete(stage_stats(name))["batch_sizes"]
            print(
                f"{'':>10} {name} mean batch {sum(sizes) / max(len(sizes), 1):.2f} (last {len(sizes)} batches)"
            )
    serve.delete("bench")
    serve.shutdown()
    ray.shutdown()


STATS_LOOP = asyncio.new_event_loop()


async def stage_stats(name: str) -> dict:
    """From inside one event loop: handles work there whether or not their router runs in a loop of
    its own (with RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0 a handle is bound to the loop it is first
    used in, and fails outside one)."""
    from ray import serve

    return await serve.get_deployment_handle(name, app_name="bench").stats.remote()


# A job's spans in the order a text-to-image request passes them; "job" is the ingress's own.
PATH = ["embed", "denoise", "decode", "postprocess", "upload"]


def breakdown(path: str, since_ns: int, latencies: list[float]) -> None:
    """Medians of where a request's time goes, from the spans the DAG wrote (`--spans`): each
    stage's own interval, the hops between them, and what lies outside the ingress's job span
    (HTTP, proxy, validation, the answer). Tracing adds its own cost to what it measures."""
    import itertools
    import json
    import statistics

    traces: dict[str, dict[str, dict]] = {}
    with open(path) as f:
        for line in f:
            span = json.loads(line)
            traces.setdefault(span["trace_id"], {})[span["name"]] = span
    parts: dict[str, list[float]] = {}
    for spans in traces.values():
        job = spans.get("job")
        if job is None or job["start"] < since_ns or any(name not in spans for name in PATH):
            continue
        marks = [("ingress -> embed", job["start"])]
        for a, b in zip(PATH, PATH[1:] + [None], strict=True):
            marks += [(a, spans[a]["start"]), (f"{a} -> {b or 'ingress, records'}", spans[a]["end"])]
        marks.append(("end", job["end"]))
        for (name, t0), (_, t1) in itertools.pairwise(marks):
            parts.setdefault(name, []).append((t1 - t0) / 1e6)
        parts.setdefault("job span", []).append((job["end"] - job["start"]) / 1e6)
    if not parts:
        print(f"{'':>10} no complete traces in {path}")
        return
    outside = statistics.median(latencies) * 1e3 - statistics.median(parts["job span"])
    cells = [f"{name} {statistics.median(v):.1f}" for name, v in parts.items()]
    print(f"{'':>10} ms, medians of {len(parts['job span'])} jobs: " + ", ".join(cells)
          + f"; outside the job span (HTTP, proxy, submit, answer) {outside:.1f}")  # fmt: skip


def run_noop(concurrency: list[int], seconds: float, cpu: bool = False) -> None:
    """The same topology (proxy -> ingress -> three chained, batched stages) doing nothing: the
    floor that Ray Serve's own per-request cost sets on this machine."""
    from fastapi import FastAPI
    from ray import serve

    @serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.25})
    class Noop:
        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0)
        async def f(self, xs):
            return xs

    api = FastAPI()

    @serve.deployment(max_ongoing_requests=512, ray_actor_options={"num_cpus": 0.25})
    @serve.ingress(api)
    class NoopIngress:
        def __init__(self, a, b, c):
            self.a, self.b, self.c = a, b, c

        @api.post("/v1/images/generations")
        async def generate(self):
            return await self.c.f.remote(self.b.f.remote(self.a.f.remote(1)))

    serve.start(http_options={"host": "127.0.0.1", "port": 8703})
    stages = [Noop.options(name=name).bind() for name in NOOP_STAGES]
    serve.run(NoopIngress.bind(*stages), name="noop", route_prefix="/")
    asyncio.run(load("http://127.0.0.1:8703", 64, 2, 2.0))
    for c in concurrency:
        before = cpu_snapshot() if cpu else {}
        latencies, elapsed, _ = asyncio.run(load("http://127.0.0.1:8703", 64, c, seconds))
        summarize("noop", c, latencies, elapsed)
        if cpu:
            cpu_report("noop", c, before, cpu_snapshot(), len(latencies), elapsed)
    serve.delete("noop")
    serve.shutdown()


def report_rounds(rounds: int) -> None:
    """Medians over the rounds (modes alternate within each round, so a drifting machine moves every
    mode alike), with each figure's spread; ratios are taken round by round, side by side, and
    listed in round order."""
    import statistics

    print(f"\nmedians of {rounds} rounds (min-max):")
    for (mode, c), runs in RESULTS.items():
        rps, p50 = [r for r, _ in runs.values()], [q for _, q in runs.values()]
        print(f"{mode:>10} c={c:<3} {statistics.median(rps):7.2f} req/s ({min(rps):.2f}-{max(rps):.2f})"
              f"   p50 {statistics.median(p50):7.1f} ms ({min(p50):.1f}-{max(p50):.1f})   ({len(runs)} rounds)")  # fmt: skip

    def paired(label: str, a: dict, b: dict, f) -> None:
        values = [f(a[r], b[r]) for r in sorted(a.keys() & b.keys())]
        if values:
            print(
                f"{label}: {statistics.median(values):.2f} (rounds: "
                + ", ".join(f"{v:.2f}" for v in values)
                + ")"
            )

    batched = sorted(c for m, c in RESULTS if m == "batched")
    for c in batched:
        on = RESULTS[("batched", c)]
        paired(f"batching on/off c={c} (x)", on, RESULTS.get(("unbatched", c), {}), lambda x, y: x[0] / y[0])
        if c == batched[0]:  # overhead at low load (saturated, the difference is queueing)
            paired(f"DAG p50 over in-process c={c} (ms)", on, RESULTS.get(("inprocess", c), {}),
                   lambda x, y: x[1] - y[1])  # fmt: skip


def report_bounds() -> None:
    """What the model work alone allows (mode "model"), set against what was served.

    Batching ceiling (`--cpu`, batched and unbatched at one concurrency): on a saturated machine
    throughput is the inverse of CPU per request. Batching can at best bring the stages' CPU per
    request down to the model work per image at its best batch plus Serve's bare cost of a call to
    each stage (the no-op stages' CPU in the same round, when noop ran with `--cpu`); the rest of the
    service (ingress, proxy, Ray, load generator) costs what it cost with batching on (measured in
    the same round; unbatched where that is missing). The ceiling is unbatched CPU per request over
    that sum. Overhead floor (inprocess, noop): the model work per image at batch 1
    on the stages' threads, less the in-process pipeline's p50, plus Serve's bare hops (noop p50):
    what a DAG doing nothing but its model work and Serve's own hops would add over in-process."""
    import statistics

    if not MODEL:
        return
    best = min(per_image["total"] for per_image in MODEL.values())
    for c in sorted(c for m, c in CPU if m == "unbatched" and c > 1):  # c=1 leaves cores idle
        off, on, noop = CPU[("unbatched", c)], CPU.get(("batched", c), {}), CPU.get(("noop", c), {})
        for r in sorted(off):
            total = sum(off[r].values())
            stages = sum(off[r].get(s, 0.0) for s in STAGES)
            calls = sum(noop.get(r, {}).get(s, 0.0) for s in NOOP_STAGES)
            batched = on.get(r, off[r])  # the rest of the service as batching left it, when measured
            rest = sum(cpu for group, cpu in batched.items() if group not in STAGES)
            ceiling = total / (rest + best + calls)
            got = ""
            if r in on and r in RESULTS.get(("batched", c), {}) and r in RESULTS.get(("unbatched", c), {}):
                got = f"; measured {RESULTS[('batched', c)][r][0] / RESULTS[('unbatched', c)][r][0]:.2f}x"
            print(f"batching ceiling c={c} round {r + 1}: {ceiling:.2f}x (unbatched {total:.1f} ms CPU per "
                  f"request, {stages:.1f} of it in the stages; batched, the rest {rest:.1f} and the stages' "
                  f"floor: model work {best:.1f} at best + Serve's bare calls {calls:.1f}){got}")  # fmt: skip
    lows = [c for m, c in RESULTS if m == "inprocess"]
    c = min(lows) if lows else None
    if c is not None and ("noop", c) in RESULTS and "batch 1" in MODEL:
        inproc = statistics.median(q for _, q in RESULTS[("inprocess", c)].values())
        noop = statistics.median(q for _, q in RESULTS[("noop", c)].values())
        model = MODEL["batch 1"]["total"]
        print(f"overhead floor c={c}: {model - inproc + noop:.1f} ms over in-process (model work on the "
              f"stages' threads {model:.1f} - in-process p50 {inproc:.1f} + Serve's bare hops {noop:.1f})")  # fmt: skip


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument(
        "--modes", nargs="+", default=["inprocess", "batched", "unbatched", "noop"], choices=MODES
    )
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per served stage")
    ap.add_argument("--inprocess-threads", type=int, default=os.cpu_count())
    ap.add_argument("--preset", default="tiny", help="real presets run with random weights")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument(
        "--spans", metavar="FILE", help="trace the served modes to FILE.<mode>, print where time goes"
    )
    ap.add_argument("--cpu", action="store_true", help="CPU time per request of each process (served modes)")
    ap.add_argument("--rounds", type=int, default=1, help="run every mode this many times, alternating")
    args = ap.parse_args()
    for flag in ("rounds", "threads", "inprocess_threads", "size"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1")
    if min(args.concurrency) < 1:
        ap.error("--concurrency must be at least 1")
    if args.seconds <= 0:
        ap.error("--seconds must be more than 0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    print(f"{args.preset} on {args.device}, {args.size}x{args.size}, {args.seconds:g} s per point, {os.cpu_count()} CPUs, "
          f"{args.threads} thread(s) per stage, {args.inprocess_threads} in-process")  # fmt: skip
    for ROUND[0], mode in [(r, m) for r in range(args.rounds) for m in args.modes]:
        if mode == "inprocess":
            run_inprocess(args, args.size, args.concurrency, args.seconds, args.inprocess_threads)
            continue
        if mode == "model":
            run_model(args, args.size, args.threads)
            continue
        import ray

        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the replicas' setting under `klein serve`

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 object_store_memory=512 * 2**20)  # fmt: skip
        if mode == "noop":
            run_noop(args.concurrency, args.seconds, args.cpu)
            ray.shutdown()
        else:
            run_served(args, mode, args.size, args.concurrency, args.seconds, args.threads)
    if args.rounds > 1:
        report_rounds(args.rounds)
    report_bounds()


if __name__ == "__main__":
    main()
