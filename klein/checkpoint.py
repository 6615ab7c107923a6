"""Checkpoint I/O: safetensors streaming, diffusers -> BFL key maps, FP8 dequantisation, strict loading.

Formats (BFL's Hugging Face repositories and diffusers' `save_pretrained` layouts):
- BFL single files: `flux-2-klein-*.safetensors` (transformer, our module names) and `ae.safetensors`.
- FP8 single files: the BFL names, e4m3 `<layer>.weight` + scalar `<layer>.weight_scale` (+ `input_scale`).
- diffusers folders: `transformer/`, `vae/`, `text_encoder/` (sharded or not) mapped by the tables below.

Models are built on the meta device and receive their tensors with `load_state_dict(assign=True)`.
Tensors are read one at a time with plain file reads (no mmap), converted to the target dtype and
device as they arrive, so loading holds one copy of the weights plus one tensor in flight.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from klein.fp8 import FP8, FP8_MAX, is_fp8_layer, quantize_rows

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
_FORMATS = {v: k for k, v in _DTYPES.items()}
COMFY_PREFIX = "model.diffusion_model."
MAX_LISTED_KEYS = 12


class CheckpointError(ValueError):
    """A checkpoint does not match the model: names the missing, unexpected or mis-shaped keys."""


class SafetensorsFile:
    """A safetensors file read tensor by tensor into fresh memory (no mmap, no second copy)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: not a safetensors file ({len(head)} bytes long)")
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000:
                raise CheckpointError(f"{self.path}: not a safetensors file (header of {n} bytes)")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:  # UnicodeDecodeError and JSONDecodeError alike
                raise CheckpointError(f"{self.path}: not a safetensors file (header: {e})") from None
            if not isinstance(header, dict):
                raise CheckpointError(f"{self.path}: not a safetensors file (header is not a JSON object)")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.entries: dict[str, dict] = header
        self._data_start = 8 + n

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return _DTYPES[self.entries[key]["dtype"]]

    def read(self, key: str) -> Tensor:
        e = self.entries[key]
        start, end = e["data_offsets"]
        buf = torch.empty(end - start, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(self._data_start + start)
            if f.readinto(memoryview(buf.numpy())) != end - start:
                raise CheckpointError(f"{self.path}: truncated data for {key!r}")
        return buf.view(_DTYPES[e["dtype"]]).reshape(e["shape"])


def save_safetensors(tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None):
    """Write tensors in the safetensors format, streaming one tensor at a time."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _FORMATS[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors.values():
            f.write(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())


def weight_files(folder: Path, stem: str) -> list[Path]:
    """`<stem>.safetensors`, or the shards named by `<stem>.safetensors.index.json`."""
    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    if single.exists():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"no safetensors weights in {folder}")
    return found


def read_shapes(files: Iterable[Path]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for path in files:
        f = SafetensorsFile(path)
        shapes.update({_strip(k): f.shape(k) for k in f.entries})
    return shapes


def _strip(key: str) -> str:
    return key.removeprefix(COMFY_PREFIX)


def fp8_layers(files: Iterable[Path]) -> list[str]:
    """The layers stored in FP8 with a scale (`<layer>.weight` + `<layer>.weight_scale`)."""
    keys = {_strip(k) for path in files for k in SafetensorsFile(path).entries}
    return sorted(k.removesuffix(".weight_scale") for k in keys if k.endswith(".weight_scale"))


def read_state_dict(
    files: Iterable[Path],
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    rename: Callable[[str], str | None] = lambda k: k,
    keep_fp8: bool = False,
    quantize: Callable[[str], bool] | None = None,
) -> dict[str, Tensor]:
    """Read every tensor that `rename` keeps, cast floating tensors to `dtype` on `device`.

    FP8 layers (`<layer>.weight` e4m3 + `<layer>.weight_scale`) are dequantised to `dtype`, or with
    `keep_fp8` stay e4m3, their scale expanded to one float32 per output row (klein.fp8's form).
    `input_scale` (a calibrated static activation scale) is not used: activations are scaled per
    token as they come. `quantize` names (after `rename`) the layers whose full-precision weight is
    turned into that form as it is read, so no more than one such weight is ever held at full size.
    """

    sd: dict[str, Tensor] = {}
    for path in files:
        f = SafetensorsFile(path)
        keys = {_strip(k): k for k in f.entries}
        for key, raw in keys.items():
            if key.endswith((".weight_scale", ".input_scale")) and key.rsplit(".", 1)[0] + ".weight" in keys:
                continue
            name = rename(key)
            if name is None:
                continue
            t = f.read(raw)
            scale_key = key.removesuffix(".weight") + ".weight_scale"
            if key.endswith(".weight") and scale_key in keys:
                scale = f.read(keys[scale_key]).float().reshape(-1)
                if scale.numel() not in (1, t.shape[0]):
                    raise CheckpointError(
                        f"{path}: {scale_key} must be a scalar or one per row, got {scale.numel()} values"
                    )
                if keep_fp8 and t.dtype == FP8:
                    sd[name] = t.to(device)
                    sd[name.removesuffix(".weight") + ".weight_scale"] = (
                        scale.expand(t.shape[0]).contiguous().to(device)
                    )
                    continue
                t = t.to(device).float().mul_(scale.to(device).reshape(-1, *[1] * (t.ndim - 1)))
            if t.is_floating_point():
                t = t.to(device=device, dtype=dtype)
            else:
                t = t.to(device)
            if quantize is not None and name.endswith(".weight") and quantize(name.removesuffix(".weight")):
                t, sd[name.removesuffix(".weight") + ".weight_scale"] = quantize_rows(t)
            sd[name] = t
    return sd


def load_into(module: nn.Module, sd: dict[str, Tensor], source: str) -> None:
    """Strictly assign `sd` to a module built on the meta device; one error names every mismatch."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    for k in expected:  # BatchNorm's step counter is not model state; old checkpoints omit it
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = torch.zeros((), dtype=torch.long)
    missing = sorted(k for k in expected if k not in sd)
    unexpected = sorted(k for k in sd if k not in expected)
    wrong = sorted(
        f"{k} {tuple(sd[k].shape)} (model {expected[k]})"
        for k in expected
        if k in sd and tuple(sd[k].shape) != expected[k]
    )
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                more = f" (+{len(keys) - MAX_LISTED_KEYS} more)" if len(keys) > MAX_LISTED_KEYS else ""
                parts.append(f"{len(keys)} {label} keys: {', '.join(keys[:MAX_LISTED_KEYS])}{more}")
        raise CheckpointError(f"{source} does not match {type(module).__name__}: " + "; ".join(parts))
    module.load_state_dict(sd, strict=True, assign=True)


# --- diffusers -> BFL: transformer (diffusers' convert_flux2_transformer_checkpoint_to_diffusers, inverted) ---

_DIT_RENAMES = [
    (r"^x_embedder\.", "img_in."),
    (r"^context_embedder\.", "txt_in."),
    (r"^time_guidance_embed\.timestep_embedder\.linear_1\.", "time_in.in_layer."),
    (r"^time_guidance_embed\.timestep_embedder\.linear_2\.", "time_in.out_layer."),
    (
        r"^(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\.linear\.",
        r"\1.lin.",
    ),
    (r"^proj_out\.", "final_layer.linear."),
    (r"^norm_out\.linear\.", "final_layer.adaLN_modulation.1."),
    (
        r"^transformer_blocks\.(\d+)\.attn\.norm_q\.weight$",
        r"double_blocks.\1.img_attn.norm.query_norm.scale",
    ),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_k\.weight$", r"double_blocks.\1.img_attn.norm.key_norm.scale"),
    (
        r"^transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight$",
        r"double_blocks.\1.txt_attn.norm.query_norm.scale",
    ),
    (
        r"^transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight$",
        r"double_blocks.\1.txt_attn.norm.key_norm.scale",
    ),
    (r"^transformer_blocks\.(\d+)\.attn\.to_out\.0\.", r"double_blocks.\1.img_attn.proj."),
    (r"^transformer_blocks\.(\d+)\.attn\.to_add_out\.", r"double_blocks.\1.txt_attn.proj."),
    (r"^transformer_blocks\.(\d+)\.ff\.linear_in\.", r"double_blocks.\1.img_mlp.0."),
    (r"^transformer_blocks\.(\d+)\.ff\.linear_out\.", r"double_blocks.\1.img_mlp.2."),
    (r"^transformer_blocks\.(\d+)\.ff_context\.linear_in\.", r"double_blocks.\1.txt_mlp.0."),
    (r"^transformer_blocks\.(\d+)\.ff_context\.linear_out\.", r"double_blocks.\1.txt_mlp.2."),
    (r"^transformer_blocks\.(\d+)\.attn\.to_([qkv])\.", r"double_blocks.\1.img_attn.qkv.\2."),
    (r"^transformer_blocks\.(\d+)\.attn\.add_([qkv])_proj\.", r"double_blocks.\1.txt_attn.qkv.\2."),
    (r"^single_transformer_blocks\.(\d+)\.attn\.to_qkv_mlp_proj\.", r"single_blocks.\1.linear1."),
    (r"^single_transformer_blocks\.(\d+)\.attn\.to_out\.", r"single_blocks.\1.linear2."),
    (r"^single_transformer_blocks\.(\d+)\.attn\.norm_q\.weight$", r"single_blocks.\1.norm.query_norm.scale"),
    (r"^single_transformer_blocks\.(\d+)\.attn\.norm_k\.weight$", r"single_blocks.\1.norm.key_norm.scale"),
]
_DIT_RENAMES_RE = [(re.compile(p), r) for p, r in _DIT_RENAMES]


def _apply_renames(key: str, table) -> str:
    for pattern, repl in table:
        new, n = pattern.subn(repl, key)
        if n:
            return new
    return key  # unknown keys pass through and are reported as unexpected


def transformer_layer_from_diffusers(name: str) -> str:
    """A diffusers transformer layer's name -> the BFL layer it becomes part of (q, k and v: the qkv)."""
    bfl = _apply_renames(f"{name}.weight", _DIT_RENAMES_RE).removesuffix(".weight")
    return re.sub(r"(_attn\.qkv)\.[qkv]$", r"\1", bfl)


def transformer_from_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers `Flux2Transformer2DModel` state dict -> BFL names (fuses q/k/v, un-swaps norm_out)."""
    out = {_apply_renames(k, _DIT_RENAMES_RE): v for k, v in sd.items()}
    for key in [k for k in out if re.search(r"_attn\.qkv\.q\.weight$", k)]:
        base = key.removesuffix(".q.weight")
        parts = [out.pop(f"{base}.{p}.weight", None) for p in "qkv"]
        if any(p is None for p in parts):
            raise CheckpointError(f"diffusers transformer: incomplete q/k/v projections for {base}")
        out[f"{base}.weight"] = torch.cat(parts)  # rows [q; k; v]
        scales = [out.pop(f"{base}.{p}.weight_scale", None) for p in "qkv"]
        if all(s is not None for s in scales):  # quantised as read: one scale per row, so rows concatenate
            out[f"{base}.weight_scale"] = torch.cat(scales)
    w = out.get("final_layer.adaLN_modulation.1.weight")
    if w is not None:  # diffusers' AdaLayerNormContinuous chunks (scale, shift); BFL (shift, scale)
        scale, shift = w.chunk(2)
        out["final_layer.adaLN_modulation.1.weight"] = torch.cat((shift, scale))
    return out


# --- diffusers -> BFL: autoencoder (diffusers' AutoencoderKLFlux2 naming, inverted) ---

_VAE_COMMON = [
    (r"^quant_conv\.", "encoder.quant_conv."),
    (r"^post_quant_conv\.", "decoder.post_quant_conv."),
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_([qkv])\.", r"\1.mid.attn_1.\2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
]
_VAE_COMMON_RE = [(re.compile(p), r) for p, r in _VAE_COMMON]
_UP_RE = re.compile(r"^decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.")


def vae_from_diffusers(sd: dict[str, Tensor], num_levels: int) -> dict[str, Tensor]:
    """diffusers `AutoencoderKLFlux2` state dict -> BFL `ae.safetensors` names.

    diffusers' up_blocks run in application order (lowest resolution first); BFL's `up` is indexed by
    resolution level, so up_blocks.i -> up.(n-1-i). Attention projections become 1x1 convs.
    """
    out = {}
    for key, t in sd.items():
        m = _UP_RE.match(key)
        if m:
            level = num_levels - 1 - int(m[1])
            inner = f"block.{m[3]}" if m[3] is not None else "upsample"
            new = f"decoder.up.{level}.{inner}." + key[m.end() :]
        else:
            new = _apply_renames(key, _VAE_COMMON_RE)
        new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        if re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", new) and t.ndim == 2:
            t = t[:, :, None, None]
        out[new] = t
    return out


# --- writing ---


def quantize_fp8(state_dict: dict[str, Tensor], layers: Callable[[str], bool]) -> dict[str, Tensor]:
    """Per-tensor scaled float8_e4m3fn for the weights of `layers`: `<layer>.weight` in e4m3 and
    `<layer>.weight_scale` (float32 scalar), the layout of BFL's FP8 releases (weight-only: no
    calibrated `input_scale` is written)."""
    out = {}
    for key, t in state_dict.items():
        name = key.removesuffix(".weight")
        if key.endswith(".weight") and layers(name):
            w = t.float()
            scale = (w.abs().max() / FP8_MAX).clamp(min=1e-12)
            out[key] = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            out[f"{name}.weight_scale"] = scale.reshape(())
        else:
            out[key] = t
    return out


def save_fp8_transformer(state_dict: dict[str, Tensor], path: str | Path) -> None:
    sd = quantize_fp8(state_dict, is_fp8_layer)
    layers = {
        k.removesuffix(".weight_scale"): {"format": "float8_e4m3fn"} for k in sd if k.endswith("_scale")
    }
    save_safetensors(sd, path, metadata={"_quantization_metadata": json.dumps({"layers": layers})})
