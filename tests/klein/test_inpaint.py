"""Inpainting against diffusers 0.42.1's Flux2KleinInpaintPipeline on the same tiny random weights
(called with its defaults but for the inputs), distilled and Base, with and without a reference;
the request's bounds; batch invariance across strengths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from klein import GenerationRequest, InvalidRequest
from klein.inpaint import prepare_mask
from klein.request import start_step, validate

pytest.importorskip("diffusers")


def _smooth(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)).resize(
        (w, h), Image.Resampling.BILINEAR
    )


def _mask(w: int, h: int, box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", (w, h), 0)
    mask.paste(255, box)
    return mask


def _reference(pipe, source, mask, seed, steps, strength, reference=None, **kw) -> np.ndarray:
    from diffusers import Flux2KleinInpaintPipeline

    inpaint = Flux2KleinInpaintPipeline.from_pipe(pipe)
    out = inpaint(
        prompt="a red door", image=source, mask_image=mask, image_reference=reference, strength=strength,
        num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kw,
    )  # fmt: skip
    return (out.images[0] * 255).round().astype(np.uint8)


def _match(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.005, (diff.max(), (diff > 0).mean())


@pytest.mark.parametrize(
    ("size", "strength", "with_ref"),
    [((96, 80), 0.8, False), ((96, 80), 0.5, False), ((80, 64), 0.6, True)],
    ids=["strength-0.8", "strength-0.5", "with-reference"],
)
def test_distilled_matches_diffusers(diffusers_tiny, ours, size, strength, with_ref):
    w, h = size
    source, mask = _smooth(w, h, 1), _mask(w, h, (16, 8, w - 20, h - 16))
    reference = _smooth(64, 96, 2) if with_ref else None
    expected = _reference(diffusers_tiny, source, mask, 5, 4, strength, reference)
    refs = (source, reference) if with_ref else (source,)
    req = GenerationRequest("a red door", seed=5, steps=4, references=refs, mask=mask, strength=strength)
    _match(np.asarray(ours.generate([req])[0]), expected)


@pytest.mark.parametrize("with_ref", [False, True], ids=["no-reference", "with-reference"])
def test_base_cfg_matches_diffusers(diffusers_tiny_base, ours_base, with_ref):
    source, mask = _smooth(64, 64, 3), _mask(64, 64, (0, 0, 40, 64))
    reference = _smooth(80, 64, 4) if with_ref else None
    expected = _reference(diffusers_tiny_base, source, mask, 9, 5, 0.7, reference)  # its default guidance, 8
    refs = (source, reference) if with_ref else (source,)
    req = GenerationRequest("a red door", seed=9, steps=5, references=refs, mask=mask, strength=0.7)  # ours
    _match(np.asarray(ours_base.generate([req])[0]), expected)


def test_outside_the_mask_is_the_source_and_strength_sets_the_start(ours):
    """An all-black mask repaints nothing: the image is the source through the VAE; start steps are
    diffusers' quantisation (4 steps: strength in quarters)."""
    source = _smooth(64, 64, 5)
    keep = GenerationRequest("x", seed=1, steps=4, references=(source,), mask=Image.new("L", (64, 64), 0))
    kept = np.asarray(ours.generate([keep])[0]).astype(int)
    through_vae = np.asarray(ours.decode(ours.encode_references((source,)).tokens.reshape(1, 4, 4, -1)
                                         .permute(0, 3, 1, 2))[0]).astype(int)  # fmt: skip
    assert np.abs(kept - through_vae).max() <= 1
    assert [start_step(4, s) for s in (1.0, 0.8, 0.75, 0.5, 0.3, 0.25)] == [0, 0, 1, 2, 2, 3]
    assert prepare_mask(_mask(64, 64, (0, 0, 32, 64)), 64, 64, 16).flatten().tolist() == [1, 1, 0, 0] * 4


def test_a_batch_of_strengths_is_each_its_own(ours):
    """Requests with different strengths group apart; each image equals its solo run."""
    source, mask = _smooth(64, 64, 6), _mask(64, 64, (8, 8, 56, 56))
    reqs = [GenerationRequest("a red door", seed=s, steps=4, references=(source,), mask=mask, strength=st)
            for s, st in ((1, 0.5), (2, 1.0), (3, 0.5))]  # fmt: skip
    together = ours.generate(reqs)
    for req, image in zip(reqs, together, strict=True):
        assert np.array_equal(np.asarray(image), np.asarray(ours.generate([req])[0]))


def test_bad_inpainting_requests_name_the_field(ours):
    source, spec = _smooth(96, 80, 7), ours.spec
    cases = [
        (GenerationRequest("x", mask=_mask(96, 80, (0, 0, 8, 8))), "mask"),  # nothing to repaint
        (GenerationRequest("x", references=(source,), mask=_mask(64, 64, (0, 0, 8, 8))), "mask"),
        (GenerationRequest("x", references=(source,), mask=_mask(96, 80, (0, 0, 8, 8)), strength=0.0), "strength"),
        (GenerationRequest("x", references=(source,), mask=_mask(96, 80, (0, 0, 8, 8)), strength=1.5), "strength"),
        (GenerationRequest("x", references=(source,), strength=0.5), "strength"),  # no mask
        (GenerationRequest("x", references=(source,), mask=_mask(96, 80, (0, 0, 8, 8)), width=64), "width"),
    ]  # fmt: skip
    for req, field in cases:
        with pytest.raises(InvalidRequest) as e:
            validate(spec, req)
        assert e.value.field == field, (field, e.value)
    ok = validate(spec, GenerationRequest("x", references=(source,), mask=_mask(96, 80, (0, 0, 8, 8))))
    assert (ok.width, ok.height, ok.strength, ok.run_steps) == (96, 80, 0.8, 4)
    low = validate(spec, GenerationRequest("x", steps=4, references=(source,), mask=ok.mask, strength=0.1))
    assert low.run_steps == 1  # the start is floored: any strength above 0 runs a step


def test_an_inpainting_never_batches_with_a_plain_edit(ours):
    """Strength 1 starts at step 0: it must still not share a group with an edit of the same
    source (which has no mask), in either order."""
    source, mask = _smooth(64, 64, 8), _mask(64, 64, (8, 8, 56, 56))
    edit = GenerationRequest("a red door", seed=1, steps=4, references=(source,))
    inpaint = GenerationRequest("a red door", seed=2, steps=4, references=(source,), mask=mask, strength=1.0)
    alone = [np.asarray(ours.generate([r])[0]) for r in (edit, inpaint)]
    for order in ((0, 1), (1, 0)):
        reqs = [(edit, inpaint)[i] for i in order]
        for i, image in zip(order, ours.generate(reqs), strict=True):
            assert np.array_equal(np.asarray(image), alone[i])
    with pytest.raises(InvalidRequest, match="leaves none to run") as e:
        validate(ours.spec, GenerationRequest("x", steps=4, references=(source,), mask=mask, strength=1e-17))
    assert e.value.field == "strength"
