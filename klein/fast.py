"""The fast path: one place that sets a loaded model up for speed from typed options.

- Attention: the transformer's SDPA backends pinned in order (cuDNN, then flash, on CUDA), each
  checked to run at the model's head size and dtype before it is pinned.
- Compilation (`torch.compile`), regional as diffusers' `compile_repeated_blocks`: each double and
  single block of the transformer, each Qwen3 decoder layer, and the VAE decoder are compiled with
  `fullgraph=True` (the model has no graph breaks; a new one fails loudly). Blocks of one kind share
  their compiled code, so compiling costs about one block per kind and shape. With `cuda_graphs` the
  transformer's whole forward is compiled instead, with `mode="reduce-overhead"` (CUDA graphs).
  Two compiler options on top. `autotune` (inductor only): what mode "max-autotune-no-cudagraphs"
  sets, GEMM kernels chosen by timing candidates while compiling (longer compiles); on the CPU inductor's GEMM templates need
  frozen weights, so there it does nothing without `freeze`. `freeze`: freezing, the weights become
  constants of the compiled code (dynamo traces them so for any backend; inductor then folds them), which folds what depends only on them and, on the
  CPU, runs the linears through oneDNN on weights packed once; each block is then compiled on its
  own (the recompile limits grow with the number of blocks), and the packed weights are a second
  copy beside the module's. Frozen weights must not change; LoRA slots are written while serving
  (klein.lora), so `freeze` and LoRA are refused together, whichever comes second.
- FP8: `quantize="fp8"` turns the transformer's block linears into FP8 (klein.fp8). The loaders
  (klein.pipeline, the FlowTransformer stage) pass it to `load_transformer`, which converts each
  block linear as it is read; `setup_transformer` converts what is still full precision (a model
  loaded without it, random weights). FP8 checkpoints stay FP8 at load where the device runs FP8
  GEMMs (klein.loader).
- Shapes: compiled code is specialised to input shapes (`dynamic=False`, the fastest kernels) and
  `warm_up_*` compiles the configured sizes and batch sizes before any request arrives. A shape
  outside that set runs eagerly (`new_shapes="eager"`, the default: no request ever waits for a
  compiler), or is compiled when it first comes (`new_shapes="compile"`) while the component has
  fewer than `max_shapes` shapes compiled, eagerly past that: never a failure, never an unbounded
  compile backlog. `dynamic=True` compiles once for all shapes instead, with no gate (somewhat
  slower kernels; suits the text encoder, whose batch size varies, and the VAE, whose image size
  does). Batch size 1 is always a graph of its own (torch specialises sizes 0 and 1).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from klein import transformer as dit
from klein.fp8 import fp8_unsupported_reason, log_once, quantize_linears
from klein.transformer import LoraSelection

log = logging.getLogger(__name__)

Attention = Literal["auto", "default", "cudnn", "flash", "efficient", "math"]
FREEZE_WITH_LORA = (
    "freeze makes the weights constants of the compiled code, and LoRA adapters are written into the "
    "transformer's slots while it serves: use one or the other"
)


class OptionConflict(ValueError):
    """A FastPath option that does not go with the others: `field`, and `why`. The options `why`
    names are {placeholders}, so that each layer words them as its users write them (`worded`:
    the Serve config's fields, the CLI's flags); plain, they read as FastPath's own fields."""

    def __init__(self, field: str, why: str):
        self.field, self.why = field, why
        super().__init__(self.worded())

    def __reduce__(self):  # (through Ray, say: an exception is rebuilt from its arguments)
        return type(self), (self.field, self.why)

    def worded(self, spell: Callable[[str], str] = str) -> str:
        class Spelled(dict):
            def __missing__(self, name):
                return spell(name)

        return f"{spell(self.field)}: {self.why.format_map(Spelled())}"


@dataclass(frozen=True)
class FastPath:
    compile: bool = False  # regional torch.compile of the transformer, text encoder and VAE decoder
    cuda_graphs: bool = False  # the transformer compiled whole with mode="reduce-overhead" (CUDA only)
    attention: Attention = "auto"  # auto: cuDNN then flash pinned on CUDA, torch's choice elsewhere
    quantize: Literal["fp8"] | None = None  # FP8 block linears for a bf16/fp32 checkpoint
    dynamic: bool = False  # True: one compiled graph for every shape instead of one per shape
    new_shapes: Literal["eager", "compile"] = "eager"  # shapes not warmed up: run eagerly or compile
    max_shapes: int = 16  # compiled shapes per component; past it, new shapes run eagerly
    warmup_sizes: tuple[tuple[int, int], ...] = ()  # (width, height) compiled before serving
    warmup_batches: tuple[int, ...] = (1,)  # batch sizes compiled for each warm-up size
    backend: str | Callable = (
        "inductor"  # torch.compile backend ("eager" / "aot_eager" trace without codegen)
    )
    freeze: bool = False  # inductor freezing: weights become constants of the compiled code (not with LoRA)
    autotune: bool = False  # inductor max-autotune: GEMM kernels chosen by timing them while compiling

    def __post_init__(self):
        if self.max_shapes < 1:
            raise ValueError(f"max_shapes must be at least 1, got {self.max_shapes}")
        if any(b < 1 for b in self.warmup_batches):
            raise ValueError(f"warmup_batches must be positive, got {self.warmup_batches}")
        if self.quantize not in (None, "fp8"):
            raise ValueError(f"quantize must be 'fp8' or None, got {self.quantize!r}")
        if self.new_shapes not in ("eager", "compile"):
            raise ValueError(f"new_shapes must be 'eager' or 'compile', got {self.new_shapes!r}")
        for name in ("freeze", "autotune"):
            if getattr(self, name) and not (self.compile or self.cuda_graphs):
                raise OptionConflict(name, "a compiler option; it needs {compile} (or {cuda_graphs})")
        if self.autotune and self.backend != "inductor":
            raise OptionConflict(
                "autotune", f"inductor's option; it does nothing with {{backend}} {self.backend!r}"
            )

    def compile_kwargs(self, cuda_graphs: bool = True) -> dict:
        """torch.compile's keywords; `cuda_graphs=False` for components never CUDA-graphed (the
        text encoder and the VAE: their batch sizes and shapes vary more than buckets allow).
        Inductor's options as torch.compile's modes set them ("reduce-overhead": CUDA graphs;
        "max-autotune-no-cudagraphs": autotuning and coordinate-descent tuning) and `freezing`."""
        kw = {"fullgraph": True, "dynamic": self.dynamic, "backend": self.backend}
        options = {}
        if self.cuda_graphs and cuda_graphs:
            options["triton.cudagraphs"] = True
        if self.autotune:
            options |= {"max_autotune": True, "coordinate_descent_tuning": True}
        # freezing: for inductor (dynamo needs it set while tracing too: `_frozen`); it also makes
        # this backend differ from an unfrozen one, whose graphs dynamo would otherwise reuse
        if self.freeze:
            options["freezing"] = True
        if options and self.backend == "inductor":
            kw["options"] = options
        return kw


@dataclass
class Report:
    """What was set up, for the log and for `stats`."""

    component: str
    actions: list[str] = field(default_factory=list)
    warmup_s: float = 0.0
    warmed: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.actions or self.warmed)

    def __str__(self) -> str:
        parts = list(self.actions)
        if self.warmed:
            parts.append(f"warm-up {self.warmup_s:.1f} s over {', '.join(self.warmed)}")
        return f"{self.component}: {'; '.join(parts) or 'nothing to do'}"


class ShapeGate:
    """Calls `fn` (whose insides are compiled) with compiled code for the input shapes it admits:
    any while open, up to `max_shapes`; once `close`d, only those it has seen. Other shapes run
    with compilation off (`torch.compiler.set_stance("force_eager")`)."""

    def __init__(self, fn: Callable, max_shapes: int, name: str):
        self.fn, self.max_shapes, self.name = fn, max_shapes, name
        self.shapes: set[tuple] = set()
        self.closed = False
        self.eager_calls = 0
        self.on_eager: Callable[[], None] | None = None  # told of each eager call (a server's metric)

    def close(self) -> None:
        self.closed = True

    def __call__(self, *args, **kwargs):
        # what compiled code is specialised to: shapes, dtypes, and inference tensors vs others (an
        # argument left out and one passed as None match)
        named = [(i, a) for i, arg in (*enumerate(args), *kwargs.items()) for a in _tensors(arg)]
        key = (torch.is_grad_enabled(),) + tuple(
            (i, tuple(a.shape), a.dtype, a.is_inference()) for i, a in named if isinstance(a, Tensor)
        )
        if key in self.shapes or (not self.closed and len(self.shapes) < self.max_shapes):
            self.shapes.add(key)
            return self.fn(*args, **kwargs)
        if self.eager_calls == 0:
            why = "was not warmed up" if self.closed else f"is past max_shapes ({self.max_shapes})"
            log.warning("%s: a new input shape %s: it runs eagerly (so do later ones)", self.name, why)
        self.eager_calls += 1
        if self.on_eager is not None:
            self.on_eager()
        with torch.compiler.set_stance("force_eager"):
            return self.fn(*args, **kwargs)


def _tensors(arg) -> tuple:
    """An argument's tensors (a tuple's, such as a LoRA selection, one by one), else the argument."""
    return tuple(arg) if isinstance(arg, tuple) else (arg,)


def _close_after_warm_up(fn, opts: FastPath, report: Report) -> None:
    if isinstance(fn, ShapeGate) and opts.new_shapes == "eager" and report.warmed:
        fn.close()


def _gated(fn: Callable, opts: FastPath, name: str) -> Callable:
    """Static shapes: `fn` behind a ShapeGate. Dynamic shapes: as it is (one graph serves all).
    With `freeze`, every call runs under freezing (see `_frozen`)."""
    fn = _frozen(fn) if opts.freeze else fn
    return fn if opts.dynamic else ShapeGate(fn, opts.max_shapes, name)


def _frozen(fn: Callable) -> Callable:
    """`fn` with inductor's `freezing` set while it runs. Dynamo reads that setting while it traces
    (it decides whether the weights are traced as constants), so it must hold whenever a call may
    compile; passed as one of torch.compile's `options` only, it reaches inductor alone, which then
    finds the weights traced as inputs and freezes nothing. The setting is the process's: callers
    that compile with and without freezing from two threads at once could see each other's (the
    stages run all of a model's torch work on one thread)."""
    import torch._inductor.config

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with torch._inductor.config.patch(freezing=True):
            return fn(*args, **kwargs)

    return call


def _allow_recompiles(opts: FastPath, blocks: int = 1) -> None:
    """Dynamo's per-function cache must hold every shape the gates let through (its default, 8,
    would make a fullgraph function fail on the ninth). Frozen, each of the `blocks` compiled
    modules that share code has its own graph per shape (its weights are constants)."""
    import torch._dynamo

    cfg = torch._dynamo.config
    need = 2 * opts.max_shapes + 8  # the last single block adds a guard of its own per shape
    if opts.freeze:
        need *= blocks
    cfg.recompile_limit = max(cfg.recompile_limit, need)
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 8 * need)


# --- attention ---

_BACKENDS = ("cudnn", "flash", "efficient", "math")


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]


def _runs(name: str, heads: int, head_dim: int, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when SDPA with only backend `name` runs at this head size and dtype on the layouts the
    blocks pass it, else the error: q, k, v as strided views of one fused projection (whose q and
    k RoPE makes contiguous), and the last single block's queries on image rows only."""
    from torch.nn.attention import sdpa_kernel

    tokens, rows = 256, 192
    qkv = torch.randn(1, tokens, 3, heads, head_dim, device=device, dtype=dtype).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0].contiguous(), qkv[1].contiguous(), qkv[2]  # v: (1, H, L, D), L-stride 3·H·D
    try:
        with sdpa_kernel([_sdpa_backend(name)]):
            for query in (q, q[:, :, -rows:].contiguous()):
                out = torch.nn.functional.scaled_dot_product_attention(query, k, v)
                if not torch.isfinite(out).all():
                    return "non-finite output"
    except RuntimeError as e:
        return str(e).splitlines()[0]
    return None


def pin_attention(
    choice: Attention, heads: int, head_dim: int, device: torch.device, dtype: torch.dtype
) -> str:
    """Pins the transformer's SDPA backend order; returns what it did."""
    if choice == "default" or (choice == "auto" and device.type != "cuda"):
        dit.set_attention_priority(None)
        return "attention: torch's SDPA default"
    if device.type != "cuda" and choice != "math":
        raise ValueError(f"attention {choice!r} needs CUDA; this model is on {device}")
    wanted = ["cudnn", "flash"] if choice == "auto" else [choice]
    failures = []
    for name in wanted:
        error = _runs(name, heads, head_dim, device, dtype)
        if error is None:
            order = [name] + [b for b in _BACKENDS if b != name]
            dit.set_attention_priority([_sdpa_backend(b) for b in order])
            skipped = f" ({'; '.join(failures)})" if failures else ""
            return f"attention: SDPA {name} pinned{skipped}"
        failures.append(f"{name} does not run: {error}")
    if choice != "auto":
        raise RuntimeError(f"attention {choice!r}: {failures[-1]}")
    dit.set_attention_priority(None)
    return f"attention: torch's SDPA default ({'; '.join(failures)})"


# --- setting components up ---


def setup_transformer(model: dit.Flux2, opts: FastPath) -> Report:
    """Quantise, pin attention and compile the transformer in place (call once, after loading)."""
    report = Report("transformer")
    device, c = model.device, model.config
    if opts.quantize == "fp8":
        reason = fp8_unsupported_reason(device)
        if reason is None:
            names = quantize_linears(model)
            report.actions.append(f"FP8 block linears ({len(names)})")
        else:
            log_once(f"quantize fp8: {reason}; the transformer runs in {model.dtype}")
            report.actions.append(f"FP8 unavailable ({reason})")
    elif model.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn:
        report.actions.append("FP8 block linears (from the checkpoint)")
    report.actions.append(pin_attention(opts.attention, c.num_heads, c.head_dim, device, model.dtype))
    if opts.cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs needs CUDA; this model is on {device}")
    if opts.freeze and getattr(model, "lora_places", None):
        raise ValueError(FREEZE_WITH_LORA)
    if opts.compile or opts.cuda_graphs:
        model.frozen_weights = opts.freeze  # klein.lora refuses slots for it
        _allow_recompiles(opts, len(model.double_blocks) + len(model.single_blocks))
        kw = opts.compile_kwargs()
        if opts.cuda_graphs:
            model.forward = _with_cudagraph_steps(torch.compile(model.forward, **kw))
            report.actions.append(f"compiled whole ({_describe(kw, opts)})")
        else:
            for block in (*model.double_blocks, *model.single_blocks):
                block.compile(**kw)
            report.actions.append(
                f"compiled {len(model.double_blocks)} double + {len(model.single_blocks)} single blocks "
                f"({_describe(kw, opts)})"
            )
        model.forward = _gated(model.forward, opts, "transformer")
    return report


def _with_cudagraph_steps(fn: Callable) -> Callable:
    """Each call starts a new CUDA-graph step: the sampler has consumed the last output by then."""

    def forward(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return fn(*args, **kwargs)

    return forward


def setup_text_embedder(embedder, opts: FastPath) -> Report:
    """Compiles each Qwen3 decoder layer (tokenising and collecting the taps stay eager)."""
    report = Report("text encoder")
    if opts.compile:
        _allow_recompiles(opts, len(embedder.model.layers))
        kw = opts.compile_kwargs(cuda_graphs=False)
        for layer in embedder.model.layers:
            layer.compile(**kw)
        embedder.encode = _gated(embedder.encode, opts, "text encoder")
        report.actions.append(f"compiled {len(embedder.model.layers)} Qwen3 layers ({_describe(kw, opts)})")
    return report


def setup_vae(vae, opts: FastPath) -> Report:
    """Compiles the VAE decoder (channels-last on CUDA, where its convolutions are fastest)."""
    report = Report("VAE decoder")
    if opts.compile:
        _allow_recompiles(opts)
        if vae.device.type == "cuda":
            vae.decoder.to(memory_format=torch.channels_last)
            report.actions.append("channels-last")
        kw = opts.compile_kwargs(cuda_graphs=False)
        vae.decoder.compile(**kw)
        vae.decode_one = _gated(vae.decode_one, opts, "VAE decoder")
        report.actions.append(f"compiled ({_describe(kw, opts)})")
    return report


def _describe(kw: dict, opts: FastPath) -> str:
    options = kw.get("options", {})
    named = {"triton.cudagraphs": "CUDA graphs", "max_autotune": "max-autotune"}
    labels = [label for key, label in named.items() if options.get(key)] + ["frozen weights"] * opts.freeze
    what = ", ".join(labels) or "default options"
    return f"{kw['backend']}, {what}, {'dynamic' if kw['dynamic'] else 'static'} shapes"


# --- warm-up ---


@torch.inference_mode()
def warm_up_transformer(
    model: dit.Flux2, opts: FastPath, *, cfg: bool = False, multiple: int = 16, context_len: int = 512
) -> Report:
    """One forward per configured (size, batch size): compiles them before serving. `cfg` doubles
    the batch, as Base models run conditional and unconditional passes together."""
    from klein.sampler import grid_ids, text_ids

    report = Report("transformer")
    start, skipped = time.perf_counter(), cudagraph_skips()
    c, device, dtype = model.config, model.device, model.dtype
    for (w, h), b in _points(opts):  # inputs made as the samplers make them: inference tensors
        n = b * (2 if cfg else 1)
        gh, gw = h // multiple, w // multiple
        img = torch.zeros(n, gh * gw, c.in_channels, device=device, dtype=dtype)
        ctx = torch.zeros(n, context_len, c.context_in_dim, device=device, dtype=dtype)
        pe = model.rope(
            text_ids(context_len).expand(n, -1, -1).to(device), grid_ids(gh, gw).expand(n, -1, -1).to(device)
        )
        t = torch.full((1,), 0.5, device=device)
        # CUDA graph trees run a function's first call as it is and record it on the second: with
        # them, twice, so that no request pays a recording and every skip is known here
        for _ in range(2 if opts.cuda_graphs else 1):
            model(img, t, ctx, pe)
            if places := getattr(model, "lora_places", None):  # and with adapters (klein.lora): the empty one
                zeros = torch.zeros(n, places, device=device)
                model(img, t, ctx, pe, None, LoraSelection(zeros.long(), zeros))
        report.warmed.append(f"{w}x{h}x{n}")
    _sync(device)
    report.warmup_s = time.perf_counter() - start
    if opts.cuda_graphs and (skips := cudagraph_skips() - skipped):  # compiled, but replayed without
        report.actions.append(f"CUDA graphs NOT used for {skips} compiled graph(s): inductor skipped them")
        log.warning(
            "transformer: inductor skipped CUDA graphs %d time(s) while warming up; its log says why", skips
        )
    _close_after_warm_up(model.forward, opts, report)
    return report


def compiled_graph_counts() -> tuple[int, int, int]:
    """Graphs inductor (found in its caches, compiled, could not cache) in this process so far."""
    from torch._dynamo.utils import counters

    c = counters["inductor"]
    return c["fxgraph_cache_hit"], c["fxgraph_cache_miss"], c["fxgraph_cache_bypass"]


def cudagraph_skips() -> int:
    """How often inductor compiled a graph for CUDA graphs and then did not use them (an input on the
    CPU, a mutated input, ...), in this process so far; it logs why each time."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


@torch.inference_mode()
def warm_up_vae(vae, opts: FastPath, multiple: int = 16) -> Report:
    report = Report("VAE decoder")
    start = time.perf_counter()
    for w, h in opts.warmup_sizes:  # the decoder runs one image at a time
        z = torch.zeros(1, vae.config.latent_channels, h // multiple, w // multiple, device=vae.device)
        vae.decode(z)
        report.warmed.append(f"{w}x{h}")
    _sync(vae.device)
    report.warmup_s = time.perf_counter() - start
    _close_after_warm_up(vae.decode_one, opts, report)
    return report


def warm_up_text_embedder(embedder, opts: FastPath) -> Report:
    """The text encoder's input is always (batch, 512 tokens): warmed for the batch sizes, when
    compiled (image sizes do not matter to it)."""
    report = Report("text encoder")
    start = time.perf_counter()
    if opts.compile:
        for b in opts.warmup_batches:
            embedder(["warm-up"] * b)
            report.warmed.append(f"batch {b}")
    _sync(embedder.device)
    report.warmup_s = time.perf_counter() - start
    _close_after_warm_up(embedder.encode, opts, report)
    return report


def _points(opts: FastPath) -> list[tuple[tuple[int, int], int]]:
    return [(size, b) for size in opts.warmup_sizes for b in opts.warmup_batches]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
