"""Load shapes and summary arithmetic (no service needed)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from serve.loadtest import LOCUSTFILE, _seconds, markdown, percentile, summarize


def _locustfile():
    spec = importlib.util.spec_from_file_location("klein_locustfile", LOCUSTFILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shapes():
    shape_at = _locustfile().shape_at
    assert [shape_at("ramp", t, 10, 100)[0] for t in (0, 50, 99)] == [1, 5, 10]
    assert shape_at("burst", 10, 10, 100)[0] == 1 and shape_at("burst", 50, 10, 100)[0] == 10
    assert shape_at("soak", 80, 10, 100)[0] == 10
    assert shape_at("drain", 20, 10, 100)[0] == 10 and shape_at("drain", 70, 10, 100)[0] == 0
    assert all(shape_at(s, 100, 10, 100) is None for s in ("ramp", "burst", "soak", "drain"))
    with pytest.raises(ValueError, match="KLEIN_SHAPE"):
        shape_at("zigzag", 1, 10, 100)


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
    with pytest.raises(ValueError):
        _seconds("soon")


def test_cli_flags(capsys):
    from serve.cli import main

    for argv, msg in (
        (["loadtest", "--host", "localhost:8000"], "--host: must be an http(s) URL"),
        (["loadtest", "--host", "http://x", "--users", "0"], "--users: must be at least 1"),
        (["loadtest", "--host", "http://x", "--run-time", "soon"], "--run-time:"),
        (["loadtest", "--host", "http://x", "--shape", "zigzag"], "argument --shape: invalid choice"),
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err
