"""Qwen3 as the FLUX.2 [klein] text embedder (BFL flux2 `Qwen3Embedder`, diffusers
`Flux2KleinPipeline._get_qwen3_prompt_embeds`).

Each prompt goes through the chat template (thinking disabled), is padded to 512 tokens, and the
hidden states after decoder layers 9, 18 and 27 (HF `hidden_states` indices) are concatenated per
token: (B, 512, 3 * hidden). Layers past the last tap are never built; the final norm applies only
where HF applies it, to an encoder's last layer (a 27-layer encoder's tap 27).

Tokenising (host work) and running the decoder (`hidden_states`, device work, one traceable
function that `klein.fast` may compile) are separate; the taps are collected by the forward itself,
not by hooks.
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
        if not config.final_norm:
            self.model.norm = nn.Identity()  # taps before the last layer are read before any norm
        self.encode = self.hidden_states  # klein.fast may put a compiled version here

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

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Token ids and their padding mask (B, L) -> the tapped hidden states concatenated per
        token, (B, L, len(layers) * hidden): Qwen3Model's forward, keeping what the taps read."""
        from transformers.masking_utils import create_causal_mask

        m, layers = self.model, self.config.layers
        x = m.embed_tokens(input_ids)
        position_ids = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        mask = create_causal_mask(
            config=m.config,
            inputs_embeds=x,
            attention_mask=attention_mask,
            past_key_values=None,
            position_ids=position_ids,
        )
        rotary = m.rotary_emb(x, position_ids)
        taps = {0: x} if 0 in layers else {}
        for i, layer in enumerate(m.layers, start=1):  # HF: hidden_states[i] is layer i-1's output
            x = layer(x, attention_mask=mask, position_embeddings=rotary, position_ids=position_ids)
            if i in layers:
                taps[i] = x
        if self.config.final_norm:
            taps[len(m.layers)] = m.norm(x)
        return torch.cat([taps[k] for k in layers], dim=-1)

    @torch.inference_mode()
    def forward(self, prompts: list[str]) -> Tensor:
        """prompts -> (B, max_length, len(layers) * hidden) in the model's dtype."""
        input_ids, attention_mask = self.tokenize(prompts)
        out = self.encode(input_ids.to(self.device), attention_mask.to(self.device))
        return out.to(self.dtype)
