"""The fast path on the CPU: the model traces as one graph (no breaks), compiled output equals eager,
regional compilation recompiles once per shape and stays within its budget, shapes that were not
warmed up run eagerly, and the attention pin holds inside compiled code.

Tracing uses the "eager" / "aot_eager" backends (seconds); one test runs inductor for real."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

from klein import transformer as dit
from klein.config import TINY
from klein.fast import (
    FastPath,
    ShapeGate,
    setup_text_embedder,
    setup_transformer,
    setup_vae,
    warm_up_text_embedder,
    warm_up_transformer,
    warm_up_vae,
)
from klein.loader import ModelSource
from klein.lora import LoraBank
from klein.sampler import grid_ids, reference_ids, text_ids


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    dit.set_attention_priority(None)


@pytest.fixture(scope="module")
def source():
    return ModelSource.preset("tiny")


@torch.inference_mode()  # as the samplers make them: compiled code is specialised to inference tensors
def _inputs(b=2, h=4, w=6, refs=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    n_ref = sum(a * c for a, c in refs)
    img = torch.randn(b, h * w, 16, generator=g)
    ref = torch.randn(b, n_ref, 16, generator=g) if refs else None
    ctx = torch.randn(b, 512, 96, generator=g)
    ids = torch.cat((grid_ids(h, w), reference_ids(list(refs)))).expand(b, -1, -1)
    return img, ctx, ids, text_ids(512).expand(b, -1, -1), ref


def _forward(model, img, ctx, ids, tids, ref):
    return model(img, torch.tensor([0.6]), ctx, model.rope(tids, ids), ref)


@pytest.mark.parametrize("refs", [(), ((2, 3), (3, 2))], ids=["t2i", "2refs"])
def test_the_transformer_is_one_graph_without_breaks(source, refs):
    model = source.load_transformer()
    img, ctx, ids, tids, ref = _inputs(refs=refs)
    pe = model.rope(tids, ids)
    t = torch.tensor([0.6])
    with torch.inference_mode():
        explained = torch._dynamo.explain(model)(img, t, ctx, pe, ref)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(img, t, ctx, pe, ref), model(img, t, ctx, pe, ref))


def _complex_phases(ids, axes_dim, theta):
    """The rotary phases as klein computed them before: complex64 from float64 angles."""
    phases = []
    for i, d in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        phases.append(ids[..., i].to(torch.float64)[..., None] * omega)
    angle = torch.cat(phases, dim=-1)
    return torch.polar(torch.ones_like(angle), angle).to(torch.complex64).unsqueeze(1)


def _complex_rope_reference(x, pe):
    """The rotary embedding as klein computed it before: a complex64 product."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * torch.view_as_complex(pe)).flatten(-2).type_as(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_valued_rope_equals_the_complex_product_bit_for_bit(source, monkeypatch, dtype):
    model = source.load_transformer(dtype=dtype)
    img, ctx, ids, tids, ref = _inputs(refs=((2, 2),))
    pe = model.rope(tids, ids)
    assert pe.dtype == torch.float32 and pe.shape[-1] == 2
    old = _complex_phases(torch.cat((tids, ids), dim=1), model.config.axes_dim, model.config.theta)
    assert torch.equal(torch.view_as_complex(pe), old)
    q = torch.randn(2, 2, pe.shape[2], 32).to(dtype)
    assert torch.equal(dit.apply_rope(q, pe), _complex_rope_reference(q, pe))
    with torch.inference_mode():
        now = _forward(model, img, ctx, ids, tids, ref)
        monkeypatch.setattr(dit, "apply_rope", _complex_rope_reference)
        before = _forward(model, img, ctx, ids, tids, ref)
    assert torch.equal(now, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_spelling_of_rope_is_the_same_arithmetic(source, dtype):
    """Compiled code rotates with `_rope_swapped_pairs` (one elementwise expression, which inductor
    vectorises); run eagerly, it equals apply_rope's eager spelling bit for bit, on whole and
    sliced phases as the blocks pass them."""
    model = source.load_transformer()
    _, _, ids, tids, _ = _inputs(b=2, h=5, w=6, refs=((2, 3),))
    pe = model.rope(tids, ids)
    x = (torch.randn(2, 2, pe.shape[2], 32) * 4).to(dtype)
    assert torch.equal(dit._rope_swapped_pairs(x, pe), dit.apply_rope(x, pe))
    rows = slice(3, 40)
    assert torch.equal(
        dit._rope_swapped_pairs(x[:, :, rows], pe[:, :, rows]), dit.apply_rope(x[:, :, rows], pe[:, :, rows])
    )


def test_regional_compile_recompiles_once_per_shape_and_warm_shapes_cost_nothing(source):
    model = source.load_transformer()
    eager = copy.deepcopy(model)
    counter = CompileCounter()
    opts = FastPath(compile=True, backend=counter, warmup_sizes=((96, 64),), warmup_batches=(1, 2))
    report = setup_transformer(model, opts)
    assert "compiled 1 double + 2 single blocks" in str(report)
    warm = warm_up_transformer(model, opts)
    assert warm.warmed == ["96x64x1", "96x64x2"]
    # per shape: the double block, the single block, and the last single block (image rows only)
    assert counter.frame_count == 6
    with torch.inference_mode():
        for b in (1, 2):  # warmed shapes: compiled code, no new compilation
            args = _inputs(b=b, h=4, w=6, seed=b)
            assert torch.equal(_forward(model, *args), _forward(eager, *args))
        assert counter.frame_count == 6 and model.forward.eager_calls == 0
        args = _inputs(b=1, h=4, w=4, refs=((2, 2),), seed=5)  # not warmed: runs eagerly
        assert torch.equal(_forward(model, *args), _forward(eager, *args))
    assert counter.frame_count == 6 and model.forward.eager_calls == 1


def test_new_shapes_compile_on_demand_within_max_shapes(source):
    model = source.load_transformer()
    eager = copy.deepcopy(model)
    counter = CompileCounter()
    setup_transformer(model, FastPath(compile=True, backend=counter, new_shapes="compile", max_shapes=2))
    with torch.inference_mode():
        for i, (h, w) in enumerate([(4, 6), (4, 4), (4, 5), (5, 5)]):
            args = _inputs(b=1, h=h, w=w, seed=i)
            assert torch.equal(_forward(model, *args), _forward(eager, *args))
    assert counter.frame_count == 6  # two shapes compiled, then the budget is spent
    assert len(model.forward.shapes) == 2 and model.forward.eager_calls == 2


@pytest.mark.slow  # inductor builds C++ kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_with_inductor_matches_eager(source, dtype):
    """Inductor for real (it generates and builds C++ kernels: ~20 s per dtype here): fp32 within
    1e-5 relative; bf16 within its rounding (inductor computes the fused elementwise chains in
    float32 and rounds once, eager rounds after each op)."""
    model = source.load_transformer(dtype=dtype)
    eager = copy.deepcopy(model)
    exact = source.load_transformer()
    opts = FastPath(compile=True, warmup_sizes=((96, 64),))
    setup_transformer(model, opts)
    warm_up_transformer(model, opts)
    img, ctx, ids, tids, ref = _inputs(b=1, h=4, w=6, refs=(), seed=3)
    with torch.inference_mode():
        img, ctx = img.to(dtype), ctx.to(dtype)
        got, want = _forward(model, img, ctx, ids, tids, ref), _forward(eager, img, ctx, ids, tids, ref)
        fp32 = _forward(exact, img.float(), ctx.float(), ids, tids, ref)
    assert model.forward.eager_calls == 0
    if dtype == torch.float32:
        assert (got - want).norm() / want.norm() < 1e-5
    else:  # as close to the fp32 result as eager bf16 is
        assert (got.float() - want.float()).norm() / want.float().norm() < 1e-2
        assert (got.float() - fp32).norm() <= 1.5 * (want.float() - fp32).norm()


@pytest.mark.slow  # inductor builds C++ kernels
def test_frozen_weights_are_constants_of_the_compiled_code(source):
    """`freeze`: the compiled output equals eager's, and weights changed in place after compiling no
    longer reach it, where without `freeze` they do (it is what freezing means, and why LoRA slots,
    written while serving, refuse it). Set as one of torch.compile's options only, freezing did
    nothing: dynamo had traced the weights as inputs."""
    img, ctx, ids, tids, ref = _inputs(b=1, h=4, w=6, refs=(), seed=3)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    for freeze in (True, False):
        torch._dynamo.reset()
        model = source.load_transformer()
        eager = copy.deepcopy(model)
        opts = FastPath(compile=True, freeze=freeze, warmup_sizes=((96, 64),))
        assert ("frozen weights" in str(setup_transformer(model, opts))) == freeze
        warm_up_transformer(model, opts)
        with torch.inference_mode():
            assert (
                rel(_forward(model, img, ctx, ids, tids, ref), _forward(eager, img, ctx, ids, tids, ref))
                < 1e-5
            )
            for m in (model, eager):
                for p in (*m.double_blocks.parameters(), *m.single_blocks.parameters()):
                    p.mul_(0.5)
            got, want = _forward(model, img, ctx, ids, tids, ref), _forward(eager, img, ctx, ids, tids, ref)
        assert model.forward.eager_calls == 0
        assert (rel(got, want) > 1e-4) if freeze else (rel(got, want) < 1e-5), (freeze, rel(got, want))


def test_compiler_options_need_compile_and_freeze_refuses_lora_slots(source):
    for name in ("freeze", "autotune"):
        with pytest.raises(
            ValueError, match=rf"{name}: a compiler option; it needs compile \(or cuda_graphs\)"
        ):
            FastPath(**{name: True})
    with pytest.raises(
        ValueError, match="autotune: inductor's option; it does nothing with backend 'eager'"
    ) as e:
        FastPath(compile=True, autotune=True, backend="eager")
    again = pickle.loads(pickle.dumps(e.value))  # as it travels (through Ray, say)
    assert (again.field, str(again)) == ("autotune", str(e.value))
    model = source.load_transformer()
    LoraBank(model, slots=2, max_rank=4, places=1)
    with pytest.raises(ValueError, match="LoRA adapters are written into the transformer's slots"):
        setup_transformer(model, FastPath(compile=True, freeze=True, backend="eager"))
    setup_transformer(model, FastPath(compile=True, backend="eager"))
    frozen = source.load_transformer()  # and the other way round: slots for a frozen transformer
    setup_transformer(frozen, FastPath(compile=True, freeze=True, backend="eager"))
    with pytest.raises(ValueError, match="LoRA adapters are written into the transformer's slots"):
        LoraBank(frozen, slots=2, max_rank=4, places=1)


@pytest.mark.slow  # 54 traces
def test_frozen_blocks_each_get_a_graph_per_shape_within_the_recompile_limits(source):
    """Frozen, every one of the 27 Qwen3 layers has its own graph per batch size (their weights are
    constants): 54 graphs for two batch sizes, past the limit that fits unfrozen code (40 for 16
    shapes), which failed warm-up with fullgraph=True. The limits grow with the blocks."""
    embedder = source.load_text_embedder()
    eager = copy.deepcopy(embedder)
    opts = FastPath(compile=True, freeze=True, backend="aot_eager", warmup_batches=(1, 2))
    assert "frozen weights" in str(setup_text_embedder(embedder, opts))
    warm_up_text_embedder(embedder, opts)
    with torch.inference_mode():
        assert torch.equal(embedder(["a fox", "a hen"]), eager(["a fox", "a hen"]))
    assert embedder.encode.eager_calls == 0


def test_vae_decoder_compiles_whole_and_matches(source):
    vae = source.load_vae()
    eager = copy.deepcopy(vae)
    counter = CompileCounter()
    opts = FastPath(compile=True, backend=counter, warmup_sizes=((64, 96),))
    assert "compiled" in str(setup_vae(vae, opts))
    warm_up_vae(vae, opts)
    assert counter.frame_count == 1  # the whole decoder: one graph
    z = torch.randn(2, 16, 6, 4)
    with torch.inference_mode():
        assert torch.equal(vae.decode(z), eager.decode(z))
    assert counter.frame_count == 1 and vae.decode_one.eager_calls == 0
    explained = torch._dynamo.explain(eager.decoder)(torch.randn(1, 4, 12, 8))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


@pytest.mark.slow  # inductor builds C++ kernels
def test_qwen3_body_compiles_without_hooks(source):
    embedder = source.load_text_embedder()
    prompts = ["a fox", "a lighthouse at dusk"]
    want = embedder(prompts)
    ids, mask = embedder.tokenize(prompts)
    explained = torch._dynamo.explain(embedder.hidden_states)(ids, mask)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    counter = CompileCounter()
    opts = FastPath(compile=True, backend=counter, warmup_sizes=((64, 64),), warmup_batches=(2,))
    assert "compiled 27 Qwen3 layers" in str(setup_text_embedder(embedder, opts))
    warm_up_text_embedder(embedder, opts)
    assert counter.frame_count == 1  # 27 layers share one compiled graph
    assert torch.equal(embedder(prompts), want)
    assert counter.frame_count == 1 and embedder.encode.eager_calls == 0
    hooked = [n for n, m in embedder.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert not hooked, f"forward hooks on {hooked[:3]}"


def test_attention_pin_on_the_cpu(source):
    model = source.load_transformer()
    opts = FastPath(attention="auto")
    assert "torch's SDPA default" in str(setup_transformer(model, opts))
    assert dit._SDPA_PRIORITY is None
    with pytest.raises(ValueError, match="attention 'cudnn' needs CUDA"):
        setup_transformer(source.load_transformer(), FastPath(attention="cudnn"))
    with pytest.raises(ValueError, match="cuda_graphs needs CUDA"):
        setup_transformer(source.load_transformer(), FastPath(cuda_graphs=True))
    pinned = source.load_transformer()
    assert "SDPA math pinned" in str(setup_transformer(pinned, FastPath(attention="math")))
    args = _inputs(seed=9)
    with torch.inference_mode():
        want = _forward(model, *args)
        compiled = torch.compile(pinned, fullgraph=True, backend="aot_eager")
        img, ctx, ids, tids, ref = args
        got = compiled(img, torch.tensor([0.6]), ctx, pinned.rope(tids, ids), ref)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_shape_gate_closes_and_counts():
    calls = []
    gate = ShapeGate(lambda x: calls.append(x.shape) or x, max_shapes=4, name="t")
    gate(torch.zeros(2))
    gate.close()
    gate(torch.zeros(2))
    gate(torch.zeros(3))
    assert len(gate.shapes) == 1 and gate.eager_calls == 1 and len(calls) == 3
    with torch.inference_mode():
        gate(torch.zeros(2))  # an inference tensor: other compiled code
    assert gate.eager_calls == 2


def test_warm_up_says_when_inductor_did_not_use_cuda_graphs(source):
    """Inductor may compile a graph for CUDA graphs and then replay it without them (an input on the
    CPU, say), logging why: the warm-up report says so, or a replica would claim CUDA graphs it does
    not have. (Here the model runs eagerly and the skip is counted as inductor counts it.)"""
    from torch._dynamo.utils import counters

    model = source.load_transformer()
    forward, calls = model.forward, []

    def skipping(*args, **kwargs):
        if not calls:  # decided when the graph is compiled: its first call
            counters["inductor"]["cudagraph_skips"] += 1
        calls.append(args[0].shape)
        return forward(*args, **kwargs)

    model.forward = skipping
    graphs = warm_up_transformer(model, FastPath(cuda_graphs=True, warmup_sizes=((64, 64),)), multiple=16)
    assert "CUDA graphs NOT used for 1 compiled graph(s)" in str(graphs)
    assert len(calls) == 2  # CUDA graph trees record a function's second call: warm-up makes it
    plain = warm_up_transformer(model, FastPath(compile=True, warmup_sizes=((64, 64),)), multiple=16)
    assert "CUDA graphs" not in str(plain) and len(calls) == 3  # not asked for: nothing to say, one call


def test_options_are_checked():
    with pytest.raises(ValueError, match="max_shapes must be at least 1"):
        FastPath(max_shapes=0)
    with pytest.raises(ValueError, match="quantize must be 'fp8'"):
        FastPath(quantize="int4")
    assert TINY.text.layers == (9, 18, 27)


@pytest.mark.gpu
def test_attention_auto_pins_a_fast_kernel_on_cuda(source):
    model = source.load_transformer("cuda", torch.bfloat16)
    report = str(setup_transformer(model, FastPath()))
    assert "SDPA cudnn pinned" in report or "SDPA flash pinned" in report
