"""bf16 parity with diffusers 0.42.1, end to end: the reference loaded as its model card loads it
(`from_pretrained(..., dtype=torch.bfloat16)`) and called with its defaults, klein loading
the same folder in bf16. On the CPU the images are equal bit for bit: klein rounds where diffusers
rounds (the timestep, the schedule's float32 sigmas, each Euler step, CFG's combination, the
modulation after LayerNorm, the VAE's attention as linear layers and its batch-norm statistics,
the images' [-1, 1] -> [0, 1] map, and the layout of the VAE's input), so any drift shows here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from klein import GenerationRequest, ModelSource, Pipeline
from tests.klein.test_inpaint import _mask, _smooth
from tests.klein.test_parity import _random_image

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def pair(tiny_dir):
    from diffusers import Flux2KleinPipeline

    reference = Flux2KleinPipeline.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    return reference, Pipeline(ModelSource.from_paths(tiny_dir), dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def pair_base(tiny_base_dir):
    from diffusers import Flux2KleinPipeline

    reference = Flux2KleinPipeline.from_pretrained(tiny_base_dir, dtype=torch.bfloat16)
    return reference, Pipeline(ModelSource.from_paths(tiny_base_dir), dtype=torch.bfloat16)


def _as_uint8(out) -> np.ndarray:
    return (out.images[0] * 255).round().astype(np.uint8)


def _equal(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape
    diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    assert diff.max() == 0, f"{(diff > 0).mean():.1%} of the values differ, by up to {diff.max()}"


@pytest.mark.parametrize(
    ("size", "steps", "refs"),
    [((128, 192), 8, ()), ((96, 64), 4, ((80, 96),)), ((96, 64), 4, ((112, 64), (64, 80)))],
    ids=["text-to-image", "edit-1-ref", "multi-2-refs"],
)
def test_distilled_images_are_diffusers_own(pair, size, steps, refs):
    reference, ours = pair
    (w, h), images = size, tuple(_random_image(rw, rh, seed=i) for i, (rw, rh) in enumerate(refs))
    expected = reference(
        prompt="a dog is dancing", image=list(images) or None, height=h, width=w, num_inference_steps=steps,
        generator=torch.Generator("cpu").manual_seed(42), output_type="np",
    )  # fmt: skip
    got = ours.generate(
        [GenerationRequest("a dog is dancing", w, h, seed=42, steps=steps, references=images)]
    )
    _equal(np.asarray(got[0]), _as_uint8(expected))


@pytest.mark.parametrize("refs", [(), ((64, 80),)], ids=["text-to-image", "edit-1-ref"])
def test_base_cfg_images_are_diffusers_own(pair_base, refs):
    """Both at their default guidance (4)."""
    reference, ours = pair_base
    images = tuple(_random_image(w, h, seed=9) for w, h in refs)
    expected = reference(
        prompt="a lighthouse at dusk", image=list(images) or None, height=64, width=96, num_inference_steps=4,
        generator=torch.Generator("cpu").manual_seed(3), output_type="np",
    )  # fmt: skip
    got = ours.generate(
        [GenerationRequest("a lighthouse at dusk", 96, 64, seed=3, steps=4, references=images)]
    )
    _equal(np.asarray(got[0]), _as_uint8(expected))


@pytest.mark.parametrize("base", [False, True], ids=["distilled", "base"])
def test_inpainting_is_diffusers_own(tiny_dir, tiny_base_dir, base):
    """Flux2KleinInpaintPipeline at its defaults (guidance 8 for Base), with a further reference."""
    from diffusers import Flux2KleinInpaintPipeline

    folder = tiny_base_dir if base else tiny_dir
    reference = Flux2KleinInpaintPipeline.from_pretrained(folder, dtype=torch.bfloat16)
    ours = Pipeline(ModelSource.from_paths(folder), dtype=torch.bfloat16)
    source, mask, other = _smooth(80, 64, 1), _mask(80, 64, (16, 8, 60, 48)), _smooth(64, 96, 2)
    expected = reference(
        prompt="a red door", image=source, mask_image=mask, image_reference=other, strength=0.6,
        num_inference_steps=4, generator=torch.Generator("cpu").manual_seed(5), output_type="np",
    )  # fmt: skip
    req = GenerationRequest(
        "a red door", seed=5, steps=4, references=(source, other), mask=mask, strength=0.6
    )
    _equal(np.asarray(ours.generate([req])[0]), _as_uint8(expected))
