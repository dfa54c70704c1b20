"""Our own attention layers, for models outside transformers, dispatching through the same registries.

- ``Attention``: an ``nn.Module`` (q/k/v/o projections, rotary positions, GQA, optional sliding window,
  softcap and sinks) that looks its attention function up by name in an ``AttentionInterface`` at
  every call, with the contract of ``triton_attn.registry`` (q/k/v ``[B, H, S, D]`` in, ``[B, S, H, D]``
  out, keywords ``scaling``, ``dropout``, ``sliding_window``, ``softcap``, ``s_aux``, ``is_causal``).
- ``ReferenceDecoder``: a small pre-norm transformer (``causal=False`` makes it an encoder) whose
  forward builds one mask per layer type through ``AttentionMaskInterface`` (padding, offsets, packed
  documents), passes extra keyword arguments through to the attention function, and has a KV cache
  and a greedy ``generate``.
- ``ReferenceVisionLanguageModel``: a vision encoder and a text decoder as two sub-models, so that
  ``set_attn_implementation({"vision": "sdpa", "text": "triton_attn", "": ...})`` sets each backbone.

``set_attn_implementation`` takes a name (applied to the model and all its sub-models) or a dict
keyed by sub-model name, ``""`` being the model itself, as in transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import PagedBatch, PagedKVCache, paged_attention
from ..masks import and_masks, causal_mask, document_mask, full_mask, padding_mask, sliding_window_mask, softcap_score
from .attention_functions import eager_attention_function
from .interface import ALL_ATTENTION_FUNCTIONS, ALL_MASK_ATTENTION_FUNCTIONS, AttentionInterface, AttentionMaskInterface

__all__ = ["ModelConfig", "Attention", "DecoderLayer", "ReferenceDecoder", "ReferenceVisionLanguageModel",
           "VisionLanguageConfig", "KVCache", "DecoderOutput", "AttentionModel", "LAYER_TYPES"]

LAYER_TYPES = ("full_attention", "sliding_attention")
Implementation = Union[str, Dict[str, "Implementation"]]


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
        if self.sliding_window is not None and (isinstance(self.sliding_window, bool)
                                                or not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
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


def rotary_embedding(position_ids: torch.Tensor, head_dim: int, theta: float, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[B, 1, S, head_dim]`` for integer ``position_ids`` ``[B, S]``."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    angles = position_ids.float().unsqueeze(-1) * inv_freq
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


class Attention(nn.Module):
    """Multi-head attention whose core is the function registered as ``config.attn_implementation``.

    attention_interface: where to look the function up (default ``ALL_ATTENTION_FUNCTIONS``); pass an
    ``AttentionInterface()`` with per-instance overrides to change one model only.
    """

    def __init__(self, config: ModelConfig, layer_idx: int = 0, attention_interface: Optional[AttentionInterface] = None):
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
            query, key = query * cos + _rotate_half(query) * sin, key * cos + _rotate_half(key) * sin
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
        attended, _ = self.self_attn(self.input_norm(hidden_states), attention_mask, position_embeddings, cache, **kwargs)
        hidden_states = hidden_states + attended
        return hidden_states + self.mlp(self.post_attention_norm(hidden_states))


def check_implementation(name, interface: AttentionInterface) -> str:
    """``name`` if it is ``"eager"`` or registered in ``interface``; else a ValueError listing the valid names."""
    if not isinstance(name, str) or (name != "eager" and name not in interface):
        raise ValueError(f"attn_implementation={name!r} is not registered; valid: "
                         f"{', '.join(sorted(set(interface) | {'eager'}))} (register one with "
                         "triton_attn.registry.register_attention or AttentionInterface.register)")
    return name


class AttentionModel(nn.Module):
    """Base of our models: ``set_attn_implementation`` over the model and its named sub-models."""

    sub_model_names: Tuple[str, ...] = ()
    config: object
    attention_interface: AttentionInterface

    def sub_models(self) -> Dict[str, "AttentionModel"]:
        return {name: getattr(self, name) for name in self.sub_model_names}

    @property
    def attn_implementation(self) -> Union[str, Dict[str, object]]:
        """This model's implementation, or a dict with ``""`` and one entry per sub-model when it has them."""
        if not self.sub_model_names:
            return self.config.attn_implementation
        return {"": self.config.attn_implementation,
                **{name: model.attn_implementation for name, model in self.sub_models().items()}}

    def set_attn_implementation(self, attn_implementation: Implementation) -> None:
        """Switch attention implementation by name, without reloading weights.

        A str applies to this model and every sub-model. A dict maps sub-model names to a str or a
        nested dict, and ``""`` to this model itself; unmentioned parts keep their implementation.
        """
        subs = self.sub_models()
        if isinstance(attn_implementation, dict):
            unknown = set(attn_implementation) - set(subs) - {""}
            if unknown:
                raise KeyError(f"set_attn_implementation: unknown sub-model(s) {sorted(unknown)}; "
                               f"{type(self).__name__} has {sorted(subs) or 'none'} (and '' for itself)")
            own = attn_implementation.get("")
            plan = {name: attn_implementation[name] for name in subs if name in attn_implementation}
        else:
            own = attn_implementation
            plan = {name: attn_implementation for name in subs}
        # Check everything before changing anything, so that a bad name leaves the model as it was.
        self._check_plan(own, plan)
        for name, value in plan.items():
            subs[name].set_attn_implementation(value)
        if own is not None:
            self.config.attn_implementation = own

    def _check_plan(self, own, plan) -> None:
        if own is not None:
            check_implementation(own, self.attention_interface)
        subs = self.sub_models()
        for name, value in plan.items():
            if isinstance(value, dict):
                sub_own = value.get("")
                sub_plan = {k: v for k, v in value.items() if k != ""}
                unknown = set(sub_plan) - set(subs[name].sub_model_names)
                if unknown:
                    raise KeyError(f"set_attn_implementation: {name!r} has no sub-model(s) {sorted(unknown)}")
                subs[name]._check_plan(sub_own, sub_plan)
            else:
                subs[name]._check_plan(value, {k: value for k in subs[name].sub_model_names})


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


@dataclass
class VisionLanguageConfig:
    """A vision encoder (``vision``, bidirectional, takes patch features) and a text decoder (``text``)."""

    vision: ModelConfig = field(default_factory=lambda: ModelConfig(vocab_size=None, causal=False))
    text: ModelConfig = field(default_factory=ModelConfig)
    patch_dim: int = 48
    attn_implementation: str = "triton_attn"  # the "" entry: the model itself has no attention layer


class ReferenceVisionLanguageModel(AttentionModel):
    """Llava-style: encode patches, project them, put them before the text tokens, decode.

    ``set_attn_implementation({"vision": "sdpa", "text": "triton_attn"})`` sets each backbone.
    attn_implementation (constructor): a str or such a dict, applied after construction.
    """

    sub_model_names = ("vision", "text")

    def __init__(self, config: VisionLanguageConfig, attn_implementation: Optional[Implementation] = None,
                 attention_interface: Optional[AttentionInterface] = None,
                 mask_interface: Optional[AttentionMaskInterface] = None):
        super().__init__()
        if config.vision.vocab_size is not None or config.vision.causal:
            raise ValueError("VisionLanguageConfig.vision must be an encoder: vocab_size=None, causal=False")
        self.config = config
        self.attention_interface = attention_interface if attention_interface is not None else ALL_ATTENTION_FUNCTIONS
        self.patch_embed = nn.Linear(config.patch_dim, config.vision.hidden_size)
        self.vision = ReferenceDecoder(config.vision, attention_interface, mask_interface)
        self.projector = nn.Linear(config.vision.hidden_size, config.text.hidden_size)
        self.text = ReferenceDecoder(config.text, attention_interface, mask_interface)
        if attn_implementation is not None:
            self.set_attn_implementation(attn_implementation)

    def forward(self, input_ids: torch.Tensor, patches: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                **kwargs) -> DecoderOutput:
        """input_ids [B, S]; patches [B, N, patch_dim]; attention_mask [B, S] for the text part (0 = padding)."""
        image = self.vision(inputs_embeds=self.patch_embed(patches), **kwargs).hidden_states
        embeds = torch.cat([self.projector(image), self.text.embed_tokens(input_ids)], dim=1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], image.shape[1]),
                                        attention_mask], dim=1)
        return self.text(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
