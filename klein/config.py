"""Model configurations and named variants of FLUX.2 [klein].

Sizes follow BFL's `Klein4BParams` / `Klein9BParams` (flux2 `model.py`), the FLUX.2 autoencoder
(`AutoEncoderParams`) and the Qwen3-4B / Qwen3-8B configs (Hugging Face `config.json` of Qwen/Qwen3-4B, -8B).
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class TransformerConfig:
    in_channels: int
    hidden_size: int
    num_heads: int
    depth: int  # double-stream blocks
    depth_single_blocks: int
    context_in_dim: int  # = len(text layers) * text hidden size
    mlp_ratio: float = 3.0
    axes_dim: tuple[int, ...] = (32, 32, 32, 32)
    theta: int = 2000

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}"
            )
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"sum(axes_dim) {sum(self.axes_dim)} must equal head_dim {self.head_dim}")
        if any(d % 2 for d in self.axes_dim):
            raise ValueError(f"every RoPE axis dim must be even, got {self.axes_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


@dataclass(frozen=True, slots=True)
class VAEConfig:
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2  # encoder; the decoder has one more per level
    z_channels: int = 32
    norm_groups: int = 32
    in_channels: int = 3
    out_channels: int = 3
    decoder_block_out_channels: tuple[int, ...] | None = None  # None: same as the encoder
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    bn_eps: float = 1e-4

    def __post_init__(self):
        for c in (*self.block_out_channels, *(self.decoder_block_out_channels or ())):
            if c % self.norm_groups:
                raise ValueError(f"VAE channels {c} must be divisible by norm_groups {self.norm_groups}")

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        return self.decoder_block_out_channels or self.block_out_channels

    @property
    def latent_channels(self) -> int:
        """Channels of the packed latent the transformer sees (2x2 patchify)."""
        return 4 * self.z_channels

    @property
    def pixels_per_token(self) -> int:
        """Side of the square of pixels behind one latent token: VAE downscale x 2 (patchify)."""
        return 2 ** (len(self.block_out_channels) - 1) * 2


# The hidden states FLUX.2 [klein] reads from its Qwen3 text encoder (HF `hidden_states` indices:
# 0 is the token embeddings, k the output of decoder layer k), whatever the encoder's depth: BFL's
# `Qwen3Embedder` and diffusers' `Flux2KleinPipeline` (`text_encoder_out_layers`) fix them.
TEXT_TAPS = (9, 18, 27)


@dataclass(frozen=True, slots=True)
class TextEncoderConfig:
    """A Qwen3 decoder used as a feature extractor; `layers` are HF `hidden_states` indices.

    `num_layers` is the checkpoint's depth; only the layers up to the deepest tap are built. When
    the deepest tap is the last layer, HF's last hidden state (and so the tap) is after the final
    norm (`final_norm`)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    layers: tuple[int, ...] = TEXT_TAPS
    max_length: int = 512
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False

    def __post_init__(self):
        if not self.layers or max(self.layers) > self.num_layers or min(self.layers) < 0:
            raise ValueError(f"text layers {self.layers} must lie in [0, {self.num_layers}]")

    @property
    def out_dim(self) -> int:
        return len(self.layers) * self.hidden_size

    @property
    def final_norm(self) -> bool:
        return max(self.layers) == self.num_layers


@dataclass(frozen=True, slots=True)
class SamplingDefaults:
    """How a variant samples: distilled models run `steps` single passes; Base models run CFG."""

    steps: int
    max_steps: int
    guidance: float | None  # None: guidance-distilled, no CFG and no guidance input
    min_guidance: float = 1.0
    max_guidance: float = 20.0
    inpaint_guidance: float | None = None  # the default with a mask (diffusers' inpaint pipeline's)

    @property
    def cfg(self) -> bool:
        return self.guidance is not None


DISTILLED = SamplingDefaults(steps=4, max_steps=50, guidance=None)
# guidance: the defaults of diffusers' Flux2KleinPipeline (4) and Flux2KleinInpaintPipeline (8)
BASE = SamplingDefaults(steps=50, max_steps=100, guidance=4.0, inpaint_guidance=8.0)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    transformer: TransformerConfig
    vae: VAEConfig
    text: TextEncoderConfig
    sampling: SamplingDefaults
    max_references: int = 4
    reference_max_pixels: int = 1024 * 1024  # per reference, after the server-side resize
    min_side: int = 64
    max_side: int = 2048
    max_pixels: int = 2048 * 2048
    default_size: int = 1024  # width and height when a request gives neither nor a reference
    random_seed: int | None = None  # set: weights are random, drawn from this seed (tiny presets)

    def __post_init__(self):
        if self.transformer.in_channels != self.vae.latent_channels:
            raise ValueError(
                f"transformer in_channels {self.transformer.in_channels} != 4 * VAE z_channels "
                f"{self.vae.latent_channels}"
            )
        if self.transformer.context_in_dim != self.text.out_dim:
            raise ValueError(
                f"transformer context_in_dim {self.transformer.context_in_dim} != "
                f"{len(self.text.layers)} text layers x hidden {self.text.hidden_size}"
            )

    @property
    def multiple(self) -> int:
        return self.vae.pixels_per_token


QWEN3_4B = TextEncoderConfig(
    hidden_size=2560, num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
    intermediate_size=9728, vocab_size=151936, tie_word_embeddings=True,
)  # fmt: skip
QWEN3_8B = TextEncoderConfig(
    hidden_size=4096, num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
    intermediate_size=12288, vocab_size=151936, tie_word_embeddings=False,
)  # fmt: skip

KLEIN_4B_DIT = TransformerConfig(
    in_channels=128, hidden_size=3072, num_heads=24, depth=5, depth_single_blocks=20, context_in_dim=7680
)
KLEIN_9B_DIT = TransformerConfig(
    in_channels=128, hidden_size=4096, num_heads=32, depth=8, depth_single_blocks=24, context_in_dim=12288
)
FLUX2_AE = VAEConfig()

KLEIN_4B = ModelSpec("klein-4b", KLEIN_4B_DIT, FLUX2_AE, QWEN3_4B, DISTILLED)
KLEIN_9B = ModelSpec("klein-9b", KLEIN_9B_DIT, FLUX2_AE, QWEN3_8B, DISTILLED)
KLEIN_BASE_4B = replace(KLEIN_4B, name="klein-base-4b", sampling=BASE)
KLEIN_BASE_9B = replace(KLEIN_9B, name="klein-base-9b", sampling=BASE)

# Random weights at toy sizes with the real geometry (16 pixels per token, 4-axis RoPE, GQA text
# encoder deep enough for the real taps 9/18/27): every code path of the real models, fast enough
# for CPU tests. The vocabulary matches klein.text_embedder.build_tiny_tokenizer.
TINY_TEXT = TextEncoderConfig(
    hidden_size=32, num_layers=28, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64,
    vocab_size=261, max_position_embeddings=512,
)  # fmt: skip
TINY = ModelSpec(
    name="tiny",
    transformer=TransformerConfig(
        in_channels=16,
        hidden_size=64,
        num_heads=2,
        depth=1,
        depth_single_blocks=2,
        context_in_dim=96,
        axes_dim=(8, 8, 8, 8),
    ),  # fmt: skip
    vae=VAEConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1, z_channels=4),
    text=TINY_TEXT,
    sampling=DISTILLED,
    default_size=256,
    random_seed=0,
)
TINY_BASE = replace(TINY, name="tiny-base", sampling=replace(BASE, steps=4))

PRESETS: dict[str, ModelSpec] = {
    s.name: s for s in (KLEIN_4B, KLEIN_9B, KLEIN_BASE_4B, KLEIN_BASE_9B, TINY, TINY_BASE)
}


def get_preset(name: str) -> ModelSpec:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
