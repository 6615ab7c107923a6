"""LoRA adapters: every common file format against diffusers 0.42.1's `load_lora_weights` on the
same tiny random weights (images within one level), several adapters on one request, scale 0,
batch invariance with a different adapter set per request (bit-exact), FP8 and compiled
transformers, and bad files refused naming what is wrong."""

from __future__ import annotations

import json
import pickle
import re

import numpy as np
import pytest
import torch

from klein import GenerationRequest, ModelSource, Pipeline
from klein.checkpoint import save_safetensors
from klein.config import TINY
from klein.lora import LoraError, LoraOptions, load_lora, lora_targets
from klein.request import InvalidRequest, LoraRequest, validate
from tests.klein.test_parity import _images_match

pytest.importorskip("peft")

RANK = 4
# klein (BFL) module -> diffusers module, for the targets the tests write
DOUBLE = {
    "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out", "img_mlp.0": "ff.linear_in",
    "img_mlp.2": "ff.linear_out", "txt_mlp.0": "ff_context.linear_in", "txt_mlp.2": "ff_context.linear_out",
}  # fmt: skip
SINGLE = {"linear1": "attn.to_qkv_mlp_proj", "linear2": "attn.to_out"}


def _factors(seed: int, rank: int = RANK) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random (A, B) on every block linear of the tiny transformer, large enough to show."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (fan_in, fan_out) in lora_targets(TINY.transformer).items():
        if name.startswith(("double_blocks.", "single_blocks.")):
            a = torch.randn(rank, fan_in, generator=g) / fan_in**0.5
            b = torch.randn(fan_out, rank, generator=g) * 3.0
            out[name] = (a, b)
    return out


def write(path, fmt: str, factors, alpha: float | None = None) -> None:
    """The same adapter in one of the formats trainers write."""
    sd, metadata, modules = {}, None, []
    for name, (a, b) in factors.items():
        if fmt.startswith("kohya"):
            key = "lora_unet_" + name.replace(".", "_")
            sd |= {f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b}
            if alpha is not None:
                sd[f"{key}.alpha"] = torch.tensor(alpha)
        elif fmt.startswith(("ai-toolkit", "peft-wrapped")):
            prefix = "diffusion_model." if fmt.startswith("ai-toolkit") else "base_model.model."
            if fmt in ("ai-toolkit", "peft-wrapped"):
                sd |= {f"{prefix}{name}.lora_A.weight": a, f"{prefix}{name}.lora_B.weight": b}
                continue
            # diffusers' block names under the prefix, or their legacy alias for the double blocks
            for module, (ma, mb) in _diffusers_modules(name, a, b).items():
                if fmt.endswith("sformer"):
                    module = re.sub(r"^transformer_blocks\.", "sformer_blocks.", module)
                sd |= {f"{prefix}{module}.lora_A.weight": ma, f"{prefix}{module}.lora_B.weight": mb}
        else:  # diffusers (with or without the `transformer.` prefix): separate q/k/v
            prefix = "transformer." if fmt == "diffusers" else ""
            for module, (ma, mb) in _diffusers_modules(name, a, b).items():
                sd |= {f"{prefix}{module}.lora_A.weight": ma, f"{prefix}{module}.lora_B.weight": mb}
                modules.append(module)
    if fmt == "kohya-with-text-encoder":  # a module of the text encoder's (not applied by either)
        te = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
        sd |= {f"{te}.lora_down.weight": torch.ones(RANK, 32), f"{te}.lora_up.weight": torch.ones(32, RANK)}
    if alpha is not None and fmt == "diffusers":  # as diffusers' save_lora_weights writes it
        config = {"r": RANK, "lora_alpha": alpha, "target_modules": sorted(modules)}
        metadata = {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    save_safetensors({k: v.contiguous() for k, v in sd.items()}, path, metadata)


def _diffusers_modules(name: str, a, b) -> dict:
    block, i, rest = name.split(".", 2)
    if block == "single_blocks":
        return {f"single_transformer_blocks.{i}.{SINGLE[rest]}": (a, b)}
    if rest.endswith("qkv"):  # one adapter per projection, A shared: the same delta as the fused one
        names = (
            ("to_q", "to_k", "to_v") if rest.startswith("img") else ("add_q_proj", "add_k_proj", "add_v_proj")
        )
        return {
            f"transformer_blocks.{i}.attn.{n}": (a, part) for n, part in zip(names, b.chunk(3), strict=True)
        }
    return {f"transformer_blocks.{i}.{DOUBLE[rest]}": (a, b)}


@pytest.fixture(scope="module")
def ours(tiny_dir):
    return Pipeline(ModelSource.from_paths(tiny_dir), lora=LoraOptions(slots=8, max_rank=16))


def _theirs(files: list, scales: list[float]):
    """A fresh diffusers pipeline on the same weights with the adapters loaded its own way."""
    from tests.reference import diffusers_pipeline

    pipe = diffusers_pipeline(TINY, seed=0)
    for i, path in enumerate(files):
        pipe.load_lora_weights(str(path), adapter_name=f"a{i}")
    pipe.set_adapters([f"a{i}" for i in range(len(files))], scales)
    return pipe


def _theirs_image(pipe, req: GenerationRequest) -> np.ndarray:
    out = pipe(prompt=req.prompt, height=req.height, width=req.width, num_inference_steps=req.steps,
               generator=torch.Generator("cpu").manual_seed(req.seed), output_type="np")  # fmt: skip
    return (out.images[0] * 255).round().astype(np.uint8)


def _ours_image(ours, path_scales, seed=3, prompt="a red fox") -> np.ndarray:
    loras = tuple(LoraRequest(str(p), s) for p, s in path_scales)
    return np.asarray(ours.generate([GenerationRequest(prompt, 64, 80, seed=seed, loras=loras)])[0])


FORMATS = [
    "diffusers", "ai-toolkit", "peft-wrapped", "kohya",
    "ai-toolkit-diffusers-names", "peft-wrapped-diffusers-names", "ai-toolkit-sformer", "kohya-with-text-encoder",
]  # fmt: skip


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_matches_diffusers(ours, tmp_path, fmt):
    path = tmp_path / f"{fmt}.safetensors"
    alpha = 2.0 if fmt.startswith(("kohya", "diffusers")) else None  # scale alpha/r = 0.5
    write(path, fmt, _factors(1), alpha=alpha)
    adapter = load_lora(path, TINY.transformer)
    assert adapter.format == (
        "kohya" if fmt.startswith("kohya") else "diffusers" if fmt == "diffusers" else "ai-toolkit"
    )
    separate_qkv = fmt == "diffusers" or fmt.endswith(("names", "sformer"))
    assert adapter.rank == (3 * RANK if separate_qkv else RANK)  # q, k and v stacked on the fused qkv
    got = _ours_image(ours, [(path, 0.8)])
    want = _theirs_image(_theirs([path], [0.8]), GenerationRequest("a red fox", 64, 80, seed=3, steps=4))
    _images_match(got, want)
    plain = _ours_image(ours, [])
    assert np.abs(got.astype(int) - plain.astype(int)).max() > 8  # the adapter does change the image


def test_bare_diffusers_keys_load_as_diffusers_prefixed_ones(ours, tmp_path):
    """DiffSynth writes diffusers' module names without the `transformer.` prefix (diffusers itself
    refuses those): the same adapter with the prefix is the reference."""
    bare, prefixed = tmp_path / "bare.safetensors", tmp_path / "prefixed.safetensors"
    write(bare, "bare", _factors(2))
    write(prefixed, "diffusers", _factors(2))
    assert np.array_equal(_ours_image(ours, [(bare, 1.0)]), _ours_image(ours, [(prefixed, 1.0)]))
    want = _theirs_image(_theirs([prefixed], [1.0]), GenerationRequest("a red fox", 64, 80, seed=3, steps=4))
    _images_match(_ours_image(ours, [(bare, 1.0)]), want)


def test_two_adapters_on_one_request_and_scale_zero(ours, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write(a, "ai-toolkit", _factors(3))
    write(b, "kohya", _factors(4), alpha=4.0)
    got = _ours_image(ours, [(a, 0.7), (b, -0.5)])
    want = _theirs_image(
        _theirs([a, b], [0.7, -0.5]), GenerationRequest("a red fox", 64, 80, seed=3, steps=4)
    )
    _images_match(got, want)
    assert np.array_equal(_ours_image(ours, [(a, 0.0)]), _ours_image(ours, []))


def test_a_batch_of_four_adapter_sets_gives_each_its_own_image(ours, tmp_path):
    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.safetensors")
        write(files[-1], ["ai-toolkit", "diffusers", "kohya"][i], _factors(10 + i))
    sets = [(), ((files[0], 1.0),), ((files[1], 0.6), (files[2], 1.2)), ((files[2], -1.0), (files[0], 0.3))]
    reqs = [
        validate(ours.spec, GenerationRequest(f"prompt {i}", 64, 64, seed=i, loras=tuple(LoraRequest(str(p), s) for p, s in adapters)))
        for i, adapters in enumerate(sets)
    ]  # fmt: skip
    refs = [ours.encode_references(())] * 4
    together = ours.generate_latents(reqs, refs)
    for i, r in enumerate(reqs):
        assert torch.equal(ours.generate_latents([r], refs[:1])[0], together[i]), i


def test_a_bank_smaller_than_the_batch_needs_splits_the_batch(ours, tiny_dir, tmp_path):
    """Four adapters over a bank of three slots (two resident besides the empty one): the batch
    runs in parts that fit, adapters are evicted least recently used first, every image as alone."""
    files = []
    for i in range(4):
        files.append(tmp_path / f"{i}.safetensors")
        write(files[-1], "ai-toolkit", _factors(20 + i))
    small = Pipeline(ModelSource.from_paths(tiny_dir), lora=LoraOptions(slots=3, max_rank=16, max_loras=2))
    sets = [((files[0], 1.0),), ((files[1], 0.5), (files[2], 1.0)), ((files[3], 1.0),), ((files[0], -1.0),)]
    reqs = [GenerationRequest(f"p{i}", 64, 64, seed=i, loras=tuple(LoraRequest(str(p), s) for p, s in a))
            for i, a in enumerate(sets)]  # fmt: skip
    together = small.generate(reqs)
    assert small.lora_bank.stats()["loads"] >= 5  # file 0 came back after it was evicted
    for r, image in zip(reqs, together, strict=True):
        assert np.array_equal(np.asarray(image), np.asarray(ours.generate([r])[0]))
    with pytest.raises(ValueError, match="slots must be at least 3 for 2 adapters per request"):
        Pipeline(ModelSource.from_paths(tiny_dir), lora=LoraOptions(slots=2, max_loras=2)).generate(reqs[:1])


def test_an_adapter_over_an_fp8_transformer(tiny_bfl_dir, tmp_path):
    path = tmp_path / "a.safetensors"
    write(path, "ai-toolkit", _factors(5))
    fp8 = Pipeline(
        ModelSource.from_paths(tiny_bfl_dir, transformer=tiny_bfl_dir / "flux-2-klein-tiny-fp8.safetensors")
    )
    full = Pipeline(
        ModelSource.from_paths(tiny_bfl_dir, transformer=tiny_bfl_dir / "flux-2-klein-tiny.safetensors")
    )
    assert fp8.transformer.single_blocks[0].linear1.weight.dtype == torch.float8_e4m3fn
    reqs = [validate(fp8.spec, GenerationRequest("a fox", 64, 64, seed=1, loras=(LoraRequest(str(path)),)))]
    refs = [fp8.encode_references(())]
    with_fp8, with_full = fp8.generate_latents(reqs, refs), full.generate_latents(reqs, refs)
    without = full.generate_latents([validate(full.spec, GenerationRequest("a fox", 64, 64, seed=1))], refs)
    err = (with_fp8 - with_full).norm() / with_full.norm()
    assert err < 0.03 < (without - with_full).norm() / with_full.norm(), err  # FP8's error, not the adapter's


@pytest.mark.slow  # inductor builds C++ kernels
def test_adapters_compiled_without_recompiling_per_adapter(tiny_dir, tmp_path):
    from torch._dynamo.testing import CompileCounter

    from klein.fast import FastPath

    files = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for i, f in enumerate(files):
        write(f, "ai-toolkit", _factors(20 + i))
    torch._dynamo.reset()
    counter = CompileCounter()
    fast = FastPath(compile=True, backend=counter, warmup_sizes=((64, 64),))
    compiled = Pipeline(ModelSource.from_paths(tiny_dir), fast=fast, lora=LoraOptions(slots=4, max_rank=8))
    compiled.warm_up()
    eager = Pipeline(ModelSource.from_paths(tiny_dir), lora=LoraOptions(slots=4, max_rank=8))
    frames = counter.frame_count
    for f in files:
        req = GenerationRequest("a fox", 64, 64, seed=2, loras=(LoraRequest(str(f), 0.9),))
        assert np.array_equal(np.asarray(compiled.generate([req])[0]), np.asarray(eager.generate([req])[0]))
    assert counter.frame_count == frames  # warmed with the bank: no compilation for any adapter
    assert compiled.transformer.forward.eager_calls == 0
    torch._dynamo.reset()


def test_bad_files_are_refused_naming_the_problem(tmp_path):
    cfg = TINY.transformer
    pickled = tmp_path / "pickled.safetensors"
    pickled.write_bytes(pickle.dumps({"lora_A": [1, 2, 3]}))
    with pytest.raises(LoraError, match="not a safetensors file"):
        load_lora(pickled, cfg)
    good = tmp_path / "good.safetensors"
    write(good, "ai-toolkit", _factors(6))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(LoraError, match="not a safetensors file"):
        load_lora(truncated, cfg)
    odd = tmp_path / "odd.safetensors"
    for content in (
        b"",
        b"12345",
        b"\x04\x00\x00\x00\x00\x00\x00\x00\xff\xfe{}",
        b"\x02\x00\x00\x00\x00\x00\x00\x00[]",
    ):
        odd.write_bytes(content)  # empty, shorter than the length field, a header not JSON, not an object
        with pytest.raises(LoraError, match="not a safetensors file"):
            load_lora(odd, cfg)
    with pytest.raises(LoraError, match="over the 0 MB cap"):
        load_lora(good, cfg, max_bytes=1000)
    wrong = tmp_path / "wrong.safetensors"  # another model's width
    write(wrong, "ai-toolkit", {"double_blocks.0.img_attn.proj": (torch.randn(4, 128), torch.randn(64, 4))})
    with pytest.raises(
        LoraError, match="double_blocks.0.img_attn.proj: lora_A takes 128 inputs, the layer 64"
    ):
        load_lora(wrong, cfg)
    mismatched = tmp_path / "mismatched.safetensors"
    write(
        mismatched, "ai-toolkit", {"double_blocks.0.img_attn.proj": (torch.randn(4, 64), torch.randn(64, 8))}
    )
    with pytest.raises(LoraError, match="do not make a rank-r pair"):
        load_lora(mismatched, cfg)
    unknown = tmp_path / "unknown.safetensors"
    write(unknown, "ai-toolkit", {"double_blocks.7.img_attn.proj": (torch.randn(4, 64), torch.randn(64, 4))})
    with pytest.raises(LoraError, match=r"1 keys fit no layer of this model: double_blocks.7.img_attn.proj"):
        load_lora(unknown, cfg)
    lokr = tmp_path / "lokr.safetensors"
    save_safetensors({"diffusion_model.single_blocks.0.linear1.lokr_w1": torch.zeros(2, 2)}, lokr)
    with pytest.raises(LoraError, match="LoKr adapters are not supported"):
        load_lora(lokr, cfg)
    modulation = tmp_path / "modulation.safetensors"
    write(modulation, "ai-toolkit", {"time_in.in_layer": (torch.randn(4, 256), torch.randn(64, 4))})
    with pytest.raises(LoraError, match="timestep or modulation layers is not supported"):
        load_lora(modulation, cfg)


def test_rank_over_the_bank_and_request_bounds(ours, tmp_path):
    big = tmp_path / "big.safetensors"
    write(big, "ai-toolkit", _factors(7, rank=32))
    with pytest.raises(LoraError, match="rank 32 .* over this deployment's max_rank 16"):
        ours.generate([GenerationRequest("x", 64, 64, loras=(LoraRequest(str(big)),))])
    assert np.asarray(ours.generate([GenerationRequest("x", 64, 64)])[0]).shape == (64, 64, 3)  # still fine
    with pytest.raises(InvalidRequest, match="at most 3 adapters per request"):
        validate(TINY, GenerationRequest("x", 64, 64, loras=(LoraRequest("a"),) * 4))
    with pytest.raises(InvalidRequest, match="between -4 and 4, got 5") as e:
        validate(TINY, GenerationRequest("x", 64, 64, loras=(LoraRequest("a", 5.0),)))
    assert e.value.field == "loras[0].scale"
