"""The text embedder reads hidden states 9, 18 and 27 whatever the encoder's depth, as diffusers'
Flux2KleinPipeline does with its defaults; guidance 1 on a distilled model means no guidance."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from klein import GenerationRequest, ModelSource, Pipeline
from klein.checkpoint import CheckpointError
from klein.config import TINY
from klein.request import InvalidRequest, validate
from serve.cli import main

pytest.importorskip("diffusers")

PROMPTS = ["a red fox in the snow", "", "un café à Paris"]


def _encoder_of_depth(depth: int, seed: int):
    from tests.reference import diffusers_pipeline

    return diffusers_pipeline(replace(TINY, text=replace(TINY.text, num_layers=depth)), seed=seed)


@pytest.fixture(scope="module", params=[27, 31], ids=["27-layers", "31-layers"])
def depth_pair(request, tmp_path_factory):
    """(diffusers pipeline, our pipeline) on the same random weights with a text encoder of the
    given depth: 27 (the deepest tap is the last layer: HF applies the final norm to it) and 31."""
    pipe = _encoder_of_depth(request.param, seed=20 + request.param)
    folder = tmp_path_factory.mktemp("depth") / f"tiny-{request.param}"
    pipe.save_pretrained(folder, safe_serialization=True)
    ours = Pipeline(ModelSource.from_paths(folder))
    assert ours.spec.text.num_layers == request.param and ours.spec.text.layers == (9, 18, 27)
    return pipe, ours


def test_embeddings_match_diffusers_defaults_at_other_depths(depth_pair):
    pipe, ours = depth_pair
    ref = pipe._get_qwen3_prompt_embeds(pipe.text_encoder, pipe.tokenizer, PROMPTS)  # its defaults
    torch.testing.assert_close(ours.embed(PROMPTS), ref, atol=1e-5, rtol=1e-5)


def test_latents_match_diffusers_defaults_at_other_depths(depth_pair):
    pipe, ours = depth_pair
    req = validate(ours.spec, GenerationRequest("a cat on a wall", 64, 80, seed=11))
    out = pipe(
        prompt=req.prompt, height=80, width=64, num_inference_steps=4,
        generator=torch.Generator("cpu").manual_seed(11), output_type="latent",
    )  # fmt: skip
    got = ours.generate_latents([req], [ours.encode_references(())])
    std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    as_theirs = pipe._unpatchify_latents(got * std + pipe.vae.bn.running_mean.view(1, -1, 1, 1))
    torch.testing.assert_close(as_theirs, out.images, atol=1e-5, rtol=1e-5)


def test_an_encoder_too_shallow_for_layer_27_is_refused(tiny_dir, tmp_path):
    folder = tmp_path / "shallow"
    shutil.copytree(tiny_dir, folder)
    config = folder / "text_encoder" / "config.json"
    cfg = json.loads(config.read_text())
    config.write_text(json.dumps(cfg | {"num_hidden_layers": 26}))
    with pytest.raises(CheckpointError) as e:
        ModelSource.from_paths(folder)
    msg = str(e.value)
    assert str(folder / "text_encoder") in msg and "has 26 layers" in msg and "at least 27" in msg


def test_guidance_one_on_a_distilled_model_is_no_guidance(tiny_dir):
    assert validate(TINY, GenerationRequest("x", 64, 64, guidance=1.0)).guidance is None
    for g in (0.5, 1.5, 4.0):
        with pytest.raises(InvalidRequest, match=f"guidance must be 1 or unset, got {g:g}"):
            validate(TINY, GenerationRequest("x", 64, 64, guidance=g))
    pipe = Pipeline(ModelSource.from_paths(tiny_dir))
    plain, one = pipe.generate(
        [GenerationRequest("a fox", 64, 64, seed=4), GenerationRequest("a fox", 64, 64, seed=4, guidance=1.0)]
    )
    assert np.array_equal(np.asarray(plain), np.asarray(one))


def test_cli_guidance_one_on_a_distilled_model(tmp_path, capsys):
    base = ["generate", "--prompt", "a fox", "--width", "64", "--height", "64", "--seed", "3", "--out"]
    assert main([*base, str(tmp_path / "a.png"), "--guidance", "1"]) == 0
    assert main([*base, str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    with pytest.raises(SystemExit) as e:
        main([*base, str(tmp_path / "c.png"), "--guidance", "2"])
    assert e.value.code == 2
    assert (
        "--guidance: tiny is guidance-distilled: guidance must be 1 or unset, got 2"
        in capsys.readouterr().err
    )
