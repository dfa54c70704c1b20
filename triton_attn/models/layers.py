"""The building blocks of our models: rotary positions, the contiguous KV cache, attention, a decoder layer.

``Attention`` (q/k/v/o projections, rotary positions, GQA, optional sliding window, softcap and sinks) looks
its attention function up by name in an ``AttentionInterface`` at every call, with the contract of
``triton_attn.registry`` (q/k/v ``[B, H, S, D]`` in, ``[B, S, H, D]`` out, keywords ``scaling``, ``dropout``,
``sliding_window``, ``softcap``, ``s_aux``, ``is_causal``); given a ``PagedBatch`` as its cache it attends
with ``triton_attn.paged_attention`` instead.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from .. import PagedBatch, paged_attention
from ..masks import softcap_score
from ..registry import ALL_ATTENTION_FUNCTIONS, AttentionInterface, eager_attention_function
from .config import ModelConfig

__all__ = ["KVCache", "rotary_embedding", "apply_rotary", "Attention", "DecoderLayer"]


class KVCache:
    """Keys and values of every layer seen so far (``[B, Hkv, S, D]`` each); all layers keep everything."""

    def __init__(self):
        self.keys: List[Optional[torch.Tensor]] = []
        self.values: List[Optional[torch.Tensor]] = []

    def seq_length(self, layer_idx: int = 0) -> int:
        if layer_idx >= len(self.keys) or self.keys[layer_idx] is None:
            return 0
        return self.keys[layer_idx].shape[2]

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        while len(self.keys) <= layer_idx:
            self.keys.append(None)
            self.values.append(None)
        if self.keys[layer_idx] is not None:
            key = torch.cat([self.keys[layer_idx], key], dim=2)
            value = torch.cat([self.values[layer_idx], value], dim=2)
        self.keys[layer_idx], self.values[layer_idx] = key, value
        return key, value


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def rotary_embedding(position_ids: torch.Tensor, head_dim: int, theta: float,
                     dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[B, 1, S, head_dim]`` for integer ``position_ids`` ``[B, S]``."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    angles = position_ids.float().unsqueeze(-1) * inv_freq
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, H, S, D]`` rotated by the position angles of ``rotary_embedding`` (``[B, 1, S, D]``)."""
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    """Multi-head attention whose core is the function registered as ``config.attn_implementation``.

    attention_interface: where to look the function up (default ``ALL_ATTENTION_FUNCTIONS``); pass an
    ``AttentionInterface()`` with per-instance overrides to change one model only.
    """

    def __init__(self, config: ModelConfig, layer_idx: int = 0,
                 attention_interface: Optional[AttentionInterface] = None):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.layer_type = config.layer_types[layer_idx]
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.scaling = self.head_dim ** -0.5
        self.is_causal = config.causal
        self.sliding_window = config.sliding_window if self.layer_type == "sliding_attention" else None
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.sinks = nn.Parameter(torch.zeros(self.num_heads)) if config.attention_sinks else None
        self.attention_interface = attention_interface if attention_interface is not None else ALL_ATTENTION_FUNCTIONS

    def forward(self, hidden_states: torch.Tensor, attention_mask=None,
                position_embeddings: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                cache: Optional[KVCache] = None, **kwargs) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        batch, length, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        key = self.k_proj(hidden_states).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if position_embeddings is not None:
            cos, sin = position_embeddings
            query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        if isinstance(cache, PagedBatch):
            return self.o_proj(self._paged_attention(query, key, value, attention_mask, cache)
                               .reshape(batch, length, self.num_heads * self.head_dim)), None
        if cache is not None:
            key, value = cache.update(self.layer_idx, key, value)
        attention_function = self.attention_interface.get_interface(self.config.attn_implementation,
                                                                    eager_attention_function)
        out, weights = attention_function(
            self, query, key, value, attention_mask, scaling=self.scaling,
            dropout=self.config.attention_dropout if self.training else 0.0, sliding_window=self.sliding_window,
            softcap=self.config.softcap, s_aux=self.sinks, is_causal=self.is_causal, **kwargs)
        return self.o_proj(out.reshape(batch, length, self.num_heads * self.head_dim)), weights

    def _paged_attention(self, query, key, value, mask_mod, cache: PagedBatch) -> torch.Tensor:
        """Store this step's keys/values in the pages and attend with ``paged_attention``: [B, S, H, D]."""
        if self.sinks is not None:
            raise ValueError("a paged cache does not support attention sinks (config.attention_sinks); "
                             "use the contiguous cache")
        cache.write(self.layer_idx, key, value)
        score_mod = softcap_score(self.config.softcap) if self.config.softcap else None
        out = paged_attention(query, *cache.attention_inputs(self.layer_idx), mask_mod=mask_mod, score_mod=score_mod,
                              scale=self.scaling)
        return out.transpose(1, 2)


class DecoderLayer(nn.Module):
    """Pre-norm block: RMSNorm, attention, residual; RMSNorm, SiLU MLP, residual."""

    def __init__(self, config: ModelConfig, layer_idx: int, attention_interface: Optional[AttentionInterface] = None):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.input_norm = nn.RMSNorm(config.hidden_size, eps=1e-6)
        self.self_attn = Attention(config, layer_idx, attention_interface)
        self.post_attention_norm = nn.RMSNorm(config.hidden_size, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(config.hidden_size, config.intermediate_size, bias=False), nn.SiLU(),
                                 nn.Linear(config.intermediate_size, config.hidden_size, bias=False))

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, **kwargs):
        attended, _ = self.self_attn(self.input_norm(hidden_states), attention_mask, position_embeddings, cache,
                                     **kwargs)
        hidden_states = hidden_states + attended
        return hidden_states + self.mlp(self.post_attention_norm(hidden_states))
