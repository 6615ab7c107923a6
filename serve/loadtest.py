"""`klein loadtest`: Locust, headless and bounded in time, against a running klein-serve (it starts
nothing else), then a short summary: images/s, megapixels/s, p50/p95/p99 job latency, errors by
kind with 429 and 503 counted apart. Writes Locust's CSVs and HTML report beside summary.json and
summary.md in --out."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"  # shipped in the package


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def summarize(stats: dict, csv_prefix: Path) -> dict:
    elapsed = max(stats["stopped"] - stats["started"], 1e-9)
    lat = stats["job_latencies"]
    errors = dict(stats["errors"])
    requests, failures = stats.get("requests"), stats.get("request_failures")
    stats_csv = Path(f"{csv_prefix}_stats.csv")
    if requests is None and stats_csv.exists():  # an older stats file: Locust's CSV (may miss the tail)
        for row in csv.DictReader(stats_csv.open()):
            if row["Name"] == "Aggregated":
                requests, failures = int(row["Request Count"]), int(row["Failure Count"])
    return {
        "seconds": round(elapsed, 2),
        "images": stats["images"],
        "images_per_s": round(stats["images"] / elapsed, 3),
        "megapixels": round(stats["megapixels"], 6),
        "megapixels_per_s": round(stats["megapixels"] / elapsed, 4),
        "job_latency_s": {
            q: (round(v, 3) if (v := percentile(lat, p)) is not None else None)
            for q, p in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))
        },
        "jobs_by_status": stats["status"],
        "errors_by_kind": errors,
        "http_429": errors.get("HTTP 429", 0),
        "http_503": errors.get("HTTP 503", 0),
        "requests": requests or 0,
        "request_failures": failures or 0,
    }


def markdown(s: dict, host: str) -> str:
    lat = s["job_latency_s"]
    other = {k: v for k, v in s["errors_by_kind"].items() if k not in ("HTTP 429", "HTTP 503")}
    return "\n".join(
        [
            f"# Load test against {host}",
            "",
            f"- duration: {s['seconds']} s; images: {s['images']} ({s['images_per_s']}/s); "
            f"megapixels: {s['megapixels']} ({s['megapixels_per_s']}/s)",
            f"- job latency (submit to image): p50 {lat['p50']} s, p95 {lat['p95']} s, p99 {lat['p99']} s",
            f"- rejected: HTTP 429 x{s['http_429']}, HTTP 503 x{s['http_503']}; other errors: {other or 'none'}",
            f"- jobs by status: {s['jobs_by_status']}; HTTP requests: {s['requests']} ({s['request_failures']} failed)",
            "",
        ]
    )


def run(
    host: str,
    out: Path,
    *,
    users: int,
    spawn_rate: float,
    run_time: str,
    shape: str | None,
    api_key: str | None,
    extra_env: dict | None = None,
    timeout_s: float | None = None,
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **(extra_env or {}), "KLEIN_STATS_FILE": str(out / "klein-stats.json")}
    if api_key:
        env["KLEIN_API_KEY"] = api_key
    if shape:
        env["KLEIN_SHAPE"] = shape
        env.setdefault("KLEIN_PEAK_USERS", str(users))
        env.setdefault("KLEIN_DURATION_S", str(_seconds(run_time)))
    flags = {
        "--host": host,
        "-u": users,
        "-r": spawn_rate,
        "-t": run_time,
        "--stop-timeout": 30,
        "--csv": out / "locust",
        "--html": out / "report.html",
    }
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary"]
    cmd += [str(x) for flag in flags.items() for x in flag]
    limit = timeout_s or _seconds(run_time) + 120
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit)
    (out / "locust.log").write_text(proc.stdout + proc.stderr)
    stats_path = out / "klein-stats.json"
    if not stats_path.exists():
        raise RuntimeError(f"locust wrote no stats (exit {proc.returncode}); see {out / 'locust.log'}")
    summary = summarize(json.loads(stats_path.read_text()), out / "locust")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(markdown(summary, host))
    return summary


def _seconds(run_time: str) -> float:
    """Locust's --run-time: whole seconds, or whole hours, minutes and seconds in that order
    ("90", "30s", "5m", "1h30m"); anything Locust would refuse is refused here, by name."""
    m = re.fullmatch(r"([0-9]+)|(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?", run_time.strip())
    if not run_time.strip() or m is None:
        raise ValueError(f"run time like 90, 30s, 5m or 1h30m (whole numbers), got {run_time!r}")
    if m[1] is not None:
        return float(m[1])
    h, mins, secs = (int(g or 0) for g in m.groups()[1:])
    return float(h * 3600 + mins * 60 + secs)
