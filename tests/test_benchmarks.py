"""The serving benchmark's bounds: the model-work timing and the arithmetic set against it."""

from __future__ import annotations

import argparse

import pytest

from benchmarks import serve_throughput as bench


@pytest.fixture(autouse=True)
def fresh_tables(monkeypatch):
    for table in ("MODEL", "CPU", "RESULTS"):
        monkeypatch.setattr(bench, table, {})


def test_model_work_is_timed_per_image_at_batch_1_and_8():
    args = argparse.Namespace(preset="tiny", device="cpu")
    bench.run_model(args, 64, threads=1, n=1)
    assert set(bench.MODEL) == {"batch 1", "batch 8"}
    for per_image in bench.MODEL.values():
        parts = [per_image[k] for k in ("embed", "denoise", "decode")]
        assert all(p > 0 for p in parts)
        assert per_image["total"] == pytest.approx(sum(parts))


def test_model_work_over_rounds_keeps_each_parts_fastest():
    bench.MODEL["batch 1"] = {"embed": 1e-3, "denoise": 1e9, "decode": 1e-3, "total": 1e9}
    bench.run_model(argparse.Namespace(preset="tiny", device="cpu"), 64, threads=1, n=1)
    first = bench.MODEL["batch 1"]
    assert first["embed"] == first["decode"] == 1e-3
    assert 0 < first["denoise"] < 1e9
    assert first["total"] == pytest.approx(first["denoise"] + 2e-3)


def test_bounds_from_the_served_figures(capsys):
    bench.MODEL.update({"batch 1": {"total": 50.0}, "batch 8": {"total": 40.0}})
    rest = {"Ingress": 20.0, "HTTP proxy": 8.0, "other Ray processes": 2.0}
    bench.CPU[("unbatched", 32)] = {0: {"FlowTransformer": 50.0, "Codec": 20.0, "TextEmbedder": 10.0, **rest}}
    bench.CPU[("batched", 32)] = {0: {"FlowTransformer": 40.0, "Codec": 15.0, "TextEmbedder": 8.0,
                                      **rest, "Ingress": 15.0}}  # fmt: skip
    bench.CPU[("noop", 32)] = {0: {"Noop0": 2.0, "Noop1": 2.0, "Noop2": 1.0, "NoopIngress": 9.0}}
    bench.CPU[("unbatched", 1)] = {0: {"FlowTransformer": 50.0, **rest}}  # c=1: cores idle, no ceiling
    bench.RESULTS.update({
        ("batched", 32): {0: (15.0, 2000.0)}, ("unbatched", 32): {0: (12.0, 2500.0)},
        ("inprocess", 1): {0: (25.0, 35.0)}, ("inprocess", 32): {0: (26.0, 1200.0)},
        ("noop", 1): {0: (50.0, 20.0)},
    })  # fmt: skip
    bench.report_bounds()
    out = capsys.readouterr().out.splitlines()
    # unbatched 110 ms of CPU per request; batched, the rest cost 25, the stages at best 40 + 5
    assert out[0].startswith("batching ceiling c=32 round 1: 1.57x")
    assert out[0].endswith("measured 1.25x")
    # 50 ms of model work on the stages' threads - 35 in process + 20 of Serve's hops
    assert out[1].startswith("overhead floor c=1: 35.0 ms")
    assert len(out) == 2


def test_no_bounds_without_the_model_work(capsys):
    bench.RESULTS[("noop", 1)] = {0: (50.0, 20.0)}
    bench.report_bounds()
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--modes", "modle"], "--modes"),
        (["--rounds", "0"], "--rounds must be at least 1"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--concurrency", "1", "0"], "--concurrency must be at least 1"),
        (["--seconds", "0"], "--seconds must be more than 0"),
    ],
)
def test_bad_flags_are_refused_by_name(monkeypatch, capsys, argv, message):
    monkeypatch.setattr("sys.argv", ["serve_throughput.py", *argv])
    with pytest.raises(SystemExit) as exit_:
        bench.main()
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_the_gpu_script_runs_every_variant_on_the_cpu(tmp_path):
    """benchmarks/gpu_fast_path.py rehearsed on the tiny preset, so the one GPU call cannot fail on a
    typo: every variant runs and writes its line (CUDA-only ones say so), the figures are sane."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "benchmarks" / "gpu_fast_path.py"), "--device", "cpu", "--preset", "tiny",
           "--size", "256", "--batch", "1", "2", "--backend", "aot_eager", "--deadline", "400",
           "--estimate-scale", "0.1", "--reps", "1", "--reps-b1", "2", "--out", str(tmp_path)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=500)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    failed = [(row["variant"], row.get("error")) for row in rows if "error" in row]
    assert not failed, failed
    skipped = {row["variant"]: row["skipped"] for row in rows if "skipped" in row}
    assert set(skipped) == {"V6", "V9", "E4"} and all("CUDA" in why for why in skipped.values())
    timed = {(row["variant"], row.get("B")) for row in rows if "ms_per_image" in row or "p50_ms" in row}
    for variant in ("V1", "V2", "V3", "V4", "V5", "V8", "V10"):
        assert {(variant, 1), (variant, 2)} <= timed, variant
    assert {("E1", None), ("E2", None), ("E3", None)} <= timed
    by = {(row["variant"], row.get("B")): row for row in rows}
    assert all(row["finite"] for row in rows if "finite" in row)
    assert by[("V3", 1)]["rel_err"] < 1e-6  # a tracing backend: the same arithmetic
    for variant in ("V3", "V4", "V10"):  # compiled models: every timed call ran the compiled code
        assert by[(variant, 1)]["ran_eagerly"] == by[(variant, 2)]["ran_eagerly"] == 0, variant
    assert 0 < by[("V4", 1)]["rel_err"] < 5e-2 and by[("V5", 1)]["rel_err"] < 3e-2
    assert {"A1", "A2", "P0", "P1", "V7", "V1-profile", "V3-profile"} <= {row["variant"] for row in rows}
    assert (tmp_path / "summary.md").read_text().count("\nV1 | ") == 2
    assert (tmp_path / "env.json").exists() and (tmp_path / "profile_compiled.txt").exists()


def test_the_gpu_script_reruns_only_the_variants_named(tmp_path):
    """`--only` (a second GPU call re-running what failed in the first): the variants named and the
    environment, nothing else; a group whose variants are not named is not even set up."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "benchmarks" / "gpu_fast_path.py"), "--device", "cpu", "--preset", "tiny",
           "--size", "128", "--batch", "1", "--backend", "aot_eager", "--reps-b1", "1", "--out", str(tmp_path),
           "--only", "P1", "V2"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {row["variant"] for row in rows} == {"P0", "P1", "V1", "V1-profile", "V2"}, (
        rows
    )  # V1: the reference
    assert not [row for row in rows if "error" in row]
    bad = subprocess.run([*cmd[:-3], "--only", "V11"], capture_output=True, text=True, cwd=root, timeout=300)
    assert bad.returncode == 2 and "--only: invalid choice: 'V11'" in bad.stderr


def test_transformer_forward_times_every_variant_compiled(monkeypatch, capsys):
    """benchmarks/transformer_forward.py rehearsed on tiny shapes with a tracing backend: every
    variant is timed against diffusers, and the compiled ones ran compiled (the script exits when a
    timed call ran eagerly, as bf16 runs did when klein was given a bf16 timestep it was not warmed
    up for)."""
    import torch._dynamo

    from benchmarks import transformer_forward

    # (--autotune is inductor's)
    argv = ["transformer_forward.py", "--hidden", "64", "--heads", "2", "--double", "1", "--single", "1",
            "--img", "64", "--txt", "16", "--repeats", "1", "--dtype", "fp32", "bf16", "--compile", "--freeze",
            "--fp8", "--backend", "aot_eager"]  # fmt: skip
    monkeypatch.setattr("sys.argv", argv)
    torch._dynamo.reset()
    transformer_forward.main()
    out = capsys.readouterr().out
    for dtype in ("fp32", "bf16"):
        section = out.split(f"{dtype}: diffusers ")[1]
        for variant in ("ours", "ours compiled", "ours compiled freeze", "ours fp8", "ours compiled fp8"):
            assert f"  {variant}: " in section and "ratio to diffusers" in section, (dtype, variant)
    torch._dynamo.reset()


def test_lora_benchmark_runs_every_variant_and_checks_each_request(monkeypatch, capsys):
    """benchmarks/lora_batching.py on the tiny transformer, one round: the four variants timed,
    each request bit-exact with itself alone (fp32), klein's adapter path set against its first version."""
    from benchmarks import lora_batching

    argv = [
        "lora_batching.py",
        "--preset",
        "tiny",
        "--img",
        "64",
        "--txt",
        "32",
        "--repeats",
        "1",
        "--loads",
        "2",
    ]
    monkeypatch.setattr("sys.argv", argv)
    lora_batching.main()
    out = capsys.readouterr().out
    for variant in ("none", "same", "distinct", "mixed"):
        assert f"  {variant:<9} bit-exact (4 requests)" in out, out
        assert f"| {variant} |" in out
    assert "mixed's adapter-free request equals the no-adapter batch's: bit-exact" in out
    assert "max |klein - first version|" in out


def test_job_events_preview_cost_runs(capsys):
    """benchmarks/job_events.py's in-process part: a preview's cost against a step, tiny, 64x64."""
    from benchmarks import job_events

    job_events.run_cost("tiny", [64], repeats=2)
    out = capsys.readouterr().out
    assert "64x64: step" in out and "of a step" in out and "map fit: R^2" in out


def test_inpaint_batching_runs(capsys, monkeypatch):
    """benchmarks/inpaint_batching.py at toy size: the four ways timed and the mixed batch exact."""
    from benchmarks import inpaint_batching

    monkeypatch.setattr(
        "sys.argv", ["inpaint_batching", "--size", "64", "--batch", "2", "--steps", "2", "--repeats", "1"]
    )
    inpaint_batching.main()
    out = capsys.readouterr().out
    assert all(f"{name}:" in out for name in ("same", "mixed", "plain", "solo"))
    assert "mixed batch images == their solo runs: True" in out
