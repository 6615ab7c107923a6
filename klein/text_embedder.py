"""Qwen3 as the FLUX.2 [klein] text embedder (BFL flux2 `Qwen3Embedder`, diffusers
`Flux2KleinPipeline._get_qwen3_prompt_embeds`).

Each prompt goes through the chat template (thinking disabled), is padded to 512 tokens, and the
hidden states after decoder layers 9, 18 and 27 (HF `hidden_states` indices) are concatenated per
token: (B, 512, 3 * hidden). Layers past the last tap are never built, and no final norm is applied.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from klein.config import TextEncoderConfig

if TYPE_CHECKING:  # transformers is imported where it is used: it takes seconds to import
    from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3Model

TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
# Qwen3's template for a single user turn, reduced to what the embedder uses.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def build_tiny_tokenizer() -> Qwen2TokenizerFast:
    """A byte-level BPE with Qwen's special tokens and chat template, built offline (261 ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for s in TINY_SPECIAL_TOKENS:
        vocab[s] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(list(TINY_SPECIAL_TOKENS))
    tok = Qwen2TokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, bos_token=None
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def qwen3_config(c: TextEncoderConfig) -> Qwen3Config:
    """The HF config of the truncated decoder: only as many layers as the deepest tap needs."""
    from transformers import Qwen3Config

    config = Qwen3Config(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=max(max(c.layers), 1),
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        tie_word_embeddings=c.tie_word_embeddings,
    )
    config._attn_implementation = "sdpa"  # causal + key-padding mask, as HF runs it for diffusers/BFL
    return config


class TextEmbedder(nn.Module):
    def __init__(self, config: TextEncoderConfig, tokenizer, model: Qwen3Model | None = None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        if model is None:
            from transformers import Qwen3Model

            model = Qwen3Model(qwen3_config(config))
        self.model = model
        self.model.norm = nn.Identity()  # taps are pre-norm; the final norm is never used

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def reset_buffers(self) -> None:
        """Recompute the non-persistent rotary buffer (needed after building on the meta device)."""
        rotary = type(self.model.rotary_emb)(self.model.config)
        self.model.rotary_emb = rotary.to(self.device)

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        ids, masks = [], []
        for prompt in prompts:  # one by one, as BFL and diffusers do
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=False,
            )
            enc = self.tokenizer(
                text,
                padding="max_length",
                truncation=True,
                max_length=self.config.max_length,
                return_tensors="pt",
            )
            ids.append(enc["input_ids"])
            masks.append(enc["attention_mask"])
        return torch.cat(ids), torch.cat(masks)

    @torch.inference_mode()
    def forward(self, prompts: list[str]) -> Tensor:
        """prompts -> (B, max_length, len(layers) * hidden) in the model's dtype."""
        input_ids, attention_mask = self.tokenize(prompts)
        taps: dict[int, Tensor] = {}

        def keep(index: int):
            def hook(_module, _inputs, output):
                taps[index] = output[0] if isinstance(output, tuple) else output

            return hook

        # HF convention: hidden_states[0] = token embeddings, hidden_states[k] = output of layer k-1.
        hooks = [
            (self.model.embed_tokens if k == 0 else self.model.layers[k - 1]).register_forward_hook(keep(k))
            for k in set(self.config.layers)
        ]
        try:
            self.model(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                use_cache=False,
            )
        finally:
            for h in hooks:
                h.remove()
        return torch.cat([taps[k] for k in self.config.layers], dim=-1).to(self.dtype)  # (B, L, n * D)
