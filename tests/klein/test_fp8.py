"""FP8 on the CPU (torch 2.13 runs torch._scaled_mm there): the FP8 GEMM against a dequantised
reference, FP8 checkpoints kept FP8 in memory, --quantize fp8 for full-precision checkpoints, the
fallback where FP8 compute is missing, compiled FP8, and batch invariance."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

import klein.loader
from klein import GenerationRequest, ModelSource, Pipeline
from klein.fast import FastPath, setup_transformer
from klein.fp8 import (
    FP8,
    fp8_linear,
    fp8_supported,
    quantize_linears,
    quantize_rows,
    quantize_tokens,
    weight_bytes,
)
from klein.request import validate
from klein.sampler import grid_ids, reference_ids, text_ids

pytestmark = pytest.mark.skipif(not fp8_supported("cpu"), reason="this torch has no FP8 GEMM on the CPU")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_gemm_equals_its_dequantised_reference(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 64, generator=g).to(dtype)
    w = torch.randn(96, 64, generator=g)
    w8, ws = quantize_rows(w)
    assert w8.dtype == FP8 and ws.shape == (96,)
    got = fp8_linear(x, w8, ws)
    assert got.shape == (3, 40, 96) and got.dtype == dtype
    a8, xs = quantize_tokens(x.reshape(-1, 64))
    reference = F.linear(a8.float() * xs, w8.float() * ws[:, None]).reshape(3, 40, 96)
    torch.testing.assert_close(
        got.float(), reference, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-4
    )
    assert _rel(got, F.linear(x.float(), w)) < 0.06  # e4m3's 3 mantissa bits, twice


def _parity_inputs(refs):
    g = torch.Generator().manual_seed(1)
    n_img = 24 + sum(a * b for a, b in refs)
    x = torch.randn(2, n_img, 16, generator=g)
    ctx = torch.randn(2, 512, 96, generator=g)
    ids = torch.cat((grid_ids(4, 6), reference_ids(refs))).expand(2, -1, -1)
    return x, ctx, ids, text_ids(512).expand(2, -1, -1)


@pytest.fixture(scope="module")
def fp8_file(tiny_bfl_dir):
    return tiny_bfl_dir / "flux-2-klein-tiny-fp8.safetensors"


def test_fp8_checkpoint_stays_fp8_in_memory(tiny_bfl_dir, fp8_file):
    model = ModelSource.from_paths(tiny_bfl_dir, transformer=fp8_file).load_transformer()
    qkv = model.double_blocks[0].img_attn.qkv
    assert qkv.weight.dtype == FP8 and qkv.weight_scale.dtype == torch.float32
    assert qkv.weight_scale.shape == (qkv.weight.shape[0],)  # BFL's scalar, one per row
    assert model.single_blocks[1].linear2.weight.dtype == FP8
    assert (
        model.img_in.weight.dtype == torch.float32 and model.final_layer.linear.weight.dtype == torch.float32
    )
    assert "double_blocks.0.img_attn.qkv.weight_scale" in model.state_dict()


@pytest.mark.parametrize("refs", [[], [(4, 4)], [(2, 3), (5, 2)]], ids=["t2i", "1ref", "2refs"])
def test_fp8_forward_against_the_dequantised_model(tiny_bfl_dir, fp8_file, monkeypatch, refs):
    source = ModelSource.from_paths(tiny_bfl_dir, transformer=fp8_file)
    fp8 = source.load_transformer()
    monkeypatch.setattr(klein.loader, "fp8_unsupported_reason", lambda device: "test: dequantise")
    dequantised = source.load_transformer()
    assert dequantised.double_blocks[0].img_attn.qkv.weight.dtype == torch.float32
    x, ctx, ids, tids = _parity_inputs(refs)
    t = torch.tensor([0.83])
    with torch.inference_mode():
        got = fp8(x[:, :24], t, ctx, fp8.rope(tids, ids), x[:, 24:] if refs else None)
        want = dequantised(x[:, :24], t, ctx, fp8.rope(tids, ids), x[:, 24:] if refs else None)
    assert 0 < _rel(got, want) < 3e-2  # the activations' FP8 rounding, nothing else


def test_without_fp8_compute_the_checkpoint_is_dequantised_and_said_once(
    tiny_bfl_dir, fp8_file, monkeypatch, caplog
):
    monkeypatch.setattr(klein.loader, "fp8_unsupported_reason", lambda device: "test: no FP8 GEMM here")
    source = ModelSource.from_paths(tiny_bfl_dir, transformer=fp8_file)
    with caplog.at_level(logging.WARNING, logger="klein.fp8"):
        for _ in range(2):
            model = source.load_transformer()
            assert model.double_blocks[0].img_attn.qkv.weight.dtype == torch.float32
            assert model.double_blocks[0].img_attn.qkv.weight_scale is None
    said = [r.getMessage() for r in caplog.records if "no FP8 GEMM here" in r.getMessage()]
    assert len(said) == 1 and "dequantised to torch.float32" in said[0]


def test_quantize_fp8_turns_a_full_precision_checkpoint_to_fp8(tiny_dir):
    source = ModelSource.from_paths(tiny_dir)
    plain, quantised = source.load_transformer(), source.load_transformer()
    bytes_before = weight_bytes(quantised)
    report = setup_transformer(quantised, FastPath(quantize="fp8"))
    assert "FP8 block linears (12)" in str(report)  # tiny: 1 double block x 8 + 2 single blocks x 2
    lin = quantised.single_blocks[0].linear1
    assert lin.weight.dtype == FP8 and lin.weight_scale.shape == (lin.out_features,)
    moved = sum(
        m.weight.numel() for n, m in quantised.named_modules() if getattr(m, "weight_scale", None) is not None
    )
    rows = sum(
        m.out_features for n, m in quantised.named_modules() if getattr(m, "weight_scale", None) is not None
    )
    assert bytes_before - weight_bytes(quantised) == moved * 3 - rows * 4  # fp32 -> e4m3 + a scale per row
    x, ctx, ids, tids = _parity_inputs([(4, 4)])
    with torch.inference_mode():
        a = quantised(x[:, :24], torch.tensor([0.5]), ctx, plain.rope(tids, ids), x[:, 24:])
        b = plain(x[:, :24], torch.tensor([0.5]), ctx, plain.rope(tids, ids), x[:, 24:])
    assert 0 < _rel(a, b) < 5e-2


def test_quantize_rows_in_blocks_equals_one_pass():
    """A weight is quantised a block of rows at a time (little memory beyond the result): every
    row and scale equal one pass over the whole weight, block edges included."""
    w = torch.randn(37, 48, dtype=torch.bfloat16) * torch.logspace(-3, 1, 37)[:, None]
    whole = quantize_rows(w)
    for rows in (1, 5, 36):
        part = quantize_rows(w, chunk_bytes=4 * 48 * rows)
        assert torch.equal(part[0].view(torch.uint8), whole[0].view(torch.uint8)) and torch.equal(
            part[1], whole[1]
        )
    ref = w.float().abs().amax(dim=1) / 448.0
    assert torch.equal(whole[1], ref)


@pytest.mark.parametrize("layout", ["diffusers", "bfl"])
def test_quantize_as_read_equals_quantizing_after_loading(tiny_dir, tiny_bfl_dir, layout):
    """--quantize fp8 converts each block linear as the file is read (q, k and v of a diffusers
    folder separately, their rows then joined): the same weights and scales, bit for bit, as
    loading at full precision and quantising the model after."""
    if layout == "diffusers":
        source = ModelSource.from_paths(tiny_dir)
    else:
        source = ModelSource.from_paths(
            tiny_bfl_dir, transformer=tiny_bfl_dir / "flux-2-klein-tiny.safetensors"
        )
    for dtype in (torch.float32, torch.bfloat16):
        after = source.load_transformer(dtype=dtype)
        quantize_linears(after)
        as_read = source.load_transformer(dtype=dtype, quantize="fp8")
        want, got = after.state_dict(), as_read.state_dict()
        assert want.keys() == got.keys()
        assert got["double_blocks.0.img_attn.qkv.weight"].dtype == FP8
        assert sum(t.dtype == FP8 for t in got.values()) == 12
        for key, t in want.items():
            assert got[key].dtype == t.dtype and torch.equal(
                got[key].view(torch.uint8), t.view(torch.uint8)
            ), key
    pipe = Pipeline(source, fast=FastPath(quantize="fp8"))
    assert pipe.transformer.single_blocks[0].linear1.weight.dtype == FP8
    assert "FP8 block linears (12)" in str(pipe.reports[1])


def test_fp8_model_compiles_as_one_graph(tiny_dir):
    model = ModelSource.from_paths(tiny_dir).load_transformer()
    setup_transformer(model, FastPath(quantize="fp8"))
    eager = copy.deepcopy(model)
    x, ctx, ids, tids = _parity_inputs([])
    args = (x, torch.tensor([0.5]), ctx, model.rope(tids, ids))
    with torch.inference_mode():
        explained = torch._dynamo.explain(model)(*args)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(*args), eager(*args))
    torch._dynamo.reset()


def test_fp8_images_do_not_depend_on_their_batch_mates(tiny_bfl_dir, fp8_file):
    pipe = Pipeline(ModelSource.from_paths(tiny_bfl_dir, transformer=fp8_file))
    assert pipe.transformer.single_blocks[0].linear1.weight.dtype == FP8
    reqs = [
        validate(pipe.spec, GenerationRequest(p, 64, 64, seed=s)) for p, s in (("a fox", 1), ("a boat", 2))
    ]
    refs = [pipe.encode_references(())] * 2
    together = pipe.generate_latents(reqs, refs)
    for i, r in enumerate(reqs):
        assert torch.equal(pipe.generate_latents([r], refs[:1])[0], together[i])
