"""Safety and provenance through the Codec and the Ingress (in-process DAG): a tiny random NSFW
classifier whose head flags one known generated image and not another, the watermark round trip,
and C2PA manifests checked against a test CA."""

from __future__ import annotations

import asyncio
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from deployments.jobs.records import Status
from deployments.stages.postprocess import ProvenanceOptions, SafetyOptions
from klein import GenerationRequest, ModelSource, Pipeline
from klein.provenance import BFL_WATERMARK_BITS, decode_watermark, hamming, parse_bits, read_manifest
from klein.safety import THRESHOLDS, NSFWClassifier, PromptFilter, threshold
from tests.certs import make_test_pki
from tests.serving.inprocess import build, submit_job

PROMPT, SIZE = "a quiet harbour", 256


@pytest.fixture(scope="module")
def images():
    """A (seed 1) and B (seed 2): what the DAG generates for PROMPT at 256x256."""
    pipe = Pipeline(ModelSource.preset("tiny"))
    return pipe.generate([GenerationRequest(PROMPT, SIZE, SIZE, seed=s) for s in (1, 2)])


@pytest.fixture(scope="module")
def classifier_dir(images, tmp_path_factory):
    """A random ViT whose head scores image A 0.9 and image B 0.1 for "nsfw"."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=64, patch_size=16, num_labels=2, id2label={0: "normal", 1: "nsfw"},
                       label2id={"normal": 0, "nsfw": 1})  # fmt: skip
    model = ViTForImageClassification(config).eval()
    processor = ViTImageProcessor(size={"height": 64, "width": 64})
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        f = model.vit(pixel_values=pixels).last_hidden_state[:, 0]  # what the head sees
        d, mid = f[0] - f[1], (f[0] + f[1]) / 2
        k = math.log(0.9 / 0.1) / float(d @ (f[0] - mid))
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
        model.classifier.weight[1] = k * d
        model.classifier.bias[1] = -k * float(d @ mid)
    folder = tmp_path_factory.mktemp("nsfw") / "classifier"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_test_pki(tmp_path_factory.mktemp("pki"))


def test_classifier_scores_and_tolerances(classifier_dir, images):
    clf = NSFWClassifier(classifier_dir)
    a, b = clf.scores(images)
    assert a == pytest.approx(0.9, abs=1e-3) and b == pytest.approx(0.1, abs=1e-3)
    assert [clf.flagged(images, t) for t in range(6)] == [[True, False]] * 3 + [[False, False]] * 3
    assert threshold(2) == 0.85 and list(THRESHOLDS) == sorted(THRESHOLDS)
    with pytest.raises(ValueError, match="between 0 and 5"):
        threshold(6)


def test_prompt_filter():
    f = PromptFilter(["Forbidden Thing", "bad"])
    assert f.match("a FORBIDDEN thing here") == "forbidden thing"
    assert f.match("badge of honour") is None and f.match("so bad!") == "bad"
    assert PromptFilter().match("anything") is None


def _ingress(tmp_path, classifier_dir, pki, **safety):
    return build(
        tmp_path / "data",
        safety=SafetyOptions(classifier=classifier_dir, **safety),
        provenance=ProvenanceOptions(c2pa_cert_chain=pki["chain"], c2pa_key=pki["key"]),
    )


async def _job(ingress, seed=1, tolerance=2, images=(), prompt=PROMPT, fmt="png"):
    job, _ = await submit_job(ingress, prompt=prompt, width=SIZE, height=SIZE, seed=seed, steps=None, guidance=None,
                                  safety_tolerance=tolerance, output_format=fmt, images=list(images))  # fmt: skip
    if not job.status.terminal:
        await ingress.service.run(job)
    return await ingress.service.store.get(job.id)


def test_output_moderation_stores_and_bills_nothing(tmp_path, classifier_dir, pki):
    ingress = _ingress(tmp_path, classifier_dir, pki)

    async def go():
        flagged = await _job(ingress, seed=1, tolerance=2)
        assert flagged.status is Status.CONTENT_MODERATED and flagged.result is None
        assert await ingress.service.storage.get(flagged.output_key) is None
        assert await ingress.service.storage.list("usage") == []
        assert (await _job(ingress, seed=1, tolerance=3)).status is Status.READY  # 0.9 < 0.92
        assert (await _job(ingress, seed=2, tolerance=0)).status is Status.READY  # 0.1 < 0.2
        assert len(await ingress.service.storage.list("usage")) == 2

    asyncio.run(go())


def test_input_moderation_before_generation(tmp_path, classifier_dir, pki, images):
    ingress = _ingress(tmp_path, classifier_dir, pki)
    buf = io.BytesIO()
    images[0].save(buf, "PNG")
    ref = [("input_image", buf.getvalue(), images[0])]

    async def go():
        denoised = len(ingress.service.stages.transformer.obj.batch_sizes)
        job = await _job(ingress, tolerance=2, images=ref)
        assert job.status is Status.REQUEST_MODERATED
        assert len(ingress.service.stages.transformer.obj.batch_sizes) == denoised  # no generation ran
        assert await ingress.service.storage.list(f"inputs/{job.id}") == []  # its inputs are not kept
        edited = await _job(ingress, tolerance=4, images=ref)
        assert edited.status is Status.READY
        data = await ingress.service.storage.get(edited.result.key)
        state, manifest = read_manifest(data, "image/png")
        actions = [a["action"] for a in manifest["assertions"][0]["data"]["actions"]]
        assert (
            state == "Valid"
            and actions == ["c2pa.opened", "c2pa.edited"]
            and len(manifest["ingredients"]) == 1
        )

    asyncio.run(go())


def test_prompt_terms_are_request_moderated(tmp_path, classifier_dir, pki):
    ingress = _ingress(tmp_path, classifier_dir, pki, prompt_terms=["forbidden thing"])

    async def go():
        job = await _job(ingress, prompt="a forbidden thing at dusk")
        assert job.status is Status.REQUEST_MODERATED and job.attempts == 0
        assert await ingress.service.store.pending() == []

    asyncio.run(go())


@pytest.mark.parametrize("fmt, mime", [("png", "image/png"), ("jpeg", "image/jpeg"), ("webp", "image/webp")])
def test_watermark_and_c2pa_on_generated_images(tmp_path, classifier_dir, pki, fmt, mime):
    ingress = _ingress(tmp_path, classifier_dir, pki)

    async def go():
        job = await _job(ingress, seed=2, tolerance=2, fmt=fmt)
        assert job.status is Status.READY
        return await ingress.service.storage.get(job.result.key)

    data = asyncio.run(go())
    state, manifest = read_manifest(data, mime)
    assert state == "Valid"  # signed, untrusted without an anchor
    assert read_manifest(data, mime, pki["ca"].read_bytes())[0] == "Trusted"
    action = manifest["assertions"][0]["data"]["actions"][0]
    assert action["action"] == "c2pa.created" and action["digitalSourceType"].endswith(
        "trainedAlgorithmicMedia"
    )
    assert action["parameters"]["model"] == "flux-2-klein-tiny"
    assert manifest["claim_generator_info"][0]["name"] == "klein-serve"
    if fmt == "png":  # lossless: the watermark survives exactly or within 2 bits
        bits = decode_watermark(Image.open(io.BytesIO(data)))
        assert hamming(bits, parse_bits(BFL_WATERMARK_BITS)) <= 2
        tampered = bytearray(data)
        idat = tampered.find(b"IDAT")
        tampered[idat + 40] ^= 0xFF  # change pixels inside the signed data
        assert read_manifest(bytes(tampered), mime, pki["ca"].read_bytes())[0] == "Invalid"


def test_watermark_absent_from_unmarked_images(images):
    bits = decode_watermark(images[0])
    assert hamming(bits, parse_bits(BFL_WATERMARK_BITS)) > 8
    assert decode_watermark(Image.new("RGB", (64, 64))) is None  # too small to carry one


def test_klein_verify(tmp_path, classifier_dir, pki, capsys):
    from serve.cli import main

    ingress = _ingress(tmp_path, classifier_dir, pki)

    async def go():
        job = await _job(ingress, seed=2)
        return await ingress.service.storage.get(job.result.key)

    path = tmp_path / "out.png"
    path.write_bytes(asyncio.run(go()))
    assert main(["verify", str(path), "--trust-anchor", str(pki["ca"])]) == 0
    out = capsys.readouterr().out
    assert "C2PA: Trusted" in out and "c2pa.created" in out and "flux-2-klein-tiny" in out
    assert "watermark: present" in out
    plain = tmp_path / "plain.png"
    Image.fromarray(np.zeros((300, 300, 3), np.uint8) + 128).save(plain)
    assert main(["verify", str(plain)]) == 1
    out = capsys.readouterr().out
    assert "C2PA: no manifest" in out and "watermark: absent" in out


def test_previews_pass_the_classifier_too(tmp_path, classifier_dir, pki):
    """A preview is classified at its request's tolerance like the image: flagged, none is stored."""
    from deployments.stages.payloads import PreviewParams

    ingress = _ingress(tmp_path, classifier_dir, pki)
    codec = ingress.service.stages.codec.obj
    asked = []

    def flagged(images, params):
        asked.append([(im.size, p.safety_tolerance) for im, p in zip(images, params, strict=True)])
        return [p.safety_tolerance < 3 for p in params]

    codec.post.flagged = flagged
    tokens = torch.randn(4 * 4, codec.previews_map.channels)
    strict, lenient = (PreviewParams(f"j{t}", f"previews/j{t}/1-1.jpeg", (4, 4), t) for t in (2, 4))

    async def go():
        assert await codec.previews([tokens, tokens], [strict, lenient]) == [False, True]
        assert await ingress.service.storage.get(strict.key) is None
        assert Image.open(io.BytesIO(await ingress.service.storage.get(lenient.key))).size == (8, 8)
        assert asked == [[((8, 8), 2), ((8, 8), 4)]]

    asyncio.run(go())


def test_a_moderated_job_keeps_no_previews(tmp_path, classifier_dir, pki):
    """Its previews showed what the image was to be: they go when the image is flagged."""
    ingress = _ingress(tmp_path, classifier_dir, pki)
    codec = ingress.service.stages.codec.obj
    real = codec.post.flagged

    def flagged(images, params):  # every preview (1/8 of the size) passes; images are checked
        return [False] * len(images) if images[0].size[0] < SIZE else real(images, params)

    codec.post.flagged = flagged

    async def go():
        job, _ = await submit_job(ingress, prompt=PROMPT, width=SIZE, height=SIZE, seed=1, steps=None,
                                  guidance=None, safety_tolerance=2, output_format="png", images=[],
                                  previews=3)  # fmt: skip
        await ingress.service.run(job)
        assert (await ingress.service.store.get(job.id)).status is Status.CONTENT_MODERATED
        assert await ingress.service.storage.list(f"previews/{job.id}") == []
        kept, _ = await submit_job(ingress, prompt=PROMPT, width=SIZE, height=SIZE, seed=2, steps=None,
                                   guidance=None, safety_tolerance=2, output_format="png", images=[],
                                   previews=3)  # fmt: skip
        await ingress.service.run(kept)
        assert len(await ingress.service.storage.list(f"previews/{kept.id}")) == 3

    asyncio.run(go())
