"""`klein generate`: real runs write images; bad flags exit 2 with a message naming the flag."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from serve.cli import main


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--width", "100"], "--width: must be a multiple of 16, got 100"),
        (["--height", "4096"], "--height: must be between 64 and 2048, got 4096"),
        (["--width", "abc"], "argument --width: invalid int value: 'abc'"),
        (["--steps", "0"], "--steps: must be between 1 and 50, got 0"),
        (["--guidance", "3"], "--guidance: tiny is guidance-distilled"),
        (["--preset", "tiny-base", "--guidance", "30"], "--guidance: must be between 1 and 20, got 30"),
        (["--seed", "-5"], "--seed: must be between 0 and"),
        (["--preset", "klein-4b"], "--preset: preset 'klein-4b' needs weights"),
        (["--preset", "klein-7b"], "argument --preset: invalid choice: 'klein-7b'"),
        (["--weights", "/nonexistent/w"], "--weights: weights folder /nonexistent/w does not exist"),
        (
            ["--transformer", "/nonexistent/t.safetensors"],
            "--transformer: transformer weights /nonexistent/t.safetensors",
        ),
        (["--vae", "/nonexistent/ae.safetensors"], "--vae: no transformer weights"),  # the flag given
        (["--base-model", "org/base"], "--base-model: only with --model"),
        (["--device", "cuda"], "--device: cuda requested but no CUDA device is available"),
        (["--dtype", "fp16"], "argument --dtype: invalid choice: 'fp16'"),
        (["--quantize", "int4"], "argument --quantize: invalid choice: 'int4'"),
        (["--device", "cpu", "--cuda-graphs"], "--cuda-graphs: needs CUDA; the device is cpu"),
        (["--device", "cpu", "--attention", "cudnn"], "--attention: cudnn needs CUDA; the device is cpu"),
        (["--freeze"], "--freeze: a compiler option; it needs --compile"),
        (["--autotune"], "--autotune: a compiler option; it needs --compile"),
        (
            ["--compile", "--freeze", "--lora", __file__],
            "--freeze: not with --lora: freeze makes the weights",
        ),
    ],
)
def test_bad_flags_name_the_flag(capsys, tmp_path, extra, message):
    if "--device" in extra:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    err = _error(capsys, ["generate", "--prompt", "x", "--out", str(tmp_path / "o.png"), *extra])
    assert message in err


def test_bad_output_and_references(capsys, tmp_path):
    assert "--out: must end in .png, .jpg, .jpeg, .webp" in _error(
        capsys, ["generate", "--prompt", "x", "--out", str(tmp_path / "o.gif")]
    )
    assert "--out: folder" in _error(
        capsys, ["generate", "--prompt", "x", "--out", str(tmp_path / "no" / "o.png")]
    )
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert "--ref: cannot read image" in _error(
        capsys, ["generate", "--prompt", "x", "--ref", str(bad), "--out", str(tmp_path / "o.png")]
    )
    ref = tmp_path / "r.png"
    Image.new("RGB", (64, 64)).save(ref)
    err = _error(
        capsys, ["generate", "--prompt", "x", "--ref", *[str(ref)] * 5, "--out", str(tmp_path / "o.png")]
    )
    assert "--ref: at most 4 reference images, got 5" in err
    small = tmp_path / "s.png"
    Image.new("RGB", (32, 64)).save(small)
    err = _error(capsys, ["generate", "--prompt", "x", "--ref", str(small), "--out", str(tmp_path / "o.png")])
    assert "--ref: image is 32x64; both sides must be at least 64 px" in err


def test_generate_writes_the_image(tmp_path, capsys):
    fox = ["generate", "--prompt", "a fox", "--width", "96", "--height", "64", "--seed", "3", "--out"]
    out = tmp_path / "fox.png"
    assert main([*fox, str(out)]) == 0
    image = Image.open(out)
    assert image.size == (96, 64) and image.format == "PNG"
    assert "seed=3" in capsys.readouterr().out
    # same seed, same image; an edit with a reference, as JPEG and WebP
    out2 = tmp_path / "fox2.png"
    main([*fox, str(out2)])
    assert np.array_equal(np.asarray(Image.open(out2)), np.asarray(image))
    for name in ("edit.jpg", "edit.webp"):
        assert (
            main(["generate", "--prompt", "make it blue", "--ref", str(out), "--out", str(tmp_path / name)])
            == 0
        )
        assert Image.open(tmp_path / name).size == (96, 64)  # the reference's size by default


def test_generate_from_a_diffusers_folder(tiny_dir, tmp_path):
    out = tmp_path / "o.png"
    assert (
        main(
            [
                "generate",
                "--prompt",
                "x",
                "--weights",
                str(tiny_dir),
                "--width",
                "64",
                "--height",
                "64",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert Image.open(out).size == (64, 64)


@pytest.mark.slow  # a fresh interpreter runs the installed script
def test_console_script_runs(tmp_path):
    out = tmp_path / "o.png"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "serve.cli",
            "generate",
            "--prompt",
            "hi",
            "--width",
            "64",
            "--height",
            "64",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("compile_flags", [["--compile"], ["--compile", "--freeze"]], ids=["plain", "frozen"])
def test_generate_compiled_and_fp8(tmp_path, capsys, compile_flags):
    """--compile (inductor, warmed up at the request's size first) and --quantize fp8, in a fresh
    process as a user runs it; the image matches the eager FP8 run within one level. With --freeze
    every component's weights are constants of its compiled code (FP8 ones included)."""
    args = [
        "generate",
        "--prompt",
        "a fox",
        "--width",
        "64",
        "--height",
        "80",
        "--seed",
        "5",
        "--quantize",
        "fp8",
    ]
    r = subprocess.run(
        [sys.executable, "-m", "serve.cli", *args, *compile_flags, "--out", str(tmp_path / "fast.png")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert (
        "transformer: FP8 block linears (12)" in r.stdout
        and "compiled 1 double + 2 single blocks" in r.stdout
    )
    assert "text encoder: compiled 27 Qwen3 layers" in r.stdout and "VAE decoder: compiled" in r.stdout
    assert r.stdout.count("frozen weights") == (3 if "--freeze" in compile_flags else 0)
    assert main([*args, "--out", str(tmp_path / "eager.png")]) == 0
    fast = np.asarray(Image.open(tmp_path / "fast.png")).astype(int)
    eager = np.asarray(Image.open(tmp_path / "eager.png")).astype(int)
    assert np.abs(fast - eager).max() <= 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--random-weights", "--weights", "."], "--random-weights: give --preset, not --weights"),
        (["--port", "70000"], "--port: must be between 1 and 65535, got 70000"),
        (["--config", "/nonexistent.yaml"], "--config: /nonexistent.yaml does not exist"),
        (["--weights", "/nonexistent/w"], "--weights: weights folder /nonexistent/w does not exist"),
        (["--preset", "klein-4b"], "--preset: preset 'klein-4b' needs weights"),
    ],
)
def test_bad_serve_flags_name_the_flag(capsys, monkeypatch, extra, message):
    import serve.run

    def no_ray(config):  # the checks come before Ray starts; getting here is the failure
        raise AssertionError("klein serve went on to start Ray")

    monkeypatch.setattr(serve.run, "_run", no_ray)
    assert message in _error(capsys, ["serve", *extra])


def test_generate_with_lora_adapters(tmp_path, capsys):
    from tests.klein.test_lora import _factors, write

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write(a, "ai-toolkit", _factors(1))
    write(b, "kohya", _factors(2), alpha=2.0)
    base = ["generate", "--prompt", "a fox", "--width", "64", "--height", "64", "--seed", "1", "--out"]
    assert main([*base, str(tmp_path / "plain.png")]) == 0
    assert main([*base, str(tmp_path / "lora.png"), "--lora", f"{a}:0.8", "--lora", str(b)]) == 0
    plain, lora = (np.asarray(Image.open(tmp_path / n)).astype(int) for n in ("plain.png", "lora.png"))
    assert np.abs(plain - lora).max() > 8
    # the image the library (and the served APIs, tests/serving/test_lora_serving.py) make
    from klein import GenerationRequest, ModelSource, Pipeline
    from klein.lora import LoraOptions
    from klein.request import LoraRequest

    loras = (LoraRequest(str(a), 0.8), LoraRequest(str(b), 1.0))
    want = Pipeline(ModelSource.preset("tiny"), lora=LoraOptions()).generate(
        [GenerationRequest("a fox", 64, 64, seed=1, loras=loras)]
    )[0]
    assert np.abs(lora - np.asarray(want).astype(int)).max() <= 1
    assert "--lora: /nope.safetensors is not a file" in _error(
        capsys, [*base, str(tmp_path / "x.png"), "--lora", "/nope.safetensors"]
    )
    assert "--lora: must be between -4 and 4, got 9" in _error(
        capsys, [*base, str(tmp_path / "x.png"), "--lora", f"{a}:9"]
    )
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x80\x04not safetensors")
    err = _error(capsys, [*base, str(tmp_path / "x.png"), "--lora", str(bad)])
    assert "--lora: bad.safetensors:" in err and "not a safetensors file" in err
    bad.write_bytes(b"")
    err = _error(capsys, [*base, str(tmp_path / "x.png"), "--lora", str(bad)])
    assert "--lora: bad.safetensors: not a safetensors file (0 bytes long)" in err


def test_generate_inpainting(tmp_path, capsys):
    """--image SRC --mask MASK [--strength S]: the library's image; the flags named on bad input."""
    rng = np.random.default_rng(3)
    src, mask = tmp_path / "src.png", tmp_path / "mask.png"
    Image.fromarray(rng.integers(0, 256, (11, 13, 3), dtype=np.uint8)).resize((96, 80)).save(src)
    m = Image.new("L", (96, 80), 0)
    m.paste(255, (16, 16, 64, 48))
    m.save(mask)
    out = tmp_path / "o.png"
    args = ["generate", "--prompt", "a red door", "--seed", "2", "--image", str(src), "--mask", str(mask)]
    assert main([*args, "--strength", "0.5", "--out", str(out)]) == 0
    from klein import GenerationRequest, ModelSource, Pipeline

    req = GenerationRequest(
        "a red door", seed=2, references=(Image.open(src),), mask=Image.open(mask), strength=0.5
    )
    want = np.asarray(Pipeline(ModelSource.preset("tiny")).generate([req])[0]).astype(int)
    got = np.asarray(Image.open(out)).astype(int)
    assert got.shape == (80, 96, 3) and np.abs(got - want).max() <= 1
    small = tmp_path / "small.png"
    Image.new("L", (64, 64)).save(small)
    o = str(tmp_path / "x.png")
    assert "--mask: must be the size of the image, 96x80; got 64x64" in _error(
        capsys, ["generate", "--prompt", "x", "--image", str(src), "--mask", str(small), "--out", o]
    )
    assert "--strength: must be more than 0 and at most 1, got 2" in _error(
        capsys, [*args, "--strength", "2", "--out", o]
    )
    assert "--mask: inpainting takes both --image and --mask" in _error(
        capsys, ["generate", "--prompt", "x", "--image", str(src), "--out", o]
    )
    assert "--image: inpainting takes both --image and --mask (--image is missing)" in _error(
        capsys, ["generate", "--prompt", "x", "--mask", str(small), "--out", o]
    )
    assert "--strength: only with --image and --mask" in _error(
        capsys, ["generate", "--prompt", "x", "--strength", "0.5", "--out", o]
    )


def test_verify_names_a_bad_trust_anchor(capsys, tmp_path):
    """A missing file, and one that holds no certificate: a message naming the flag, exit 2."""
    image = tmp_path / "i.png"
    Image.new("RGB", (64, 64)).save(image)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    for anchor, why in [(tmp_path / "none.pem", "does not exist"), (junk, "not a usable PEM")]:
        err = _error(capsys, ["verify", str(image), "--trust-anchor", str(anchor)])
        assert "--trust-anchor:" in err and why in err, err


@pytest.mark.parametrize(
    "variable, value, message",
    [
        (
            "KLEIN_INGRESS__MAX_JOBS_IN_FLIGHT",
            "abc",
            "KLEIN_INGRESS__MAX_JOBS_IN_FLIGHT: Input should be a valid",
        ),
        ("KLEIN_STORAGE__BACKEND", "gcs", "KLEIN_STORAGE__BACKEND: Input should be 'local' or 's3'"),
    ],
)
def test_a_bad_variable_is_named_not_the_config(capsys, monkeypatch, variable, value, message):
    import serve.run

    def no_ray(config):
        raise AssertionError("klein serve went on to start Ray")

    monkeypatch.setattr(serve.run, "_run", no_ray)
    monkeypatch.setenv(variable, value)
    err = _error(capsys, ["serve"])
    assert message in err and value not in err.replace(variable, ""), err  # the value is not echoed


def test_klein_settings_lists_every_setting_with_its_meaning(capsys, monkeypatch):
    """`klein settings` comes from the settings models: every setting is there with a description,
    every KLEIN_* name the docs and manifests use is a setting (or the load generator's), and a
    listed name is the variable the settings read."""
    import re
    from pathlib import Path

    from serve.settings import LOAD_VARIABLES, Settings, reference

    rows = reference()
    assert len(rows) > 150 and all(meaning for _, _, meaning in rows), [v for v, _, m in rows if not m]
    names = {variable for variable, _, _ in rows}
    root = Path(__file__).resolve().parents[1]
    docs = [root / "README.md", root / "k8s" / "README.md", *sorted((root / "k8s").rglob("*.yaml"))]
    used = {m for doc in docs for m in re.findall(r"\bKLEIN_[A-Z0-9_]*[A-Z0-9]", doc.read_text())}
    assert used - names - LOAD_VARIABLES == set()
    assert main(["settings", "CODEC__JPEG"]) == 0
    assert capsys.readouterr().out.startswith("KLEIN_CODEC__JPEG_QUALITY=95\n")
    assert main(["settings", "--markdown", "API_KEYS"]) == 0
    assert "| `KLEIN_API_KEYS` | `(secret)` |" in capsys.readouterr().out
    monkeypatch.setenv("KLEIN_CODEC__JPEG_QUALITY", "80")
    monkeypatch.setenv("KLEIN_INGRESS__DEPLOYMENT__AUTOSCALING__MAX_REPLICAS", "3")
    settings = Settings()
    assert settings.codec.jpeg_quality == 80 and settings.ingress.deployment.autoscaling.max_replicas == 3
