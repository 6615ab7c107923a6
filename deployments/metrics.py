"""Service metrics, recorded with Ray's metrics API (OpenTelemetry-backed in Ray 2.60) so every
replica on every node is aggregated by Ray's per-node agents, next to Serve's own metrics (queue
lengths, per-deployment latency, batch sizes). The ingress's `/metrics` gathers both from every
node in Prometheus text format. Outside a Ray worker (unit tests) recording is a no-op."""

from __future__ import annotations

import logging
from functools import cache

log = logging.getLogger(__name__)
PREFIXES = ("ray_klein_", "ray_serve_")
LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64]


class _Off:
    def inc(self, *a, **k):
        pass

    def observe(self, *a, **k):
        pass

    def set(self, *a, **k):
        pass


@cache
def _metric(kind: str, name: str, description: str, tags: tuple[str, ...], boundaries: tuple = ()):
    try:
        import ray
        from ray.util import metrics

        if not ray.is_initialized():
            return _Off()
        if kind == "counter":
            return metrics.Counter(name, description=description, tag_keys=tags)
        if kind == "gauge":
            return metrics.Gauge(name, description=description, tag_keys=tags)
        return metrics.Histogram(name, description=description, boundaries=list(boundaries), tag_keys=tags)
    except Exception:  # metrics must never break serving
        log.exception("metric %s unavailable", name)
        return _Off()


def job_finished(model: str, status: str, seconds: float, input_mp: float, output_mp: float) -> None:
    tags = {"model": model, "status": status}
    _metric("counter", "klein_jobs_total", "jobs that reached a terminal status", ("model", "status")).inc(
        1, tags
    )
    _metric(
        "histogram",
        "klein_job_seconds",
        "submission to terminal status",
        ("model", "status"),
        tuple(LATENCY_BUCKETS),
    ).observe(seconds, tags)
    if status == "Ready":
        mp = _metric("counter", "klein_megapixels_total", "billed megapixels", ("model", "direction"))
        mp.inc(output_mp, {"model": model, "direction": "output"})
        if input_mp:
            mp.inc(input_mp, {"model": model, "direction": "input"})


def stage_batch(stage: str, size: int, seconds: float) -> None:
    tags = {"stage": stage}
    _metric("histogram", "klein_batch_size", "requests per batch", ("stage",), tuple(BATCH_BUCKETS)).observe(
        size, tags
    )
    _metric(
        "histogram", "klein_stage_seconds", "batch execution time", ("stage",), tuple(LATENCY_BUCKETS)
    ).observe(seconds, tags)


def lora_adapters(loads: int, hits: int, seconds: float) -> None:
    """A transformer batch's adapters: loaded into the bank (`seconds` for all of them: read, parse,
    slot write) or found resident."""
    n = _metric(
        "counter", "klein_lora_adapters_total", "adapters a batch used, by bank outcome", ("outcome",)
    )
    if hits:
        n.inc(hits, {"outcome": "hit"})
    if loads:
        n.inc(loads, {"outcome": "load"})
        _metric(
            "histogram",
            "klein_lora_load_seconds",
            "loading a batch's missing adapters",
            (),
            tuple(LATENCY_BUCKETS),
        ).observe(seconds)


def warmed_up(stage: str, seconds: float) -> None:
    """A replica's fast-path set-up and warm-up (compilation, loading compiled code) took `seconds`."""
    _metric("gauge", "klein_warmup_seconds", "a replica's last compile and warm-up", ("stage",)).set(
        seconds, {"stage": stage}
    )


def uncompiled_call(stage: str) -> None:
    """A compiled model ran a call eagerly: its input shape was not warmed up (or past max_shapes)."""
    _metric(
        "counter",
        "klein_uncompiled_calls_total",
        "model calls run eagerly because their shape was not warmed up (see fast.warmup_sizes)",
        ("stage",),
    ).inc(1, {"stage": stage})


def gather_prometheus(timeout_s: float = 3.0) -> str:
    """klein and Serve metrics from every alive node's Ray metrics agent, HELP/TYPE deduplicated."""
    import httpx
    import ray

    if not ray.is_initialized():
        return "# klein-serve: not running on Ray; no metrics\n"
    seen_meta: set[str] = set()
    out: list[str] = []
    for node in ray.nodes():
        if not node.get("Alive") or not node.get("MetricsExportPort"):
            continue
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        try:
            text = httpx.get(url, timeout=timeout_s).text
        except httpx.HTTPError as e:
            out.append(f"# node {node['NodeManagerAddress']}: metrics unavailable ({type(e).__name__})")
            continue
        for line in text.splitlines():
            name = line.split(" ", 3)[2] if line.startswith("# ") and line.count(" ") >= 2 else line
            if not name.startswith(PREFIXES):
                continue
            if line.startswith("#"):
                if line in seen_meta:
                    continue
                seen_meta.add(line)
            out.append(line)
    return "\n".join(out) + "\n"
