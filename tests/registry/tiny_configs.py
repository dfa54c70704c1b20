"""Tiny configs for any transformers config class: its defaults shrunk by field name, generically.

``tiny_config(config_class, overrides)`` instantiates the class's defaults, rewrites every field whose name
says what it is (hidden sizes, layer and head counts, head dims, vocabularies, positions, experts, windows,
dropouts, special token ids, per-layer lists) to a tiny value, recursing into sub-configs
(``text_config``, ``vision_config``, ...), and builds the class again from the changed fields only: values
the class derives in ``__post_init__`` (``head_dim`` from hidden size and heads, ``layer_types`` from the
layer count) follow. ``overrides`` (``"sub_config.field"`` keys reach into sub-configs) are applied last.
When the class refuses grouped-query attention, it is built again with as many key/value heads as query heads.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any, Dict, Optional

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, LAYERS, INTERMEDIATE = 64, 4, 2, 16, 2, 64
VOCAB, POSITIONS, WINDOW, EXPERTS, EXPERTS_PER_TOKEN, INDEX_TOPK = 96, 64, 5, 4, 2, 4
INIT_RANGE = 0.2  # larger than the usual 0.02, so that attention is far from uniform and a wrong mask shows

_KEEP = object()
_KV_HEADS_FIELD = r"(^|_)(num_key_value_heads|num_kv_heads|n_kv_heads|multi_query_group_num|n_head_kv)$"

# (pattern over the field name, tiny value) for int fields; the first match wins. Values already below the
# tiny one stay (a config with one key/value head is multi-query on purpose).
_INT_RULES = [
    (r"(^|_)(num_hidden_layers|num_layers|n_layers?|encoder_layers|decoder_layers|num_decoder_layers|"
     r"num_encoder_layers|depth|num_text_layers)$", LAYERS),
    (r"(^|_)(num_attention_heads|n_heads?|num_heads|encoder_attention_heads|decoder_attention_heads|"
     r"num_decoder_attention_heads)$", HEADS),
    (_KV_HEADS_FIELD, KV_HEADS),
    (r"^(head_dim|kv_channels|attention_head_size|d_kv|head_size|v_head_dim|attention_head_dim)$", HEAD_DIM),
    (r"^(qk_nope_head_dim|qk_rope_head_dim|rotary_dim)$", HEAD_DIM // 2),
    (r"^(kv_lora_rank|q_lora_rank)$", 2 * HEAD_DIM),
    (r"(^|_)(hidden_size|d_model|n_embd|embed_dim|model_dim|dim|word_embed_proj_dim|embedding_size|"
     r"hidden_dim|embedding_dim|hidden_size_global|hidden_size_per_layer_input)$", HIDDEN),
    (r"(intermediate_size|ffn_dim|(^|_)d_ff$|n_inner|ffn_hidden_size|mlp_dim|intermediate_dim|"
     r"expert_dim|moe_hidden_size)", INTERMEDIATE),
    (r"((^|_)vocab_size|_vocab)($|_)", VOCAB),
    (r"^(n_groups|mamba_n_groups)$", 1),  # state-space groups divide the (shrunk) state-space heads
    (r"(max_position_embeddings|n_positions|^n_ctx$|max_seq_len|max_sequence_length)$", POSITIONS),
    (r"^(num_experts|num_local_experts|n_routed_experts|moe_num_experts|num_routed_experts)$", EXPERTS),
    (r"^(num_experts_per_tok|moe_topk|moe_k|top_k|num_experts_per_token|n_activated_experts)$", EXPERTS_PER_TOKEN),
    (r"^(n_group|topk_group|num_expert_group)$", 1),
    (r"^(sliding_window|sliding_window_size|attention_chunk_size)$", WINDOW),
    (r"^index_topk$", INDEX_TOPK),  # sparse (DSA) attention: fewer keys than the sequence, so it selects
]
_FLOAT_RULES = [
    (r"(dropout|pdrop|drop_rate|layerdrop|drop_path|jitter)", 0.0),
    (r"^initializer_range$", INIT_RANGE),
]
_TOKEN_ID = re.compile(r"(_token_id|_token_index|_token_ids)$")
# Per-layer lists: cut to a few layers that keep every kind (a hybrid model keeps its attention layers).
_LAYER_LISTS = ("layer_types", "layers_block_type", "mlp_layer_types", "block_types")
_LAYER_COUNTS = ("num_hidden_layers", "num_layers", "n_layer")
# Given even where the default is None: key/value heads ("as many as query heads") for grouped-query
# attention; head_dim (None: hidden size / heads, the same 16 -- but some models read None as it is).
_GIVEN_WHEN_NONE = {"num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM}


def _shrink_int(name: str, value: int) -> Any:
    for pattern, tiny in _INT_RULES:
        if re.search(pattern, name):
            return tiny if value > tiny else _KEEP
    return _KEEP


def _shrink_value(name: str, value: Any) -> Any:
    if isinstance(value, bool):
        return _KEEP
    if value is None:
        return _GIVEN_WHEN_NONE.get(name, _KEEP)
    if isinstance(value, int):
        return _KEEP if _TOKEN_ID.search(name) else _shrink_int(name, value)
    if isinstance(value, float):
        for pattern, tiny in _FLOAT_RULES:
            if re.search(pattern, name):
                return tiny if value != tiny else _KEEP
    return _KEEP


def _layer_lists(fields: Dict[str, Any], changed: Dict[str, Any]) -> None:
    """Per-layer lists: kind lists (``_LAYER_LISTS``) cut to ``max(LAYERS, kinds)`` entries (every kind once,
    in order of first occurrence, then repeated), the layer count set to match, and any other list with one
    entry per layer (per-layer sizes, sparsity patterns) cut to that length, its entries shrunk by name."""
    lists = {name: fields[name] for name in _LAYER_LISTS if isinstance(fields.get(name), list) and fields[name]}
    count_names = [name for name in _LAYER_COUNTS if isinstance(fields.get(name), int)]
    layers = fields[count_names[0]] if count_names else None
    kinds = {name: list(dict.fromkeys(values)) for name, values in lists.items()}
    length = max([LAYERS] + [len(k) for k in kinds.values()])
    for name, distinct in kinds.items():
        changed[name] = (distinct * length)[:length]
    if lists:
        for name in count_names:
            changed[name] = length
    for name, values in fields.items():
        if name not in lists and isinstance(values, list) and layers and len(values) == layers > length:
            shrunk = [_shrink_value(name, v) for v in values[:length]]
            changed[name] = [v if s is _KEEP else s for v, s in zip(values, shrunk)]


def _fix_token_ids(fields: Dict[str, Any], changed: Dict[str, Any], vocab: int) -> None:
    """Special token ids at or past the tiny vocabulary move to distinct ids at its top (``vocab - 1``, ...)."""
    taken = set()
    for name, value in sorted(fields.items()):
        if not _TOKEN_ID.search(name):
            continue
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            continue
        moved = []
        for v in values:
            if v >= vocab or v < 0:
                v = vocab - 1 - len(taken)
                taken.add(v)
            moved.append(v)
        if moved != values:
            changed[name] = moved if isinstance(value, list) else moved[0]


def _settable(config_class, fields) -> set:
    """The fields worth giving: those the class declares (dataclass fields, ``__init__`` parameters) with a
    default other than None, plus ``_GIVEN_WHEN_NONE``. Undeclared attributes and None defaults are derived
    in ``__post_init__`` (``head_dim``, ``layer_types``, ``qk_head_dim``) and follow the shrunk fields."""
    declared = {}
    if dataclasses.is_dataclass(config_class):
        declared.update({f.name: f.default for f in dataclasses.fields(config_class)})
    try:
        parameters = inspect.signature(config_class.__init__).parameters.values()
        declared.update({p.name: p.default for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)})
    except (TypeError, ValueError):
        pass
    if not declared:  # an ``__init__(**kwargs)`` config: every attribute is fair game
        return set(fields)
    return {name for name, default in declared.items() if default is not None} | (set(_GIVEN_WHEN_NONE) & set(fields))


def tiny_fields(config) -> Dict[str, Any]:
    """The changed fields of ``config`` (an instance with its defaults); sub-configs as dicts of their
    parent's defaults for them plus their changed fields (with their ``model_type``)."""
    fields = {k: v for k, v in vars(config).items() if not k.startswith("_")}
    settable = _settable(type(config), fields)
    changed: Dict[str, Any] = {}
    specs = getattr(type(config), "sub_configs_defaults", {}) or {}
    for name, value in fields.items():
        if hasattr(value, "to_dict") and hasattr(value, "model_type"):
            sub = dict(getattr(specs.get(name), "init_kwargs", None) or {})  # a dict given would lose them
            sub.update(tiny_fields(value))
            sub["model_type"] = value.model_type
            changed[name] = sub
        elif name in settable:
            new = _shrink_value(name, value)
            if new is not _KEEP:
                changed[name] = new
    _layer_lists(fields, changed)
    if "kv_lora_rank" in fields:  # multi-head latent attention: keys have every query head, rope in head_dim
        changed["num_key_value_heads"] = HEADS
        if "head_dim" in settable and "qk_rope_head_dim" in fields:
            changed["head_dim"] = changed.get("qk_rope_head_dim", fields["qk_rope_head_dim"])
    vocab = changed.get("vocab_size", fields.get("vocab_size", VOCAB))
    if isinstance(vocab, int):
        _fix_token_ids(fields, changed, vocab)
    return changed


def _apply_overrides(kwargs: Dict[str, Any], overrides: Dict[str, Any]) -> None:
    for key, value in overrides.items():
        target = kwargs
        *path, last = key.split(".")
        for part in path:
            target = target.setdefault(part, {})
        target[last] = value


def _without_gqa(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    out = {}
    for name, value in kwargs.items():
        if isinstance(value, dict):
            out[name] = _without_gqa(value)
        elif re.search(_KV_HEADS_FIELD, name) and value == KV_HEADS:
            out[name] = HEADS
        else:
            out[name] = value
    return out


def tiny_config(config_class, overrides: Optional[Dict[str, Any]] = None):
    """A tiny instance of ``config_class``: its defaults shrunk by ``tiny_fields``, then ``overrides``."""
    kwargs = tiny_fields(config_class())
    _apply_overrides(kwargs, overrides or {})
    try:
        return config_class(**kwargs)
    except Exception as error:  # noqa: BLE001 -- strict configs raise their own validation errors
        if "key_value_heads" not in str(error) and "grouped-query" not in str(error):
            raise
        return config_class(**_without_gqa(kwargs))
