"""``ReferenceDecoder``: a small pre-norm transformer over our registries (``causal=False``: an encoder).

Its forward builds one mask per layer type through ``AttentionMaskInterface`` (padding, offsets, packed
documents), passes extra keyword arguments through to the attention function, and keeps a contiguous
``KVCache`` or a paged one; ``generate`` decodes greedily with either.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import torch
from torch import nn

from .. import PagedBatch, PagedKVCache
from ..masks import and_masks, causal_mask, document_mask, full_mask, padding_mask, sliding_window_mask
from ..registry import ALL_ATTENTION_FUNCTIONS, ALL_MASK_ATTENTION_FUNCTIONS, AttentionInterface, AttentionMaskInterface
from .base import AttentionModel, check_implementation
from .config import ModelConfig
from .layers import Attention, DecoderLayer, KVCache, rotary_embedding

__all__ = ["ReferenceDecoder", "DecoderOutput"]


class DecoderOutput(NamedTuple):
    logits: Optional[torch.Tensor]  # [B, S, vocab], None without an LM head
    hidden_states: torch.Tensor     # [B, S, hidden], after the final norm
    cache: Optional[KVCache]


def _bidirectional_window(window: int):
    def bidirectional_window(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() < window

    bidirectional_window.__name__ = f"bidirectional_window_{window}"
    return bidirectional_window


class ReferenceDecoder(AttentionModel):
    """A small transformer over our registries (causal decoder; ``config.causal=False``: an encoder).

    forward(input_ids or inputs_embeds, attention_mask=None [B, past + S] 0/1 padding,
    position_ids=None [B, S], document_ids=None [B, S] (packed sequences: tokens attend within their
    document only; no cache), cache=None, use_cache=False, **kwargs) -> DecoderOutput. Every extra
    keyword argument reaches the attention function of every layer.
    """

    def __init__(self, config: ModelConfig, attention_interface: Optional[AttentionInterface] = None,
                 mask_interface: Optional[AttentionMaskInterface] = None):
        super().__init__()
        self.config = config
        self.attention_interface = attention_interface if attention_interface is not None else ALL_ATTENTION_FUNCTIONS
        self.mask_interface = mask_interface if mask_interface is not None else ALL_MASK_ATTENTION_FUNCTIONS
        check_implementation(config.attn_implementation, self.attention_interface)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size) if config.vocab_size else None
        self.layers = nn.ModuleList(DecoderLayer(config, i, self.attention_interface) for i in range(config.num_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=1e-6)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False) if config.vocab_size else None
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        elif isinstance(module, Attention) and module.sinks is not None:
            nn.init.normal_(module.sinks, std=1.0)

    def _layer_pattern(self, layer_type: str, document_ids: Optional[torch.Tensor]):
        config = self.config
        if layer_type == "sliding_attention":
            pattern = sliding_window_mask(config.sliding_window) if config.causal \
                else _bidirectional_window(config.sliding_window)
        else:
            pattern = causal_mask if config.causal else full_mask
        if document_ids is not None:
            pattern = and_masks(pattern, document_mask(document_ids))
        return pattern

    def build_masks(self, batch: int, q_length: int, past_length: int, attention_mask: Optional[torch.Tensor],
                    document_ids: Optional[torch.Tensor], device) -> Dict[str, object]:
        """One mask per layer type, from the mask function registered under the implementation's name."""
        name = self.config.attn_implementation
        if name not in self.mask_interface:  # warned about at registration: the function gets None
            return {layer_type: None for layer_type in self.config.layer_types}
        mask_function = self.mask_interface[name]
        return {layer_type: mask_function(batch_size=batch, q_length=q_length, kv_length=past_length + q_length,
                                          q_offset=past_length, kv_offset=0,
                                          mask_function=self._layer_pattern(layer_type, document_ids),
                                          attention_mask=attention_mask, device=device)
                for layer_type in set(self.config.layer_types)}

    def paged_mask_mods(self, attention_mask: Optional[torch.Tensor]) -> Dict[str, object]:
        """One mask_mod per layer type for ``paged_attention`` (logical positions): the layer's causal or
        sliding pattern, and the padding of ``attention_mask`` [B, past + S] when given."""
        mods = {}
        for layer_type in set(self.config.layer_types):
            pattern = self._layer_pattern(layer_type, None)
            mods[layer_type] = pattern if attention_mask is None else and_masks(pattern, padding_mask(attention_mask))
        return mods

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, document_ids: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, use_cache: bool = False,
                inputs_embeds: Optional[torch.Tensor] = None, **kwargs) -> DecoderOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            if self.embed_tokens is None:
                raise ValueError("this model has no token embedding (vocab_size=None): pass inputs_embeds")
            inputs_embeds = self.embed_tokens(input_ids)
        batch, q_length, _ = inputs_embeds.shape
        if use_cache and cache is None:
            cache = KVCache()
        past = cache.seq_length() if cache is not None else 0
        if isinstance(cache, PagedBatch) and (document_ids is not None or not self.config.causal):
            raise ValueError("a paged cache serves causal decoding: no document_ids, config.causal=True")
        if document_ids is not None and past:
            raise ValueError("document_ids (packed sequences) cannot be combined with a non-empty cache")
        if attention_mask is not None and attention_mask.shape != (batch, past + q_length):
            raise ValueError(f"attention_mask must be [batch, past + new tokens] = {(batch, past + q_length)}, "
                             f"got {tuple(attention_mask.shape)}")
        if position_ids is None:
            if attention_mask is not None:  # left padding: real tokens count from 0
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + q_length, device=inputs_embeds.device).expand(batch, -1)
        position_embeddings = rotary_embedding(position_ids, self.config.head_dim, self.config.rope_theta,
                                               inputs_embeds.dtype)
        if isinstance(cache, PagedBatch):
            cache.reserve(q_length)
            masks = self.paged_mask_mods(attention_mask)
        else:
            masks = self.build_masks(batch, q_length, past, attention_mask, document_ids, inputs_embeds.device)
        hidden = inputs_embeds
        for layer in self.layers:
            hidden = layer(hidden, masks[layer.layer_type], position_embeddings, cache, **kwargs)
        hidden = self.norm(hidden)
        logits = self.lm_head(hidden) if self.lm_head is not None else None
        return DecoderOutput(logits, hidden, cache)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 max_new_tokens: int = 8, cache: str = "contiguous", page_size: int = 16, **kwargs) -> torch.Tensor:
        """Greedy decoding with a KV cache (one query per step after the prompt); returns prompt + new tokens.

        cache: "contiguous" (``KVCache``, concatenated every step) or "paged" (a ``PagedKVCache`` of
        ``page_size``-token pages, attended with ``triton_attn.paged_attention``: the same tokens).
        """
        if self.lm_head is None:
            raise ValueError("generate needs an LM head (vocab_size set)")
        if cache == "paged":
            cache = self.paged_cache(input_ids.shape[0], input_ids.shape[1] + max_new_tokens, page_size,
                                     dtype=self.lm_head.weight.dtype, device=input_ids.device)
        elif cache == "contiguous":
            cache = KVCache()
        else:
            raise ValueError(f"cache must be 'contiguous' or 'paged', got {cache!r}")
        tokens, step_ids = input_ids, input_ids
        for _ in range(max_new_tokens):
            out = self(step_ids, attention_mask=attention_mask, cache=cache, **kwargs)
            next_token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
            step_ids = next_token
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], 1)
        return tokens

    def paged_cache(self, batch: int, max_tokens: int, page_size: int = 16, *, dtype=torch.float32,
                    device=None) -> PagedBatch:
        """An empty ``PagedKVCache`` with room for ``batch`` sequences of ``max_tokens``, bound to them."""
        config = self.config
        pages = batch * -(-max_tokens // page_size)
        store = PagedKVCache(pages, page_size, config.num_kv_heads, config.head_dim, num_layers=config.num_layers,
                             dtype=dtype, device=device)
        return store.batch(store.allocate(batch))
