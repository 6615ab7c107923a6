"""LoRA adapters for the FLUX.2 [klein] transformer: read from the file formats trainers write,
mapped onto klein's (BFL) module names, and applied unfused at run time, per request.

Formats (detected from the keys, as diffusers' `Flux2LoraLoaderMixin` does):
- diffusers / PEFT: `transformer.transformer_blocks.N.attn.to_q.lora_A.weight`, ... (also without
  the `transformer.` prefix, as DiffSynth writes them); separate q/k/v adapters land on klein's fused
  `qkv` as one adapter (A stacked, B block-diagonal). Scale alpha/rank from the safetensors header's
  `lora_adapter_metadata` (a PEFT LoraConfig), else alpha = rank.
- ai-toolkit / BFL names: `diffusion_model.double_blocks.N.img_attn.qkv.lora_A.weight`; PEFT-wrapped
  `base_model.model.` the same. `.alpha` keys honoured when present. Keys under those prefixes that
  keep diffusers' block names (`transformer_blocks.`, `single_transformer_blocks.`, and the legacy
  `sformer_blocks.`) are read as diffusers' (below), as diffusers reads them.
- kohya / musubi: `lora_unet_double_blocks_N_img_attn_qkv.lora_down.weight`, `.lora_up.weight`,
  `.alpha` (scale alpha/rank; alpha = rank when absent). Text-encoder modules (`lora_te*_`) are
  skipped with a warning, as diffusers skips them.

The scale alpha/rank is folded into B at load. Refused, each with one error naming the keys: keys
that place on no module of the loaded model, shapes or ranks that do not fit it, LoKr/LoHa/DoRA,
LoRAs on the timestep and modulation layers (their input is shared by a whole batch), files that are
not safetensors (never unpickled), and files over the size cap.

At run time (`Linear` in klein.transformer): each LoRA-able linear holds a bank of adapter slots,
`lora_A` (slots, R, in) and `lora_B` (slots, out, R), zero-padded to a fixed rank R; a forward takes
a `LoraSelection`, per request the slots it uses and their scales, and adds
scale * B_slot (A_slot x) to that request's rows only (its places stacked into one rank, added by one
batched GEMM: `lora_delta`). Base weights never change (FP8 ones included), slot 0 is the empty
adapter, and the shapes never depend on which adapters are used: no recompilation per adapter, and
the adapter path adds no dependence of a request on its batch-mates (bit-exact in fp32 on the CPU;
the CPU's native bf16 GEMMs are not batch-invariant with or without adapters, see docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from klein.checkpoint import _DIT_RENAMES_RE, _DTYPES, CheckpointError, SafetensorsFile, _apply_renames
from klein.config import TransformerConfig
from klein.fast import FREEZE_WITH_LORA
from klein.request import MAX_LORAS
from klein.transformer import Flux2, LoraSelection, lora_delta  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)
MAX_LORA_BYTES = 2 * 2**30
# kohya's text-encoder modules: diffusers drops them from a Flux2 LoRA with a warning; so does klein
KOHYA_TEXT_ENCODER = ("lora_te_", "lora_te1_", "lora_te2_")
MAX_LISTED = 8
UNSUPPORTED = {"lokr_": "LoKr", "hada_": "LoHa", "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA"}
# Whose input is the timestep embedding (one per batch), not the tokens: no per-request LoRA there.
SHARED_INPUT = re.compile(
    r"^(time_in\.|.*_modulation\.lin$|.*_modulation_(img|txt)\.lin$|final_layer\.adaLN_modulation\.1$)"
)


class LoraError(ValueError):
    """An adapter file cannot be used with the loaded model; the message names the keys."""


@dataclass(frozen=True)
class LoraAdapter:
    name: str
    format: str
    factors: dict[str, tuple[Tensor, Tensor]]  # module -> (A (r, in), B (out, r), alpha/r folded in)

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.factors.values())

    @property
    def nbytes(self) -> int:
        return sum(
            a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.factors.values()
        )


@functools.cache
def lora_targets(config: TransformerConfig, shared: bool = False) -> dict[str, tuple[int, int]]:
    """Every linear of the transformer a LoRA may target: name -> (in_features, out_features); with
    `shared`, those whose input is shared by the batch too (which adapters may not target)."""
    with torch.device("meta"):
        model = Flux2(config)
    return {
        name: (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and (shared or not SHARED_INPUT.match(name))
    }


# --- reading ---


def read_lora(path: str | Path, max_bytes: int = MAX_LORA_BYTES) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, header metadata) of a safetensors file; LoraError for anything else."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise LoraError(f"{path.name}: {size / 2**20:.0f} MB, over the {max_bytes / 2**20:.0f} MB cap")
    try:
        f = SafetensorsFile(path)
        tensors = {k: f.read(k) for k in f.entries}
    except (CheckpointError, ValueError, KeyError, OSError, RuntimeError) as e:
        detail = str(e).replace(f"{path}: ", "").replace(str(path), path.name)
        if not detail.startswith("not a safetensors file"):
            detail = f"not a safetensors file ({detail})"
        raise LoraError(f"{path.name}: {detail}") from None
    return tensors, f.metadata


def read_lora_bytes(data: bytes, name: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, header metadata) of a safetensors file held in memory; LoraError for anything else."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        if n > len(data) - 8 or n > 100_000_000:
            raise ValueError(f"header of {n} bytes")
        header = json.loads(data[8 : 8 + n])
        metadata = header.pop("__metadata__", None) or {}
        body = memoryview(data)[8 + n :]
        tensors = {}
        for key, e in header.items():
            start, end = e["data_offsets"]
            if end > len(body) or start > end:
                raise ValueError(f"{key!r} lies past the end of the file (truncated?)")
            raw = torch.frombuffer(bytearray(body[start:end]), dtype=torch.uint8)
            tensors[key] = raw.view(_DTYPES[e["dtype"]]).reshape(e["shape"])
    except (ValueError, KeyError, TypeError, AttributeError, struct.error, RuntimeError) as e:
        raise LoraError(f"{name}: not a safetensors file ({e})") from None
    return tensors, metadata


def split_for_bank(keys: list[set[str]], capacity: int) -> list[list[int]]:
    """Indices of requests (each needing a set of adapter keys) cut into consecutive runs whose
    adapters fit the bank together."""
    parts, current, needed = [], [], set()
    for i, mine in enumerate(keys):
        if current and len(needed | mine) > capacity:
            parts.append(current)
            current, needed = [], set()
        current.append(i)
        needed |= mine
    return parts + [current]


def load_lora(
    path: str | Path, config: TransformerConfig, name: str | None = None, max_bytes: int = MAX_LORA_BYTES
) -> LoraAdapter:
    tensors, metadata = read_lora(path, max_bytes)
    return parse_lora(tensors, metadata, config, name or Path(path).stem)


# --- formats ---


class _Part(NamedTuple):
    module: str  # klein's name
    part: int | None  # q/k/v index for diffusers' separate projections onto a fused qkv
    a: Tensor
    b: Tensor
    scale: float


def parse_lora(
    tensors: dict[str, Tensor], metadata: dict[str, str], config: TransformerConfig, name: str = "lora"
) -> LoraAdapter:
    """Map a LoRA state dict onto the transformer's modules (see the module docstring)."""
    keys = list(tensors)
    if not keys:
        raise LoraError(f"{name}: the file holds no tensors")
    if bad := sorted({kind for k in keys for marker, kind in UNSUPPORTED.items() if marker in k}):
        raise LoraError(
            f"{name}: {', '.join(bad)} adapters are not supported (keys like {_listed(keys, UNSUPPORTED)})"
        )
    targets = lora_targets(config)
    if any(".lora_down.weight" in k for k in keys) and any(k.startswith("lora_unet_") for k in keys):
        fmt, parts, unplaced = "kohya", *_kohya(tensors, config)
    elif (bfl := _strip_bfl_prefix(keys)) is not None:
        # under ai-toolkit's prefix, some exports keep diffusers' block names (as diffusers accepts)
        expanded = {k: n for k in keys if (n := _diffusers_block_name(bfl[k])) is not None}
        fmt, parts, unplaced = (
            "ai-toolkit",
            *_bfl({k: t for k, t in tensors.items() if k not in expanded}, bfl),
        )
        if expanded:
            more, left = _diffusers({expanded[k]: tensors[k] for k in expanded}, metadata)
            parts, unplaced = parts + more, unplaced + left
    else:
        fmt, parts, unplaced = "diffusers", *_diffusers(tensors, metadata)
    shared = sorted(p.module for p in parts if SHARED_INPUT.match(p.module))
    if shared:
        raise LoraError(
            f"{name}: LoRA on the timestep or modulation layers is not supported ({', '.join(shared[:MAX_LISTED])})"
        )
    unplaced += [f"{p.module} (no such layer)" for p in parts if p.module not in targets]
    if unplaced:
        more = f" (+{len(unplaced) - MAX_LISTED} more)" if len(unplaced) > MAX_LISTED else ""
        raise LoraError(
            f"{name}: {len(unplaced)} keys fit no layer of this model: {', '.join(unplaced[:MAX_LISTED])}{more}"
        )
    factors = _assemble(parts, targets, config, name)
    if not factors:
        raise LoraError(f"{name}: no LoRA weights in the file")
    return LoraAdapter(name=name, format=fmt, factors=factors)


def _listed(keys: list[str], markers) -> str:
    return ", ".join([k for k in keys if any(m in k for m in markers)][:3])


BFL_MODULES = ("double_blocks.", "single_blocks.", "img_in.", "txt_in.", "final_layer.", "time_in.")


def _strip_bfl_prefix(keys: list[str]) -> dict[str, str] | None:
    """Keys that name klein's (BFL's) modules: ai-toolkit's `diffusion_model.`, PEFT's
    `base_model.model.`, or none; original key -> key without the prefix. None: diffusers' names."""
    for prefix in ("diffusion_model.", "base_model.model."):
        if all(k.startswith(prefix) for k in keys):
            return {k: k.removeprefix(prefix) for k in keys}
    if all(k.startswith(BFL_MODULES) for k in keys):
        return {k: k for k in keys}
    return None


# diffusers' block names, and the legacy alias some exports write for the double blocks
_DIFFUSERS_BLOCKS = {
    "transformer_blocks.": "transformer_blocks.",
    "single_transformer_blocks.": "single_transformer_blocks.",
    "sformer_blocks.": "transformer_blocks.",
}


def _diffusers_block_name(key: str) -> str | None:
    for prefix, name in _DIFFUSERS_BLOCKS.items():
        if key.startswith(prefix):
            return name + key.removeprefix(prefix)
    return None


def _pairs(tensors: dict[str, Tensor], rename) -> tuple[dict[str, dict[str, Tensor]], list[str]]:
    """Group `<module>.lora_A.weight` / `.lora_B.weight` / `.alpha` (and lora_down/lora_up) by module."""
    groups: dict[str, dict[str, Tensor]] = {}
    unplaced = []
    for key, t in tensors.items():
        k = rename(key)
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B|lora_down|lora_up)(?:\.default)?\.weight|(.+)\.alpha", k)
        if m is None:
            unplaced.append(key)
            continue
        module, kind = (
            (m[1], {"lora_down": "A", "lora_up": "B"}.get(m[2], m[2][-1])) if m[1] else (m[3], "alpha")
        )
        groups.setdefault(module, {})[kind] = t
    return groups, unplaced


def _part(module: str, group: dict[str, Tensor], scale: float | None, part: int | None, key: str) -> _Part:
    if "A" not in group or "B" not in group:
        raise LoraError(f"{key}: lora_A and lora_B must both be present")
    a, b = group["A"].float(), group["B"].float()
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise LoraError(
            f"{key}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not make a rank-r pair"
        )
    if scale is None:
        alpha = float(group["alpha"]) if "alpha" in group else float(a.shape[0])
        scale = alpha / a.shape[0]
    return _Part(module, part, a, b, scale)


def _bfl(tensors, stripped: dict[str, str]):
    groups, unplaced = _pairs(tensors, lambda k: stripped[k])
    return [_part(m, g, None, None, m) for m, g in groups.items()], unplaced


def _kohya(tensors, config: TransformerConfig):
    by_kohya = {"lora_unet_" + name.replace(".", "_"): name for name in lora_targets(config, shared=True)}
    groups, unplaced = _pairs(tensors, lambda k: k)
    parts = []
    skipped = []
    for module, group in groups.items():
        if module.startswith(KOHYA_TEXT_ENCODER):
            skipped.append(module)
        elif module not in by_kohya:
            unplaced.append(module)
        else:
            parts.append(_part(by_kohya[module], group, None, None, module))
    if skipped:
        log.warning(
            "%d text-encoder LoRA modules (%s%s) are not applied: klein adapts the transformer only",
            len(skipped),
            ", ".join(sorted(skipped)[:3]),
            ", ..." if len(skipped) > 3 else "",
        )
    return parts, unplaced


def _diffusers(tensors, metadata: dict[str, str]):
    config = json.loads(metadata.get("lora_adapter_metadata", "{}") or "{}")
    if any(k.startswith("transformer.") for k in config):  # a pipeline's: keys prefixed by component
        config = {
            k.removeprefix("transformer."): v for k, v in config.items() if k.startswith("transformer.")
        }
    groups, unplaced = _pairs(tensors, lambda k: k.removeprefix("transformer."))
    parts = []
    for module, group in groups.items():
        renamed = _apply_renames(module + ".weight", _DIT_RENAMES_RE).removesuffix(".weight")
        if renamed == module:  # no diffusers name of the transformer
            unplaced.append(module)
            continue
        qkv = re.fullmatch(r"(.+\.qkv)\.([qkv])", renamed)
        target, part = (qkv[1], "qkv".index(qkv[2])) if qkv else (renamed, None)
        parts.append(_part(target, group, _peft_scale(config, module, group), part, module))
    return parts, unplaced


def _peft_scale(config: dict, module: str, group: dict[str, Tensor]) -> float:
    """alpha / r as PEFT computes it from a LoraConfig (rank_pattern / alpha_pattern by module
    name); without a config, alpha = rank (diffusers' assumption)."""
    if not config:
        return 1.0
    r, alpha = config.get("r", group["A"].shape[0]), config.get("lora_alpha", config.get("r", 1))
    for pattern, value in (config.get("rank_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            r = value
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
    if config.get("use_rslora"):
        return alpha / r**0.5
    return alpha / r


def _assemble(
    parts: list[_Part], targets, config: TransformerConfig, name: str
) -> dict[str, tuple[Tensor, Tensor]]:
    """One (A, B) per module, alpha/r folded into B; separate q/k/v parts become one adapter on the
    fused qkv (A stacked, B block-diagonal over the q, k and v rows)."""
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    by_module: dict[str, list[_Part]] = {}
    for p in parts:
        by_module.setdefault(p.module, []).append(p)
    errors = []
    for module, group in sorted(by_module.items()):
        fan_in, fan_out = targets[module]
        if any(p.a.shape[1] != fan_in for p in group):
            errors.append(f"{module}: lora_A takes {group[0].a.shape[1]} inputs, the layer {fan_in}")
            continue
        if group[0].part is None:
            (p,) = group
            if p.b.shape[0] != fan_out:
                errors.append(f"{module}: lora_B gives {p.b.shape[0]} outputs, the layer {fan_out}")
                continue
            factors[module] = (p.a, p.b * p.scale)
            continue
        h = fan_out // 3
        if any(p.b.shape[0] != h for p in group):
            errors.append(f"{module}: a q/k/v lora_B gives {group[0].b.shape[0]} outputs, the layer {h} each")
            continue
        a = torch.cat([p.a for p in group])
        b = torch.zeros(fan_out, a.shape[0])
        col = 0
        for p in group:
            r = p.a.shape[0]
            b[p.part * h : (p.part + 1) * h, col : col + r] = p.b * p.scale
            col += r
        factors[module] = (a, b)
    if errors:
        raise LoraError(f"{name}: does not fit this model: " + "; ".join(errors[:MAX_LISTED]))
    return factors


# --- the slot bank ---


def enable_lora(model: nn.Module, slots: int, max_rank: int) -> int:
    """Give every LoRA-able linear of `model` a bank of `slots` adapter slots of rank `max_rank`
    (slot 0 stays empty); returns the bytes the banks take."""
    if getattr(model, "frozen_weights", False):
        raise ValueError(FREEZE_WITH_LORA)
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and "lora_A" in m._buffers and not SHARED_INPUT.match(name):
            kw = {"device": m.weight.device, "dtype": _dtype(model)}
            m.register_buffer("lora_A", torch.zeros(slots, max_rank, m.in_features, **kw), persistent=False)
            m.register_buffer("lora_B", torch.zeros(slots, m.out_features, max_rank, **kw), persistent=False)
            total += m.lora_A.numel() * m.lora_A.element_size() + m.lora_B.numel() * m.lora_B.element_size()
    if total == 0:
        raise ValueError("the model has no linear that can take a LoRA")
    return total


def _dtype(model: nn.Module) -> torch.dtype:
    return getattr(model, "dtype", next(model.parameters()).dtype)


def put_adapter(model: nn.Module, slot: int, adapter: LoraAdapter | None) -> None:
    """Write `adapter` (None: nothing) into bank slot `slot` of every LoRA-able linear."""
    if slot == 0 and adapter is not None:
        raise ValueError("slot 0 is the empty adapter")
    for name, m in model.named_modules():
        if getattr(m, "lora_A", None) is None:
            continue
        m.lora_A[slot].zero_()
        m.lora_B[slot].zero_()
        if adapter is None or name not in adapter.factors:
            continue
        a, b = adapter.factors[name]
        r, max_rank = a.shape[0], m.lora_A.shape[1]
        if r > max_rank:
            raise LoraError(f"{adapter.name}: rank {r} on {name}, over this deployment's max_rank {max_rank}")
        m.lora_A[slot, :r] = a.to(m.lora_A)
        m.lora_B[slot, :, :r] = b.to(m.lora_B)


@dataclass(frozen=True)
class LoraOptions:
    slots: int = 8  # adapters resident at once, plus the empty slot 0
    max_rank: int = 64  # adapters of higher rank are refused
    max_loras: int = MAX_LORAS  # adapters per request


class LoraBank:
    """A model's adapter slots, filled on demand and reused least-recently-used first; turns each
    request's adapters (key, scale) into the `LoraSelection` a forward takes."""

    def __init__(self, model: nn.Module, slots: int = 8, max_rank: int = 64, places: int = 3):
        """`slots` - 1 adapters resident at once (slot 0 is the empty one); `places`: adapters per
        request (fixed, so that the selection's shape never changes)."""
        if slots < places + 1:  # one request's adapters must fit at once
            raise ValueError(
                f"slots must be at least {places + 1} for {places} adapters per request, got {slots}"
            )
        self.model, self.max_rank, self.places = model, max_rank, places
        self.bytes = enable_lora(model, slots, max_rank)
        model.lora_places = places  # what warm-up (klein.fast) compiles the adapter path for
        self.resident: OrderedDict[str, int] = OrderedDict()  # adapter key -> slot, least recent first
        self.free = list(range(1, slots))
        self.hits = self.loads = 0
        self.load_seconds = 0.0

    @property
    def capacity(self) -> int:
        return len(self.free) + len(self.resident)

    def selection(
        self, requests: list[list[tuple[str, float]]], load: Callable[[str], LoraAdapter]
    ) -> LoraSelection | None:
        """requests: per request its adapters as (key, scale); `load(key)` reads one that is not
        resident. None when no request has any. LoraError when more distinct adapters are needed at
        once than there are slots (split the batch) or a request has more than `places`."""
        needed = list(dict.fromkeys(key for adapters in requests for key, _ in adapters))
        if not needed:
            return None
        if len(needed) > self.capacity:
            raise LoraError(f"a batch needs {len(needed)} adapters at once; the bank holds {self.capacity}")
        for adapters in requests:
            if len(adapters) > self.places:
                raise LoraError(f"at most {self.places} adapters per request, got {len(adapters)}")
        for key in needed:
            self._resident(key, needed, load)
        slots = torch.zeros(len(requests), self.places, dtype=torch.long)
        scales = torch.zeros(len(requests), self.places, dtype=torch.float32)
        for i, adapters in enumerate(requests):
            for j, (key, scale) in enumerate(adapters):
                slots[i, j], scales[i, j] = self.resident[key], scale
        return LoraSelection(slots, scales)

    def _resident(self, key: str, needed: list[str], load: Callable[[str], LoraAdapter]) -> None:
        if key in self.resident:
            self.resident.move_to_end(key)
            self.hits += 1
            return
        start = time.perf_counter()
        adapter = load(key)
        if self.free:
            slot = self.free.pop(0)
        else:  # the least recently used adapter this batch does not need
            victim = next(k for k in self.resident if k not in needed)
            slot = self.resident.pop(victim)
        try:
            put_adapter(self.model, slot, adapter)
        except BaseException:
            put_adapter(self.model, slot, None)
            self.free.append(slot)
            raise
        self.resident[key] = slot
        self.loads += 1
        self.load_seconds += time.perf_counter() - start

    def stats(self) -> dict:
        seconds = round(self.load_seconds, 3)
        return {
            "resident": len(self.resident),
            "slots": self.capacity,
            "hits": self.hits,
            "loads": self.loads,
            "load_seconds": seconds,
            "bytes": self.bytes,
        }
