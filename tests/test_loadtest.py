"""Load shapes and summary arithmetic (no service needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serve.loadtest import LOCUSTFILE, _seconds, markdown, percentile, summarize

_PROBE = """
import json, runpy, sys
shape_at = runpy.run_path(sys.argv[1])["shape_at"]
calls = json.loads(sys.argv[2])
out = []
for args in calls:
    try:
        out.append(shape_at(*args))
    except ValueError as e:
        out.append("ValueError: " + str(e))
print(json.dumps(out))
"""


def _shapes(*calls):
    # Importing locust monkey-patches the whole process with gevent, which deadlocks the Ray threads other
    # tests leave running in this process; the locustfile is exercised in a child interpreter instead.
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(LOCUSTFILE), json.dumps(calls)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


_LOAD = """
import json, sys
from locust.util.load_locustfile import load_locustfile
users, shapes = load_locustfile(sys.argv[1])
print(json.dumps([sorted(users), [type(s).__name__ for s in shapes]]))
"""


def test_the_checkout_locustfile_is_the_packaged_one(tmp_path: Path):
    # loadtest/locustfile.py (plain Locust from a checkout) re-exports serve/locustfile.py (what an installed
    # `klein loadtest` runs): Locust's own loader finds the same users and load shape in both.
    assert LOCUSTFILE.parent.name == "serve"
    env = {**os.environ, "KLEIN_SHAPE": "ramp"}
    found = []
    for path in (LOCUSTFILE, Path(__file__).resolve().parents[1] / "loadtest" / "locustfile.py"):
        proc = subprocess.run([sys.executable, "-c", _LOAD, str(path)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        found.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert found[0] == found[1] == [["AsyncUser", "SyncUser"], ["KleinShape"]]


def test_shapes():
    ramp = _shapes(*[("ramp", t, 10, 100) for t in (0, 50, 99)])
    assert [r[0] for r in ramp] == [1, 5, 10]
    burst, burst_peak, soak, drain, drained = _shapes(
        ("burst", 10, 10, 100),
        ("burst", 50, 10, 100),
        ("soak", 80, 10, 100),
        ("drain", 20, 10, 100),
        ("drain", 70, 10, 100),
    )
    assert (burst[0], burst_peak[0], soak[0], drain[0], drained[0]) == (1, 10, 10, 10, 0)
    ends = _shapes(*[(s, 100, 10, 100) for s in ("ramp", "burst", "soak", "drain")])
    assert ends == [None] * 4
    (bad,) = _shapes(("zigzag", 1, 10, 100))
    assert bad.startswith("ValueError") and "KLEIN_SHAPE" in bad


def test_summary(tmp_path: Path):
    stats = {"started": 100.0, "stopped": 110.0, "images": 20, "megapixels": 20.97152,
             "job_latencies": [float(i) for i in range(1, 21)], "errors": {"HTTP 429": 3, "HTTP 503": 1, "Error": 2},
             "status": {"Ready": 20, "Error": 2}}  # fmt: skip
    s = summarize(stats, tmp_path / "none")
    assert s["images_per_s"] == 2.0 and s["megapixels_per_s"] == pytest.approx(2.0972, abs=1e-4)
    assert s["job_latency_s"] == {"p50": 11.0, "p95": 19.0, "p99": 20.0}
    assert (s["http_429"], s["http_503"]) == (3, 1)
    assert "HTTP 429 x3" in markdown(s, "http://h") and "'Error': 2" in markdown(s, "http://h")
    assert percentile([], 0.5) is None
    assert json.dumps(s)


def test_run_time_parsing():
    assert (
        _seconds("30s") == 30 and _seconds("5m") == 300 and _seconds("1h30m") == 5400 and _seconds("45") == 45
    )
    for what_locust_refuses in ("soon", "1.5m", "10.5", "30s5m", "5m1h", ""):
        with pytest.raises(ValueError):
            _seconds(what_locust_refuses)


def test_cli_flags(capsys, tmp_path):
    from serve.cli import main

    a_file = tmp_path / "afile"
    a_file.write_text("x")
    for argv, msg in (
        (["loadtest", "--host", "http://x", "--run-time", "1.5m"], "--run-time:"),
        (["loadtest", "--host", "http://x", "--spawn-rate", "nan"], "--spawn-rate:"),
        (["loadtest", "--host", "http://x", "--spawn-rate", "inf"], "--spawn-rate:"),
        (["loadtest", "--host", "http://x", "--sizes", "abc"], "--sizes:"),
        (["loadtest", "--host", "http://x", "--out", str(a_file)], "--out:"),
        (["loadtest", "--host", "localhost:8000"], "--host: must be an http(s) URL"),
        (["loadtest", "--host", "http://x", "--users", "0"], "--users: must be at least 1"),
        (["loadtest", "--host", "http://x", "--run-time", "soon"], "--run-time:"),
        (["loadtest", "--host", "http://x", "--shape", "zigzag"], "argument --shape: invalid choice"),
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err
