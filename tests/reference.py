"""diffusers 0.42.1 as the reference implementation: tiny random pipelines built and saved by diffusers.

Test-only: klein never imports diffusers. The sizes come from a klein spec so that the same weights
can be loaded by both implementations.
"""

from __future__ import annotations

from pathlib import Path

import torch

from klein.config import ModelSpec
from klein.text_embedder import build_tiny_tokenizer


def diffusers_transformer(spec: ModelSpec):
    from diffusers import Flux2Transformer2DModel

    c = spec.transformer
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=c.in_channels,
        num_layers=c.depth,
        num_single_layers=c.depth_single_blocks,
        attention_head_dim=c.head_dim,
        num_attention_heads=c.num_heads,
        joint_attention_dim=c.context_in_dim,
        timestep_guidance_channels=256,
        mlp_ratio=c.mlp_ratio,
        axes_dims_rope=tuple(c.axes_dim),
        rope_theta=c.theta,
        guidance_embeds=False,
    )


def diffusers_vae(spec: ModelSpec):
    from diffusers import AutoencoderKLFlux2

    c = spec.vae
    n = len(c.block_out_channels)
    return AutoencoderKLFlux2(
        in_channels=c.in_channels,
        out_channels=c.out_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(c.block_out_channels),
        layers_per_block=c.layers_per_block,
        latent_channels=c.z_channels,
        norm_num_groups=c.norm_groups,
        use_quant_conv=c.use_quant_conv,
        use_post_quant_conv=c.use_post_quant_conv,
    )


def hf_text_encoder(spec: ModelSpec):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    c = spec.text
    return Qwen3ForCausalLM(
        Qwen3Config(
            hidden_size=c.hidden_size,
            num_hidden_layers=c.num_layers,
            num_attention_heads=c.num_heads,
            num_key_value_heads=c.num_kv_heads,
            head_dim=c.head_dim,
            intermediate_size=c.intermediate_size,
            vocab_size=c.vocab_size,
            max_position_embeddings=c.max_position_embeddings,
            rms_norm_eps=c.rms_norm_eps,
            tie_word_embeddings=c.tie_word_embeddings,
        )
    )


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int) -> None:
    """Give norms and BatchNorm statistics non-trivial values (their defaults are 1 and 0)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim == 1 and "norm" in name:
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
    for name, b in module.named_buffers():
        if name.endswith("running_mean"):
            b.copy_(0.5 * torch.randn(b.shape, generator=g))
        elif name.endswith("running_var"):
            b.copy_(0.5 + torch.rand(b.shape, generator=g))


def diffusers_pipeline(spec: ModelSpec, seed: int = 0, is_distilled: bool | None = None):
    """A random Flux2KleinPipeline at `spec`'s sizes (same weights for the same seed)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    torch.manual_seed(seed)
    transformer, vae, te = diffusers_transformer(spec), diffusers_vae(spec), hf_text_encoder(spec)
    for i, m in enumerate((transformer, vae, te)):
        randomize(m, seed + i)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential"
    )
    return Flux2KleinPipeline(
        scheduler=scheduler,
        vae=vae.eval(),
        text_encoder=te.eval(),
        tokenizer=build_tiny_tokenizer(),
        transformer=transformer.eval(),
        is_distilled=not spec.sampling.cfg if is_distilled is None else is_distilled,
    )


def save_diffusers(pipe, folder: Path) -> Path:
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
