"""The stages' fast path from the Serve config: compiled (tracing backend: inductor's C++ build is
covered by the model tests), FP8, warmed up before the replicas report healthy; requests at the
warmed size use the compiled code, others run eagerly; the images are the model's."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.serving.conftest import App, tiny_settings

pytestmark = pytest.mark.slow  # a second served app

WARM = {"compile": True, "backend": "aot_eager", "warmup_sizes": ["64x64"], "warmup_batch_sizes": [1]}


@pytest.fixture(scope="module")
def fast_app(app, s3):
    from ray import serve

    from serve.app import build_app
    from serve.settings import Settings

    settings = tiny_settings(s3.options(bucket="klein-fast"))
    settings["transformer_stage"]["fast"] = WARM | {"quantize": "fp8"}
    settings["text_embedder"]["fast"] = WARM
    settings["codec"]["fast"] = WARM
    serve.run(build_app(Settings(**settings)), name="fast", route_prefix="/fast")
    yield App(app.url + "/fast", "fast")
    serve.delete("fast")


def _stats(fast_app: App, name: str) -> dict:
    return fast_app.handle(name).stats.remote().result()["fast_path"]


def _image(fast_app: App, width: int, height: int) -> np.ndarray:
    r = fast_app.http.post(
        "/v1/flux-2-klein-tiny",
        json={"prompt": "a fox", "width": width, "height": height, "seed": 3, "output_format": "png"},
    )
    assert r.status_code == 200, r.text
    body = fast_app.wait(r.json()["id"])
    assert body["status"] == "Ready", body
    data = fast_app.http.get(body["result"]["sample"]).content
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_stages_compile_quantize_and_warm_up_from_the_config(fast_app):
    from klein import FastPath, GenerationRequest, ModelSource, Pipeline

    transformer = _stats(fast_app, "FlowTransformer")
    assert "FP8 block linears (12)" in transformer["setup"]
    assert "compiled 1 double + 2 single blocks (aot_eager" in transformer["setup"]
    assert "over 64x64x1" in transformer["warm_up"]
    assert "compiled 27 Qwen3 layers" in _stats(fast_app, "TextEmbedder")["setup"]
    assert "VAE decoder: compiled" in _stats(fast_app, "Codec")["setup"]

    served = _image(fast_app, 64, 64)  # the warmed size: compiled code in every stage, no fallback
    for name in ("FlowTransformer", "TextEmbedder", "Codec"):
        stats = _stats(fast_app, name)
        assert (stats["compiled_shapes"], stats["eager_calls"]) == (1, 0), (name, stats)

    local = Pipeline(ModelSource.preset("tiny"), fast=FastPath(quantize="fp8"))
    assert np.array_equal(served, np.asarray(local.generate([GenerationRequest("a fox", 64, 64, seed=3)])[0]))

    _image(fast_app, 96, 64)  # not warmed up: runs eagerly rather than waiting for a compiler
    stats = _stats(fast_app, "FlowTransformer")
    assert (stats["compiled_shapes"], stats["eager_calls"]) == (1, 4)  # four steps, each eager
    # the operators see it (and how long warm-up took) in /metrics (Ray exports every ~10 s)
    want = ("ray_klein_uncompiled_calls_total{", 'stage="FlowTransformer"', "} 4")
    lines = _metric_lines(fast_app, want)
    assert any(all(w in ln for w in want) for ln in lines), [ln for ln in lines if "uncompiled" in ln]
    assert any(ln.startswith("ray_klein_warmup_seconds{") and 'stage="TextEmbedder"' in ln for ln in lines)


def _metric_lines(fast_app: App, want: tuple[str, ...]) -> list[str]:
    import time

    deadline, lines = time.monotonic() + 60, []
    while time.monotonic() < deadline:
        lines = fast_app.http.get("/metrics").text.splitlines()
        if any(all(w in ln for w in want) for ln in lines):
            break
        time.sleep(2)
    return lines
