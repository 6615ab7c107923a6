"""Where a model's weights come from, what the checkpoint says about it, and how each component is built.

A `ModelSource` is a picklable description (a spec plus file paths, or a random seed for the tiny
presets); each serving stage builds only its own component from it. Architecture sizes, the text
layers and the guidance mode are read from the checkpoint (config.json, tensor shapes,
`model_index.json` `is_distilled`, BFL file names); a preset only fills in what files cannot say.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from klein.checkpoint import (
    CheckpointError,
    fp8_layers,
    load_into,
    read_shapes,
    read_state_dict,
    transformer_from_diffusers,
    transformer_layer_from_diffusers,
    vae_from_diffusers,
    weight_files,
)
from klein.config import (
    BASE,
    DISTILLED,
    PRESETS,
    TEXT_TAPS,
    ModelSpec,
    SamplingDefaults,
    TextEncoderConfig,
    TransformerConfig,
    VAEConfig,
)
from klein.fp8 import fp8_unsupported_reason, is_fp8_layer, log_once, quantize_linears
from klein.hub import HubError, HubId, download, fetch_model, parse_hub_id
from klein.text_embedder import TextEmbedder, build_tiny_tokenizer
from klein.transformer import Flux2
from klein.vae import AutoEncoder

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Component:
    files: tuple[Path, ...]
    layout: str  # "bfl" | "diffusers" | "hf"


@dataclass(frozen=True)
class ModelSource:
    spec: ModelSpec
    transformer: Component | None = None  # None: random weights from spec.random_seed
    vae: Component | None = None
    text_encoder: Component | None = None
    tokenizer: Path | None = None
    origin: tuple[HubId, ...] = ()  # the hub repositories (pinned to commits) the files came from

    @classmethod
    def from_name(cls, name: str, base: str | None = None, preset: str | None = None) -> ModelSource:
        """A model by name: a local diffusers folder (or folder of BFL files), a local transformer
        file, or a hub id `org/name[@revision]` (downloaded into the cache)."""
        path = Path(name).expanduser()
        if path.is_dir():
            return cls.from_paths(path, preset=preset)
        if path.is_file():
            return cls.from_paths(transformer=path, preset=preset)
        try:
            return cls.from_hub(name, base, preset)
        except HubError as e:  # it may have been meant as a path: say that there is none
            raise HubError(f"{e} (and there is no local folder or file {name!r})") from None

    @classmethod
    def from_hub(
        cls, model: str | HubId, base: str | HubId | None = None, preset: str | None = None
    ) -> ModelSource:
        """A model by hub id `org/name[@revision]` (klein.hub): its files found in the cache or
        downloaded into it, then resolved as a local folder is. `base`: the bf16 repository an FP8
        repository's text encoder, tokenizer and VAE come from (the official ones are known)."""
        found = fetch_model(_hub_id(model), _hub_id(base) if base is not None else None)
        source = _resolve(found.weights, found.transformer, None, None, preset)
        spec = source.spec
        if not any(p.name == spec.name for p in PRESETS.values()):  # not a snapshot folder's hash
            spec = replace(spec, name=_hub_name(found.snapshots[0].hub_id.repo))
        return replace(source, spec=spec, origin=tuple(s.pinned() for s in found.snapshots))

    def local(self, part: str) -> ModelSource:
        """This source with `part`'s files (transformer, vae, or text_encoder and the tokenizer) on
        this machine: a hub model's are downloaded here, at the same commit and only those files,
        when this node has not got them (a replica on another node than the one that resolved it).
        """
        component = getattr(self, part)
        extra = [self.tokenizer] if part == "text_encoder" and self.tokenizer is not None else []
        files = [*component.files, *extra] if component is not None else []
        if not self.origin or all(f.exists() for f in files):
            return self
        log.info("%s of %s not on this node: fetching it", part, ", ".join(map(str, self.origin)))
        where = {f: _in_snapshot(f) for f in files}  # file -> (commit, path in the repository)
        moved = {}
        for commit in {sha for sha, _ in where.values()}:
            repo = next(o for o in self.origin if o.revision == commit)
            wanted = [rel if f.suffix else f"{rel}/*" for f, (sha, rel) in where.items() if sha == commit]
            folder = download(repo, wanted).folder
            moved |= {f: folder / rel for f, (sha, rel) in where.items() if sha == commit}
        here = {part: replace(component, files=tuple(moved[f] for f in component.files))}
        if extra:
            here["tokenizer"] = moved[self.tokenizer]
        return replace(self, **here)

    @classmethod
    def preset(cls, name: str) -> ModelSource:
        spec = cls.preset_spec(name)
        if spec.random_seed is None:
            raise ValueError(f"preset {name!r} needs weights: give a weights folder or files")
        return cls(spec)

    @classmethod
    def random_weights(cls, name: str, seed: int = 0) -> ModelSource:
        """Any preset with random weights: real sizes for benchmarks, no checkpoint needed."""
        return cls(replace(cls.preset_spec(name), random_seed=seed))

    @staticmethod
    def preset_spec(name: str) -> ModelSpec:
        spec = PRESETS.get(name)
        if spec is None:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return spec

    @classmethod
    def from_paths(
        cls,
        weights: str | Path | None = None,
        transformer: str | Path | None = None,
        vae: str | Path | None = None,
        text_encoder: str | Path | None = None,
        preset: str | None = None,
    ) -> ModelSource:
        """Resolve a diffusers folder and/or BFL single files into components and a spec."""
        return _resolve(weights, transformer, vae, text_encoder, preset)

    def load_transformer(self, device="cpu", dtype=torch.float32, quantize: str | None = None) -> Flux2:
        """`quantize="fp8"`: block linears in FP8 as they are read (see `load_transformer`); random
        weights are drawn at full precision (klein.fast quantises them after)."""
        if self.transformer is None:
            return _random(Flux2, self.spec.transformer, self.spec.random_seed, device, dtype)
        t = self.local("transformer").transformer
        return load_transformer(t, self.spec.transformer, device, dtype, quantize=quantize)

    def load_vae(self, device="cpu", dtype=torch.float32) -> AutoEncoder:
        if self.vae is None:
            return _random(AutoEncoder, self.spec.vae, self.spec.random_seed + 1, device, dtype)
        return load_vae(self.local("vae").vae, self.spec.vae, device, dtype)

    def load_text_embedder(self, device="cpu", dtype=torch.float32) -> TextEmbedder:
        cfg = self.spec.text
        if self.text_encoder is None:
            return _random(
                lambda c: TextEmbedder(c, build_tiny_tokenizer()),
                cfg,
                self.spec.random_seed + 2,
                device,
                dtype,
            )
        from transformers import AutoTokenizer

        here = self.local("text_encoder")
        tokenizer = AutoTokenizer.from_pretrained(str(here.tokenizer), local_files_only=True)
        with torch.device("meta"):
            embedder = TextEmbedder(cfg, tokenizer)
        n_layers = embedder.model.config.num_hidden_layers

        def rename(key: str) -> str | None:  # keep the embeddings and the layers up to the last tap
            key = key.removeprefix("model.")
            m = re.match(r"layers\.(\d+)\.", key)
            unused = ("lm_head.",) if cfg.final_norm else ("lm_head.", "norm.")
            if key.startswith(unused) or (m and int(m[1]) >= n_layers):
                return None
            return key

        sd = read_state_dict(here.text_encoder.files, dtype, device, rename)
        load_into(embedder.model, sd, _describe(here.text_encoder))
        embedder.reset_buffers()
        return embedder.eval().requires_grad_(False)


def _in_snapshot(path: Path) -> tuple[str, str]:
    """A file of the hub cache -> (the commit of its snapshot, its path in the repository)."""
    parts = path.parts
    i = len(parts) - 1 - parts[::-1].index("snapshots")
    return parts[i + 1], "/".join(parts[i + 2 :])


def _hub_name(repo: str) -> str:
    """A model's name from its repository's: black-forest-labs/FLUX.2-klein-4B -> klein-4b."""
    return repo.split("/")[-1].lower().replace(".", "-").removeprefix("flux-2-")


def _hub_id(name: str | HubId) -> HubId:
    if isinstance(name, HubId):
        return name
    hub_id = parse_hub_id(name)
    if hub_id is None:
        raise HubError(f"{name!r} is neither an existing path nor a hub id (org/name[@revision])")
    return hub_id


def _describe(c: Component) -> str:
    return c.files[0].parent.as_posix() if len(c.files) > 1 else c.files[0].as_posix()


def load_transformer(
    c: Component, config: TransformerConfig, device="cpu", dtype=torch.float32, quantize: str | None = None
) -> Flux2:
    """Build on the meta device and assign the checkpoint's tensors, converted as they are read.

    An FP8 checkpoint's layers stay FP8 (klein.fp8) where the device runs FP8 GEMMs; elsewhere they
    are dequantised to `dtype` (said once in the log). `quantize="fp8"` turns a full-precision
    checkpoint's block linears into FP8 as they are read, where the device runs FP8 GEMMs, so the
    load never holds more than one of them at full size (elsewhere klein.fast says why not)."""
    model = _on_meta(Flux2, config)
    stored = fp8_layers(c.files) if c.layout == "bfl" else []
    keep = False
    if stored:
        reason = fp8_unsupported_reason(device)
        keep = reason is None
        if keep:
            quantize_linears(model, set(stored).__contains__)
        else:
            log_once(f"{_describe(c)} is FP8 but {reason}: its weights are dequantised to {dtype}")
    as_read = None
    if quantize == "fp8" and not stored and fp8_unsupported_reason(device) is None:
        quantize_linears(model)

        def as_read(name: str) -> bool:  # a layer as the file names it
            return is_fp8_layer(transformer_layer_from_diffusers(name) if c.layout == "diffusers" else name)

    sd = read_state_dict(c.files, dtype, device, keep_fp8=keep, quantize=as_read)
    if c.layout == "diffusers":
        sd = transformer_from_diffusers(sd)
    load_into(model, sd, _describe(c))
    return model.eval().requires_grad_(False)


def load_vae(c: Component, config: VAEConfig, device="cpu", dtype=torch.float32) -> AutoEncoder:
    model = _on_meta(AutoEncoder, config)
    sd = read_state_dict(c.files, dtype, device)
    if c.layout == "diffusers":
        sd = vae_from_diffusers(sd, len(config.decoder_channels))
    for k in ("bn.running_mean", "bn.running_var"):  # statistics stay float32 whatever the dtype
        if k in sd:
            sd[k] = sd[k].float()
    load_into(model, sd, _describe(c))
    return model.eval().requires_grad_(False)


def _on_meta(cls, config) -> nn.Module:
    with torch.device("meta"):
        return cls(config)


SMALL_MODEL = 50_000_000  # parameters


def _random(build, config, seed: int, device, dtype) -> nn.Module:
    """Random weights from `seed`. Small models (the tiny presets) are drawn on the CPU, so every
    process on every device gets the same weights; real sizes (benchmarks) are drawn directly on
    the device in `dtype`, which is much faster."""
    with torch.device("meta"):
        n = sum(p.numel() for p in build(config).parameters())
    device = torch.device(device)
    on_device = n > SMALL_MODEL and device.type != "cpu"
    with torch.random.fork_rng(devices=[device] if on_device else [], device_type=device.type):
        torch.manual_seed(seed)
        if on_device:
            default = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            try:
                with device:
                    model = build(config)
            finally:
                torch.set_default_dtype(default)
        else:
            model = build(config)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


# --- resolving paths and reading the spec from the checkpoint ---


def _resolve(weights, transformer, vae, text_encoder, preset) -> ModelSource:
    hint = PRESETS.get(preset) if preset else None
    if preset and hint is None:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    root = Path(weights) if weights else None
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"weights folder {root} does not exist")
    index = (
        json.loads((root / "model_index.json").read_text())
        if root and (root / "model_index.json").exists()
        else {}
    )

    # transformer: explicit file > diffusers transformer/ > BFL single file in the folder
    if transformer:
        t = Component((Path(transformer),), "bfl")
    elif root and (root / "transformer").is_dir():
        t = Component(tuple(weight_files(root / "transformer", "diffusion_pytorch_model")), "diffusers")
    elif root and (found := sorted(root.glob("flux-2-klein*.safetensors"))):
        t = Component((found[0],), "bfl")
    else:
        raise FileNotFoundError(
            "no transformer weights: give a diffusers folder or a flux-2-klein-*.safetensors file"
        )
    for f in t.files:
        if not f.is_file():
            raise FileNotFoundError(f"transformer weights {f} do not exist")

    # VAE: explicit file > diffusers vae/ > ae.safetensors beside the transformer or in the folder
    if vae:
        v = Component((Path(vae),), "bfl")
    elif root and (root / "vae").is_dir():
        v = Component(tuple(weight_files(root / "vae", "diffusion_pytorch_model")), "diffusers")
    elif ae := next(
        (p / "ae.safetensors" for p in (root, t.files[0].parent) if p and (p / "ae.safetensors").exists()),
        None,
    ):
        v = Component((ae,), "bfl")
    else:
        raise FileNotFoundError("no VAE weights: give a diffusers folder with vae/ or an ae.safetensors file")
    if not v.files[0].is_file():
        raise FileNotFoundError(f"VAE weights {v.files[0]} do not exist")

    # text encoder: explicit folder > text_encoder/ in the weights folder or beside the transformer file
    te_dir = Path(text_encoder) if text_encoder else None
    if te_dir is None:
        te_dir = next(
            (p / "text_encoder" for p in (root, t.files[0].parent) if p and (p / "text_encoder").is_dir()),
            None,
        )
    if te_dir is None or not te_dir.is_dir():
        raise FileNotFoundError(
            "no text encoder: give a folder with text_encoder/ (Qwen3) or a text encoder folder"
        )
    te = Component(tuple(weight_files(te_dir, "model")), "hf")
    tok = te_dir.parent / "tokenizer" if (te_dir.parent / "tokenizer").is_dir() else te_dir

    dit = transformer_config(t)
    text = _text_config(te_dir, dit)
    spec = ModelSpec(
        name="custom",
        transformer=dit,
        vae=_vae_config(v),
        text=text,
        sampling=_sampling(index, t, hint),
    )
    if hint is not None and hint.transformer != dit:
        raise CheckpointError(f"preset {preset!r} does not match the checkpoint's transformer {dit}")
    spec = replace(spec, name=_name(spec, root, t))
    log.info(
        "model %s from %s (%s)", spec.name, _describe(t), "distilled" if not spec.sampling.cfg else "base"
    )
    return ModelSource(spec, t, v, te, tok)


def _sampling(index: dict, t: Component, hint: ModelSpec | None) -> SamplingDefaults:
    if "is_distilled" in index:
        return DISTILLED if index["is_distilled"] else BASE
    if index.get("_class_name") == "Flux2KleinPipeline":
        return BASE  # the pipeline's default: Base repos omit the flag
    stem = t.files[0].name
    if t.layout == "bfl" and stem.startswith("flux-2-klein"):
        return BASE if "-base-" in stem else DISTILLED
    if hint is not None:
        return hint.sampling
    raise CheckpointError(
        f"{stem}: cannot tell a distilled from a Base model (no model_index.json, not a flux-2-klein-* "
        "file name); name a preset"
    )


def _name(spec: ModelSpec, root: Path | None, t: Component) -> str:
    for p in PRESETS.values():
        if (p.transformer, p.sampling.cfg) == (spec.transformer, spec.sampling.cfg) and p.random_seed is None:
            return p.name
    return (root.name if root else t.files[0].stem).lower()


def transformer_config(t: Component) -> TransformerConfig:
    if t.layout == "diffusers":
        cfg = json.loads((t.files[0].parent / "config.json").read_text())
        if cfg.get("guidance_embeds"):
            raise CheckpointError(
                f"{_describe(t)}: has a guidance embedding (FLUX.2 dev?), not a klein model"
            )
        return TransformerConfig(
            in_channels=cfg["in_channels"],
            hidden_size=cfg["num_attention_heads"] * cfg["attention_head_dim"],
            num_heads=cfg["num_attention_heads"],
            depth=cfg["num_layers"],
            depth_single_blocks=cfg["num_single_layers"],
            context_in_dim=cfg["joint_attention_dim"],
            mlp_ratio=cfg.get("mlp_ratio", 3.0),
            axes_dim=tuple(cfg.get("axes_dims_rope", (32, 32, 32, 32))),
            theta=cfg.get("rope_theta", 2000),
        )
    s = read_shapes(t.files)
    need = ["img_in.weight", "txt_in.weight", "single_blocks.0.norm.query_norm.scale"]
    if absent := [k for k in need if k not in s]:
        raise CheckpointError(f"{_describe(t)}: not a FLUX.2 transformer; missing keys: {', '.join(absent)}")
    if "guidance_in.in_layer.weight" in s:
        raise CheckpointError(f"{_describe(t)}: has guidance_in (FLUX.2 dev?), not a klein model")
    hidden, in_channels = s["img_in.weight"]
    head_dim = s["single_blocks.0.norm.query_norm.scale"][0]
    count = lambda prefix: len({k.split(".")[1] for k in s if k.startswith(prefix)})  # noqa: E731
    mlp_hidden = s["single_blocks.0.linear2.weight"][1] - hidden
    return TransformerConfig(
        in_channels=in_channels,
        hidden_size=hidden,
        num_heads=hidden // head_dim,
        depth=count("double_blocks."),
        depth_single_blocks=count("single_blocks."),
        context_in_dim=s["txt_in.weight"][1],
        mlp_ratio=mlp_hidden / hidden,
        axes_dim=(head_dim // 4,) * 4,
    )


def _vae_config(v: Component) -> VAEConfig:
    if v.layout == "diffusers":
        cfg = json.loads((v.files[0].parent / "config.json").read_text())
        dec = cfg.get("decoder_block_out_channels")
        return VAEConfig(
            block_out_channels=tuple(cfg["block_out_channels"]),
            decoder_block_out_channels=tuple(dec) if dec else None,
            layers_per_block=cfg["layers_per_block"],
            z_channels=cfg["latent_channels"],
            norm_groups=cfg["norm_num_groups"],
            in_channels=cfg["in_channels"],
            out_channels=cfg["out_channels"],
            use_quant_conv=cfg.get("use_quant_conv", True),
            use_post_quant_conv=cfg.get("use_post_quant_conv", True),
            bn_eps=cfg.get("batch_norm_eps", 1e-4),
        )
    s = read_shapes(v.files)
    if "encoder.conv_in.weight" not in s or "decoder.conv_in.weight" not in s:
        raise CheckpointError(f"{_describe(v)}: not a FLUX.2 autoencoder (no encoder/decoder conv_in)")
    levels = len({k.split(".")[2] for k in s if k.startswith("encoder.down.")})
    enc = tuple(s[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels))
    dec = tuple(s[f"decoder.up.{i}.block.0.conv1.weight"][0] for i in range(levels))
    return VAEConfig(  # GroupNorm's group count is not in the weights: FLUX.2 uses 32
        block_out_channels=enc,
        decoder_block_out_channels=dec if dec != enc else None,
        layers_per_block=len({k.split(".")[4] for k in s if k.startswith("encoder.down.0.block.")}),
        z_channels=s["decoder.conv_in.weight"][1],
        in_channels=s["encoder.conv_in.weight"][1],
        out_channels=s["decoder.conv_out.weight"][0],
        use_quant_conv="encoder.quant_conv.weight" in s,
        use_post_quant_conv="decoder.post_quant_conv.weight" in s,
    )


def _text_config(folder: Path, dit: TransformerConfig) -> TextEncoderConfig:
    cfg = json.loads((folder / "config.json").read_text())
    hidden, n_layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    if n_layers < max(TEXT_TAPS):
        raise CheckpointError(
            f"{folder}: the text encoder has {n_layers} layers; FLUX.2 [klein] reads hidden states "
            f"{', '.join(map(str, TEXT_TAPS))}, so it needs at least {max(TEXT_TAPS)}"
        )
    if dit.context_in_dim != len(TEXT_TAPS) * hidden:
        raise CheckpointError(
            f"{folder}: {len(TEXT_TAPS)} hidden states of size {hidden} make {len(TEXT_TAPS) * hidden} "
            f"features per token, but the transformer reads {dit.context_in_dim}"
        )
    rope_theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 1e6)
    return TextEncoderConfig(
        hidden_size=hidden,
        num_layers=n_layers,
        num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        head_dim=cfg.get("head_dim") or hidden // cfg["num_attention_heads"],
        intermediate_size=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        rope_theta=float(rope_theta),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        max_position_embeddings=cfg.get("max_position_embeddings", 40960),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
    )
