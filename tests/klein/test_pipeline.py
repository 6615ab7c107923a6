"""The single-process pipeline: batch invariance, grouping, request validation, tiny presets."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from klein import GenerationRequest, InvalidRequest, ModelSource, Pipeline
from klein.config import TINY, TINY_BASE
from klein.request import MAX_SEED, validate


@pytest.fixture(scope="module")
def tiny():
    return Pipeline(ModelSource.preset("tiny"))


def _img(w, h, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def test_an_image_alone_equals_the_same_request_in_a_batch(tiny):
    reqs = [GenerationRequest(f"prompt {i}", 64, 64, seed=100 + i) for i in range(4)]
    batched = tiny.generate(reqs)
    for r, b in zip(reqs, batched, strict=True):
        alone = tiny.generate([r])[0]
        assert np.array_equal(np.asarray(alone), np.asarray(b))
    assert not np.array_equal(np.asarray(batched[0]), np.asarray(batched[1]))


def test_batch_invariance_of_latents_with_references(tiny):
    refs = (_img(64, 80, 1),)
    reqs = [
        validate(tiny.spec, GenerationRequest(p, 64, 64, seed=s, references=refs))
        for p, s in (("a", 1), ("b", 2))
    ]
    enc = [tiny.encode_references(r.references) for r in reqs]
    both = tiny.generate_latents(reqs, enc)
    for i in range(2):
        alone = tiny.generate_latents([reqs[i]], [enc[i]])
        torch.testing.assert_close(alone[0], both[i], atol=1e-6, rtol=0)


def test_mixed_sizes_come_back_in_order(tiny):
    reqs = [
        GenerationRequest("a", 64, 96, seed=1),
        GenerationRequest("b", 128, 64, seed=2),
        GenerationRequest("c", 64, 96, seed=3, references=(_img(80, 64),)),
        GenerationRequest("d", 64, 96, seed=4),
    ]
    images = tiny.generate(reqs)
    assert [im.size for im in images] == [(64, 96), (128, 64), (64, 96), (64, 96)]
    assert np.array_equal(np.asarray(images[3]), np.asarray(tiny.generate([reqs[3]])[0]))


def test_seed_determines_the_image(tiny):
    a, b, c = tiny.generate([GenerationRequest("x", 64, 64, seed=s) for s in (5, 5, 6)])
    assert np.array_equal(np.asarray(a), np.asarray(b)) and not np.array_equal(np.asarray(a), np.asarray(c))


def test_default_size_follows_the_first_reference():
    req = validate(TINY, GenerationRequest("x", references=(_img(200, 130), _img(64, 64))))
    assert (req.width, req.height) == (192, 128)
    assert validate(TINY, GenerationRequest("x")).width == TINY.default_size
    big = validate(TINY, GenerationRequest("x", references=(_img(1600, 1200),)))
    assert (big.width, big.height) == (1168, 880)  # 1 MP cap, then a multiple of 16


def test_references_pixels_after_server_side_resize(tiny):
    refs = tiny.encode_references((_img(100, 70), _img(64, 64, mode="RGBA")))
    assert refs.pixels == 96 * 64 + 64 * 64
    assert refs.shapes == ((4, 6), (4, 4))


@pytest.mark.parametrize(
    "kwargs, field, message",
    [
        ({"width": 100}, "width", "multiple of 16, got 100"),
        ({"height": 48}, "height", "between 64 and 2048, got 48"),
        ({"width": 4096}, "width", "between 64 and 2048, got 4096"),
        ({"seed": -1}, "seed", f"between 0 and {MAX_SEED}"),
        ({"seed": MAX_SEED + 1}, "seed", "between 0"),
        ({"steps": 0}, "steps", "between 1 and 50, got 0"),
        ({"steps": 51}, "steps", "between 1 and 50"),
        ({"guidance": 3.0}, "guidance", "guidance-distilled"),
        ({"prompt": "x" * 10_001}, "prompt", "at most 10000 characters"),
        (
            {"references": tuple(_img(64, 64) for _ in range(5))},
            "references",
            "at most 4 reference images, got 5",
        ),
        ({"references": (_img(64, 64), _img(63, 200))}, "references[1]", "at least 64 px"),
        ({"references": (_img(600, 70),)}, "references[0]", "aspect ratio must be at most 8:1"),
    ],
)
def test_validation_names_the_field_and_bound(kwargs, field, message):
    req = GenerationRequest(**{"prompt": "x", "width": 64, "height": 64, **kwargs})
    with pytest.raises(InvalidRequest, match=message) as e:
        validate(TINY, req)
    assert e.value.field == field


def test_base_guidance_bounds_and_defaults():
    assert validate(TINY_BASE, GenerationRequest("x", 64, 64)).guidance == 4.0
    with pytest.raises(InvalidRequest, match="between 1 and 20, got 25"):
        validate(TINY_BASE, GenerationRequest("x", 64, 64, guidance=25.0))
    with pytest.raises(InvalidRequest, match="width x height must be at most 0.008192 MP, got 128x128"):
        validate(replace(TINY, max_pixels=64 * 128), GenerationRequest("x", 128, 128))


def test_tiny_weights_are_identical_in_every_process():
    code = (
        "from klein import ModelSource; import hashlib;"
        "s = ModelSource.preset('tiny');"
        "h = hashlib.sha256();"
        "[h.update(t.numpy().tobytes()) for m in (s.load_transformer(), s.load_vae()) for t in m.state_dict().values()];"
        "print(h.hexdigest())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    import hashlib

    s = ModelSource.preset("tiny")
    h = hashlib.sha256()
    for m in (s.load_transformer(), s.load_vae()):
        for t in m.state_dict().values():
            h.update(t.numpy().tobytes())
    assert out == h.hexdigest()


def test_presets_without_weights_are_refused():
    with pytest.raises(ValueError, match="needs weights"):
        ModelSource.preset("klein-4b")
    with pytest.raises(ValueError, match="unknown preset 'klein-5b'"):
        ModelSource.preset("klein-5b")


def test_import_klein_stays_light():
    code = "import sys, klein; print(sorted(m for m in ('ray', 'fastapi', 'boto3', 'diffusers', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_vae_attention_runs_on_a_fused_kernel():
    """The VAE's mid-block attention gives SDPA contiguous tensors, so the fused (flash) kernel runs
    it: a strided view falls back to the math kernel, which holds the whole (HW)^2 score matrix
    (12 GB for a 1536^2 decode on the CPU). With only flash allowed, a strided input is refused."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    vae = ModelSource.preset("tiny").load_vae()
    z = torch.randn(1, 4 * vae.config.z_channels, 8, 8)
    with torch.inference_mode():
        everything = vae.decode(z)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            flash = vae.decode(z)
            encoded = vae.encode(flash.clamp(-1, 1))
    assert torch.equal(flash, everything) and encoded.shape == z.shape
