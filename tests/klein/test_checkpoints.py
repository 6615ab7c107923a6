"""Checkpoint formats and strict loading: the same weights as a diffusers folder, BFL single files
and an FP8 single file give the same images; every mismatch is one error naming the keys."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from klein import GenerationRequest, ModelSource, Pipeline
from klein.checkpoint import (
    COMFY_PREFIX,
    CheckpointError,
    SafetensorsFile,
    is_fp8_layer,
    save_safetensors,
    transformer_from_diffusers,
)
from klein.config import KLEIN_4B, KLEIN_9B, TINY
from klein.request import validate
from klein.transformer import Flux2

pytest.importorskip("diffusers")

REQUESTS = [
    GenerationRequest("a red fox", 64, 64, seed=1),
    GenerationRequest("two boats on a lake", 96, 64, seed=2),
]


def _latents(pipe: Pipeline) -> torch.Tensor:
    out = []
    for r in REQUESTS:
        r = validate(pipe.spec, r)
        out.append(pipe.generate_latents([r], [pipe.encode_references(())]))
    return torch.cat([o.flatten() for o in out])


@pytest.fixture(scope="module")
def reference_latents(tiny_dir):
    return _latents(Pipeline(ModelSource.from_paths(tiny_dir)))


def test_diffusers_folder_spec(tiny_dir):
    src = ModelSource.from_paths(tiny_dir)
    assert src.spec.transformer == TINY.transformer
    assert src.spec.vae == TINY.vae
    assert src.spec.text.layers == (9, 18, 27)  # BFL's and diffusers' taps, whatever the depth
    assert src.spec.text.num_layers == 28 and not src.spec.text.final_norm
    assert src.spec.name == "tiny-distilled"  # the folder's name: random-weight presets never match
    assert not src.spec.sampling.cfg  # model_index.json: is_distilled true


def test_bfl_single_files_give_the_same_images(tiny_bfl_dir, reference_latents):
    src = ModelSource.from_paths(tiny_bfl_dir, transformer=tiny_bfl_dir / "flux-2-klein-tiny.safetensors")
    assert src.transformer.layout == "bfl" and src.vae.files[0].name == "ae.safetensors"
    assert not src.spec.sampling.cfg  # flux-2-klein-* without -base-
    torch.testing.assert_close(_latents(Pipeline(src)), reference_latents, atol=1e-6, rtol=1e-6)


def test_fp8_single_file_within_quantisation_error(tiny_bfl_dir, reference_latents):
    path = tiny_bfl_dir / "flux-2-klein-tiny-fp8.safetensors"
    f = SafetensorsFile(path)
    quantised = [k.removesuffix(".weight_scale") for k in f.entries if k.endswith(".weight_scale")]
    assert quantised and all(is_fp8_layer(k) for k in quantised)
    assert f.dtype("double_blocks.0.img_attn.qkv.weight") == torch.float8_e4m3fn
    assert f.shape("double_blocks.0.img_attn.qkv.weight_scale") == ()
    assert f.dtype("img_in.weight") == torch.float32  # embedders and modulation stay high precision
    assert set(json.loads(f.metadata["_quantization_metadata"])["layers"]) == set(quantised)

    got = _latents(Pipeline(ModelSource.from_paths(tiny_bfl_dir, transformer=path)))
    err = (got - reference_latents).norm() / reference_latents.norm()
    assert 0 < err < 0.02, f"relative latent error {err:.4f}"


def test_official_fp8_layout_with_input_scale_and_comfy_prefix(tiny_bfl_dir, reference_latents, tmp_path):
    """BFL's FP8 files also carry a scalar `input_scale` per layer; ComfyUI saves add a prefix."""
    f = SafetensorsFile(tiny_bfl_dir / "flux-2-klein-tiny-fp8.safetensors")
    sd = {COMFY_PREFIX + k: f.read(k) for k in f.entries}
    for k in list(sd):
        if k.endswith(".weight_scale"):
            sd[k.replace(".weight_scale", ".input_scale")] = torch.tensor(0.5)
    save_safetensors(sd, tmp_path / "flux-2-klein-4b-fp8.safetensors")
    shutil.copy(tiny_bfl_dir / "ae.safetensors", tmp_path / "ae.safetensors")
    src = ModelSource.from_paths(
        tmp_path,
        text_encoder=tiny_bfl_dir / "text_encoder",
        transformer=tmp_path / "flux-2-klein-4b-fp8.safetensors",
    )
    got = _latents(Pipeline(src))
    assert (got - reference_latents).norm() / reference_latents.norm() < 0.02


def test_sharded_diffusers_folder(tiny_dir, diffusers_tiny, reference_latents, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(tiny_dir, folder, ignore=shutil.ignore_patterns("diffusion_pytorch_model*"))
    diffusers_tiny.transformer.save_pretrained(folder / "transformer", max_shard_size="200KB")
    diffusers_tiny.vae.save_pretrained(folder / "vae")
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    src = ModelSource.from_paths(folder)
    assert len(src.transformer.files) > 1
    torch.testing.assert_close(_latents(Pipeline(src)), reference_latents, atol=1e-6, rtol=1e-6)


def test_guidance_mode_comes_from_the_checkpoint(tiny_base_dir, tiny_bfl_dir, tmp_path):
    assert ModelSource.from_paths(tiny_base_dir).spec.sampling.cfg  # is_distilled: false
    base = tmp_path / "flux-2-klein-base-tiny.safetensors"
    shutil.copy(tiny_bfl_dir / "flux-2-klein-tiny.safetensors", base)
    src = ModelSource.from_paths(tiny_bfl_dir, transformer=base)
    assert src.spec.sampling.cfg and src.spec.sampling.steps == 50
    odd = tmp_path / "my-model.safetensors"
    shutil.copy(base, odd)
    with pytest.raises(CheckpointError, match="distilled from a Base"):
        ModelSource.from_paths(tiny_bfl_dir, transformer=odd)
    assert ModelSource.from_paths(tiny_bfl_dir, transformer=odd, preset="tiny-base").spec.sampling.cfg


def _tamper(tiny_bfl_dir, tmp_path, edit) -> ModelSource:
    f = SafetensorsFile(tiny_bfl_dir / "flux-2-klein-tiny.safetensors")
    sd = {k: f.read(k) for k in f.entries}
    edit(sd)
    path = tmp_path / "flux-2-klein-tiny.safetensors"
    save_safetensors(sd, path)
    return ModelSource.from_paths(tiny_bfl_dir, transformer=path)


def test_missing_key_is_named(tiny_bfl_dir, tmp_path):
    src = _tamper(tiny_bfl_dir, tmp_path, lambda sd: sd.pop("double_blocks.0.txt_mlp.2.weight"))
    with pytest.raises(CheckpointError, match=r"1 missing keys: double_blocks\.0\.txt_mlp\.2\.weight") as e:
        src.load_transformer()
    assert str(tmp_path) in str(e.value)


def test_unexpected_and_misshaped_keys_are_named(tiny_bfl_dir, tmp_path):
    def edit(sd):
        sd["guidance_out.weight"] = torch.zeros(2)
        sd["final_layer.linear.weight"] = torch.zeros(16, 32)

    with pytest.raises(CheckpointError) as e:
        _tamper(tiny_bfl_dir, tmp_path, edit).load_transformer()
    msg = str(e.value)
    assert "1 unexpected keys: guidance_out.weight" in msg
    assert "final_layer.linear.weight (16, 32) (model (16, 64))" in msg


def test_not_a_transformer_file(tiny_bfl_dir):
    with pytest.raises(CheckpointError, match="not a FLUX.2 transformer; missing keys: img_in.weight"):
        ModelSource.from_paths(tiny_bfl_dir, transformer=tiny_bfl_dir / "ae.safetensors")


def test_missing_text_encoder_layer_is_named(tiny_dir, tmp_path):
    folder = tmp_path / "w"
    shutil.copytree(tiny_dir, folder)
    path = folder / "text_encoder" / "model.safetensors"
    f = SafetensorsFile(path)
    sd = {k: f.read(k) for k in f.entries if k != "model.layers.2.mlp.up_proj.weight"}
    save_safetensors(sd, path)
    with pytest.raises(CheckpointError, match=r"missing keys: layers\.2\.mlp\.up_proj\.weight"):
        ModelSource.from_paths(folder).load_text_embedder()


def test_text_encoder_loads_only_the_tapped_layers(tiny_dir):
    embedder = ModelSource.from_paths(tiny_dir).load_text_embedder()
    assert len(embedder.model.layers) == 27  # layer 28 of 28 is never needed for taps (9, 18, 27)


@pytest.mark.parametrize("spec", [KLEIN_4B, KLEIN_9B], ids=["4b", "9b"])
def test_real_size_key_map_and_shapes(spec):
    """At real sizes on the meta device: the spec's counts, and diffusers' layout maps onto ours."""
    from tests.reference import diffusers_transformer

    with torch.device("meta"):
        ours = Flux2(spec.transformer)
        theirs = diffusers_transformer(spec)
    sd = ours.state_dict()
    n = sum(p.numel() for p in ours.parameters())
    assert (len(sd), n) == {"klein-4b": (149, 3_875_544_576), "klein-9b": (201, 9_078_581_248)}[spec.name]
    h = spec.transformer.hidden_size
    assert sd["single_blocks.0.linear1.weight"].shape == (3 * h + 6 * h, h)
    assert sd["final_layer.adaLN_modulation.1.weight"].shape == (2 * h, h)
    converted = transformer_from_diffusers(theirs.state_dict())
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in sd.items()}
