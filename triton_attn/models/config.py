"""``ModelConfig``: the sizes and attention options of a ``ReferenceDecoder``, checked when made."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

__all__ = ["ModelConfig", "LAYER_TYPES"]

LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class ModelConfig:
    """Sizes and attention options of a ``ReferenceDecoder`` (all layers share them).

    num_kv_heads: key/value heads (GQA when fewer than ``num_heads``; default ``num_heads``).
    layer_types: per layer ``"full_attention"`` or ``"sliding_attention"`` (default: all sliding when
    ``sliding_window`` is set, else all full). vocab_size None: no embedding and no LM head (the model
    takes ``inputs_embeds`` and returns hidden states, as a vision encoder does).
    """

    vocab_size: Optional[int] = 128
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    intermediate_size: Optional[int] = None
    causal: bool = True
    sliding_window: Optional[int] = None
    layer_types: Optional[Sequence[str]] = None
    softcap: Optional[float] = None
    attention_sinks: bool = False
    attention_dropout: float = 0.0
    rope_theta: float = 10000.0
    initializer_range: float = 0.02
    attn_implementation: str = "triton_attn"

    def __post_init__(self):
        for name in ("hidden_size", "num_layers", "num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                                 "give head_dim")
            self.head_dim = self.hidden_size // self.num_heads
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even (rotary positions), got {self.head_dim}")
        self.intermediate_size = self.intermediate_size or 2 * self.hidden_size
        window = self.sliding_window
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
            raise ValueError(f"ModelConfig.sliding_window must be a positive int or None, got {self.sliding_window!r}")
        if self.layer_types is None:
            kind = "sliding_attention" if self.sliding_window is not None else "full_attention"
            self.layer_types = [kind] * self.num_layers
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.num_layers or any(t not in LAYER_TYPES for t in self.layer_types):
            raise ValueError(f"ModelConfig.layer_types must list one of {LAYER_TYPES} per layer "
                             f"({self.num_layers}), got {self.layer_types}")
        if "sliding_attention" in self.layer_types and self.sliding_window is None:
            raise ValueError("ModelConfig.layer_types has sliding_attention layers but sliding_window is None")
