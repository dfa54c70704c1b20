"""Attention functions with the model contract, backed by ``triton_attn.attention``.

``fn(module, query [B, Hq, Lq, D], key [B, Hkv, Lkv, D], value [B, Hkv, Lkv, Dv], attention_mask, **kwargs)
-> (attn_output [B, Lq, Hq, Dv], None)``

Keywords honoured: ``scaling`` (default 1/sqrt(D)), ``dropout`` (attention dropout while the module is
training; ignored in eval mode, where transformers passes 0 anyway), ``is_causal`` (default
``module.is_causal``, else True; used only when there is no mask), ``sliding_window`` (ditto; the window
includes the current token), ``softcap`` (Gemma-2 logit capping), ``s_aux`` (gpt-oss attention sinks, one
logit per query head), ``sinks`` (per-query sink logits ``[B or 1, Hq, Lq, 1]``), ``position_bias`` (an
additive score bias ``[B or 1, Hq or 1, Lq or 1, Lkv]``, T5-style, with its gradient), ``indices``
(DeepSeek sparse attention's top-k keys ``[B or 1, Lq, top_k]`` of each query: only those keys that the
mask also allows are attended), ``output_attentions`` (weights are never formed: None, with a warning),
``position_ids`` and FlashAttention's ``cu_seq_lens_q`` / ``cu_seq_lens_k`` / ``max_length_q`` /
``max_length_k`` (sequences packed in one row: run as varlen attention where that is exactly the mask
path's result, see ``packed.py``). Every other keyword is looked up in
``keywords.ATTENTION_KEYWORDS``: harmless ones are ignored, the ones we refuse and unknown ones are errors
naming the keyword (``ignore_keywords`` of ``make_attention_function`` lists unknown keywords to ignore).

``attention_mask`` may be a ``BlockMask`` (ours, from ``make_mask_function``, possibly with a bias a model
folded into it, see ``model_block_mask``; or FlexAttention's), None (the pattern comes from
``is_causal``/``sliding_window``, aligned to the last query: queries are the last ``Lq`` positions of the
keys), a bool tensor ``[B or 1, 1 or Hq, Lq, >= Lkv]`` (True = attend; a 0/1 integer tensor means the
same, as in transformers' mask utilities), or a float tensor of that shape (``Lq`` may be 1) that is
added to the scores (0 / large negative, as in eager masks).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Optional, Tuple

import torch

from .. import attention, create_block_mask, mod_table
from ..masks import BlockMask, StructuredMod, causal_mask, sliding_window_mask
from .keywords import check_keywords, normalize_ignore_keywords
from .masking import CarriesUserMod, ModelBlockMask
from .packed import plan_varlen, run_varlen

__all__ = ["make_attention_function", "eager_attention_function", "sdpa_attention_function",
           "check_attention_inputs", "ModelScoreMod", "DenseMaskMod"]


def check_attention_inputs(module, query, key, value, dropout) -> float:
    """Model-level checks: tensor ranks, GQA head counts against ``module.num_key_value_groups``. Returns the
    dropout probability of the call: ``dropout`` while ``module`` is training (a call without a module counts as
    training: a caller passing ``dropout > 0`` means it), else 0."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor [batch, heads, seq, head_dim], got {got}")
    groups = getattr(module, "num_key_value_groups", None)
    if groups is not None and query.shape[1] != key.shape[1] * groups:
        raise ValueError(f"query has {query.shape[1]} heads but key has {key.shape[1]} and "
                         f"module.num_key_value_groups={groups}; expected query heads = key heads * groups")
    if dropout is None or (module is not None and not getattr(module, "training", True)):
        return 0.0
    try:
        probability = float(dropout)
    except (TypeError, ValueError):
        probability = math.nan
    if isinstance(dropout, bool) or not 0.0 <= probability < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    return probability


def _window_mask(window: int, causal: bool) -> Callable:
    if causal:
        return sliding_window_mask(window)

    def bidirectional_window(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() < window

    bidirectional_window.__name__ = f"bidirectional_window_{window}"
    return bidirectional_window


def _default_mask_mod(causal: bool, sliding_window: Optional[int], q_offset: int) -> Optional[Callable]:
    """Causal / sliding pattern over local indices, queries shifted to the end of the keys; None = attend all."""
    if sliding_window is not None:
        pattern = _window_mask(int(sliding_window), causal)
    elif causal:
        pattern = causal_mask
    else:
        return None

    def aligned(b, h, q_idx, kv_idx):
        return pattern(b, h, q_idx + q_offset, kv_idx)

    aligned.__name__ = f"{pattern.__name__}@q+{q_offset}"
    return aligned


def as_bool_if_integer(mask: torch.Tensor) -> torch.Tensor:
    """An integer 4-D ``attention_mask`` as bool (nonzero = attend), as transformers treats integer
    masks (its mask utilities turn the 0/1 padding mask into bool); float masks stay additive biases.

    Integer values other than 0 and 1 would be ambiguous (a bias written in integers?): refused.
    """
    if mask.dtype == torch.bool or mask.dtype.is_floating_point or mask.dtype.is_complex:
        return mask
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(f"attention_mask of integer dtype {mask.dtype} must hold only 0 (masked) and 1 (attend); "
                         "pass a bool mask, or a float mask for an additive bias")
    return mask.bool()


def _dense_mask_parts(mask: torch.Tensor, q_len: int, kv_len: int):
    """A 4-D bool / 0-1 integer or additive-float mask as (mask_mod or None, bias or None, mask batch,
    mask heads); the bias is ``[B or 1, H or 1, Lq or 1, Lkv]`` (``ModelScoreMod`` adds it)."""
    if mask.dim() != 4:
        raise ValueError(f"attention_mask must be a BlockMask, None, or a 4-D tensor [B, 1 or H, Lq, Lkv], "
                         f"got a {mask.dim()}-D tensor of shape {tuple(mask.shape)}")
    if mask.shape[-1] < kv_len or mask.shape[-2] not in (1, q_len):
        raise ValueError(f"attention_mask of shape {tuple(mask.shape)} does not cover Lq={q_len} queries and "
                         f"Lkv={kv_len} keys")
    mask = as_bool_if_integer(mask[..., :kv_len])
    batch, heads = mask.shape[:2]
    if mask.dtype != torch.bool:
        return None, mask, batch, heads
    return DenseMaskMod(mask.expand(-1, -1, q_len, -1), batch > 1, heads > 1), None, batch, heads


def _selected_keys(indices, batch: int, q_len: int, kv_len: int) -> torch.Tensor:
    """``indices`` (DeepSeek sparse attention: the top-k keys ``[B or 1, Lq, top_k]`` of each query, integers in
    ``[0, Lkv)``) as bool ``[B or 1, 1, Lq, Lkv]``, True at the selected keys (eager's ``scatter``, negated)."""
    if not isinstance(indices, torch.Tensor) or indices.dim() != 3 or indices.shape[0] not in (1, batch) \
            or indices.shape[1] != q_len or indices.dtype.is_floating_point or indices.dtype.is_complex \
            or indices.dtype == torch.bool:
        got = f"{indices.dtype} of shape {tuple(indices.shape)}" if isinstance(indices, torch.Tensor) \
            else type(indices).__name__
        raise ValueError(f"indices must be integer top-k key indices [B or 1, Lq, top_k] = [{batch} or 1, {q_len}, "
                         f"top_k], got {got}")
    indices = indices.long()
    if indices.numel() and bool(((indices < 0) | (indices >= kv_len)).any()):
        raise ValueError(f"indices must lie in [0, Lkv) = [0, {kv_len}) (positions on the key axis of this call), "
                         f"got values from {int(indices.min())} to {int(indices.max())}")
    selected = torch.zeros(indices.shape[0], q_len, kv_len, dtype=torch.bool, device=indices.device)
    return selected.scatter(-1, indices, True).unsqueeze(1)


def _with_selected_keys(attention_mask, selected: torch.Tensor, default_keep: Optional[torch.Tensor]):
    """A tensor / None ``attention_mask`` restricted to the ``selected`` keys ``[B or 1, 1, Lq, Lkv]``: a bool
    (0/1) mask ANDed with them, a float mask filled with its dtype's minimum elsewhere (as eager); None stands for
    ``default_keep`` (bool ``[Lq, Lkv]`` or None: every key)."""
    if attention_mask is None:
        return selected if default_keep is None else selected & default_keep
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(f"indices (sparse-attention top-k keys) are supported with a tensor attention_mask or "
                         f"None, got a {type(attention_mask).__name__}: the model's mask function should return a "
                         "tensor for this model (triton_attn.registry.tensor_mask_models)")
    kv_len = selected.shape[-1]
    if attention_mask.dim() != 4 or attention_mask.shape[-1] < kv_len:
        return attention_mask  # _dense_mask_parts names the bad shape
    mask = as_bool_if_integer(attention_mask[..., :kv_len])
    if mask.dtype == torch.bool:
        return mask & selected
    return mask.masked_fill(~selected, torch.finfo(mask.dtype).min)  # eager's fill


def _at(mask: torch.Tensor, layout: tuple, b, h, q_idx, kv_idx):
    """``mask [B or 1, H or 1, Lq or 1, Lkv]`` at (b, h, q_idx, kv_idx); ``layout``: (per_batch, per_head) or
    (per_batch, per_head, per_query), False where that dimension broadcasts (index 0; per_query defaults True)."""
    per_batch, per_head, per_query = (tuple(layout) + (True,))[:3]
    return mask[b if per_batch else b * 0, h if per_head else h * 0, q_idx if per_query else q_idx * 0, kv_idx]


class DenseMaskMod(StructuredMod):
    """A model's 4-D bool mask ``[B or 1, H or 1, Lq, Lkv]`` as a mask_mod. ``structure()`` is
    ``(per_batch, per_head)`` (whether ``b`` / ``h`` index the mask or it broadcasts), ``tensors()`` the
    mask: built inside ``torch.compile``, its table key comes from those constants (``mod_table.compiled_mod``)."""

    def __init__(self, mask: torch.Tensor, per_batch: bool, per_head: bool):
        self.mask, self.per_batch, self.per_head = mask, bool(per_batch), bool(per_head)
        self.__name__ = "dense_mask"

    def __call__(self, b, h, q_idx, kv_idx):
        return _at(self.mask, (self.per_batch, self.per_head), b, h, q_idx, kv_idx)

    def structure(self) -> tuple:
        return self.per_batch, self.per_head

    def tensors(self) -> tuple:
        return (self.mask,)

    @classmethod
    def build(cls, structure: tuple, tensors: tuple) -> "DenseMaskMod":
        return cls(tensors[0], *structure)


class ModelScoreMod(CarriesUserMod):
    """The score_mod of one model attention call: the model's logit softcap, an additive bias (a dense
    float mask, a model's ``position_bias``, a bias folded into the model's mask: their sum), and a registered
    score_mod over absolute positions, applied in that order (eager attention's order: capped scores, then
    the bias and mask, then the user's mod), kept as constants plus tensors.

    ``structure()`` is ``(softcap, bias_layout, user_mod, positional)``: the cap (a float) or None;
    ``(per_batch, per_head, per_query)`` of the bias (which of its batch / head / query dimensions is indexed,
    not broadcast) or None without a bias; the registered score_mod object itself or None; whether query
    positions come from a tensor. ``tensors()``: with a user mod, ``q_offset`` / ``kv_offset`` (int64 0-d:
    absolute position of query row 0 / key column 0) and the query positions (int64 ``[Lq]``) when positional;
    the bias (float32 ``[B or 1, H or 1, Lq or 1, Lkv]``; a bias requiring grad gets its gradient); then
    ``user_tensors``, the tensors the user mod captured, read when the
    attention function was made (as ``ModelMaskMod`` does). Built inside ``torch.compile``, its table key
    thus comes from constants (``mod_table.compiled_mod``) and every decode step shares it.
    """

    USER_KIND = "score"

    def __init__(self, softcap: Optional[float], bias: Optional[torch.Tensor] = None, bias_layout=None,
                 user_mod: Optional[Callable] = None, q_offset: Optional[torch.Tensor] = None,
                 kv_offset: Optional[torch.Tensor] = None, q_positions: Optional[torch.Tensor] = None,
                 user_tensors: tuple = (), *, user_source: Optional[Callable] = None):
        self.softcap, self.bias, self.bias_layout = softcap, bias, None if bias is None else bias_layout
        self.hold_user(user_mod, user_source, user_tensors)
        with_user = self.user_source is not None  # the positions are read only by the user mod
        self.q_offset, self.kv_offset = (q_offset, kv_offset) if with_user else (None, None)
        self.q_positions = q_positions if with_user else None
        parts = [] if softcap is None else [f"softcap_{softcap:g}"]
        parts += [] if bias is None else ["additive_bias"]
        parts += [] if not with_user else [getattr(self.user_source, "__name__", "score_mod")]
        self.__name__ = "+".join(parts) or "identity"

    def __call__(self, score, b, h, q_idx, kv_idx):
        if self.softcap is not None:
            score = torch.tanh(score / self.softcap) * self.softcap  # softcap_score's expression
        if self.bias is not None:
            score = score + _at(self.bias, self.bias_layout, b, h, q_idx, kv_idx)
        if self.user_mod is not None:
            query = q_idx + self.q_offset if self.q_positions is None else self.q_positions[q_idx]
            score = self.user_mod(score, b, h, query, kv_idx + self.kv_offset)
        return score

    def structure(self) -> tuple:
        return self.softcap, self.bias_layout, self.user_source, self.q_positions is not None

    def tensors(self) -> tuple:
        own = () if self.user_source is None else (self.q_offset, self.kv_offset)
        optional = (self.q_positions, self.bias)
        return own + tuple(t for t in optional if t is not None) + self.user_tensors

    @classmethod
    def own_count(cls, structure: tuple) -> int:
        _, bias_layout, user_source, positional = structure
        return (0 if user_source is None else 2 + int(positional)) + int(bias_layout is not None)

    @classmethod
    def user_source(cls, structure: tuple) -> Optional[Callable]:
        return structure[2]

    @classmethod
    def build(cls, structure: tuple, tensors: tuple) -> "ModelScoreMod":
        softcap, bias_layout, user_source, positional = structure
        own, user_mod = cls.split(structure, tensors)
        q_offset, kv_offset = (next(own), next(own)) if user_source is not None else (None, None)
        q_positions = next(own) if positional else None
        bias = next(own) if bias_layout is not None else None
        return cls(softcap, bias, bias_layout, user_mod, q_offset, kv_offset, q_positions,
                   tuple(tensors[cls.own_count(structure):]), user_source=user_source)


def _sink_logits(s_aux: Optional[torch.Tensor], sinks: Optional[torch.Tensor], batch: int, heads: int,
                 q_len: int) -> Optional[torch.Tensor]:
    """The sink logits of a call as float32 broadcastable to ``[B, Hq, Lq]``, or None: ``s_aux`` ``[Hq]`` (one
    per head) or ``sinks`` ``[B or 1, Hq, Lq or 1, 1]`` (one per query)."""
    if s_aux is not None and sinks is not None:
        raise ValueError("give attention sinks as s_aux (per head) or sinks (per query), not both")
    if s_aux is not None:
        if s_aux.numel() != heads:
            raise ValueError(f"s_aux must hold one sink logit per query head ({heads}), got shape {tuple(s_aux.shape)}")
        return s_aux.float().reshape(1, heads, 1)
    if sinks is None:
        return None
    if not isinstance(sinks, torch.Tensor) or sinks.dim() != 4 or sinks.shape[-1] != 1 \
            or sinks.shape[0] not in (1, batch) or sinks.shape[1] != heads or sinks.shape[2] not in (1, q_len):
        got = tuple(sinks.shape) if isinstance(sinks, torch.Tensor) else type(sinks).__name__
        raise ValueError(f"sinks must be per-query sink logits [B or 1, Hq, Lq or 1, 1] = [{batch} or 1, {heads}, "
                         f"{q_len} or 1, 1], got {got}")
    return sinks.float()[..., 0]


def _apply_sinks(out: torch.Tensor, lse: torch.Tensor, sink_logits: torch.Tensor) -> torch.Tensor:
    """Renormalise ``out`` [B, H, Lq, Dv] as if one more key with logit ``sink_logits[b, h, q]`` (broadcast;
    value 0) existed.

    softmax over (scores, sink) = softmax(scores) * S / (S + exp(sink)) with S = exp(lse), i.e. a factor
    sigmoid(lse - sink); rows that attend to nothing (lse = -inf) stay 0.
    """
    factor = torch.sigmoid(lse - sink_logits)
    return (out.float() * factor.unsqueeze(-1)).to(out.dtype)


def _score_bias(parts, batch: int, heads: int, q_len: int, kv_len: int):
    """The sum of the additive biases of one call, ``parts`` ``(what, tensor)`` each broadcastable to
    ``[B, Hq, Lq, Lkv]`` (a mask-borne one may cover more keys: cut to the first ``Lkv``), as ``(float32
    bias [B or 1, Hq or 1, Lq or 1, Lkv], (per_batch, per_head, per_query))``, or (None, None) without any."""
    total = None
    for what, bias in parts:
        if not isinstance(bias, torch.Tensor) or bias.dim() != 4:
            got = f"shape {tuple(bias.shape)}" if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"{what} must be a 4-D tensor [B or 1, Hq or 1, Lq or 1, Lkv], got {got}")
        if what != "position_bias" and bias.shape[-1] > kv_len:
            bias = bias[..., :kv_len]
        expected = (batch, heads, q_len, kv_len)
        if any(size not in (1, want) for size, want in zip(bias.shape, expected)):
            raise ValueError(f"{what} of shape {tuple(bias.shape)} does not broadcast to the scores "
                             f"[B, Hq, Lq, Lkv] = {list(expected)}")
        bias = bias.float()
        total = bias if total is None else total + bias
    if total is None:
        return None, None
    total = total.expand(-1, -1, -1, kv_len)
    return total, (total.shape[0] > 1, total.shape[1] > 1, total.shape[2] > 1)


def make_attention_function(score_mod: Optional[Callable] = None, *, backend: Optional[str] = None,
                            ignore_keywords=()) -> Callable:
    """The Triton-backed attention function (see the module docstring for the contract).

    score_mod: ``(score, b, h, q_idx, kv_idx) -> score`` over absolute positions, applied after the
    model's softcap and biases. backend: passed to ``triton_attn.attention`` (None picks by device).
    ignore_keywords: names of keywords that ``keywords.ATTENTION_KEYWORDS`` does not know and that the caller
    vouches do not change attention (a str or a collection of str); any other unknown keyword is an error.
    """
    if score_mod is not None and not callable(score_mod):
        raise TypeError(f"score_mod must be a callable (score, b, h, q_idx, kv_idx) -> score or None, "
                        f"got {type(score_mod).__name__}")
    ignored = normalize_ignore_keywords(ignore_keywords)
    # The tensors score_mod captured, read now (see ModelScoreMod): the same objects, so values changed in place
    # are seen by eager and compiled calls alike.
    user_tensors = () if score_mod is None else tuple(mod_table.register_mod(score_mod, "score")[1])
    warned, warned_lse = [], []

    def triton_attn_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask=None, scaling: Optional[float] = None, dropout: float = 0.0,
                              is_causal: Optional[bool] = None, sliding_window: Optional[int] = None,
                              softcap: Optional[float] = None, s_aux: Optional[torch.Tensor] = None,
                              sinks: Optional[torch.Tensor] = None, position_bias: Optional[torch.Tensor] = None,
                              output_attentions: bool = False, indices: Optional[torch.Tensor] = None,
                              position_ids: Optional[torch.Tensor] = None, cu_seq_lens_q: Optional[torch.Tensor] = None,
                              cu_seq_lens_k: Optional[torch.Tensor] = None, max_length_q=None, max_length_k=None,
                              **kwargs) -> Tuple[torch.Tensor, None]:
        """query [B, Hq, Lq, D], key/value [B, Hkv, Lkv, D/Dv] -> ([B, Lq, Hq, Dv], None)."""
        check_keywords(kwargs, ignored, module)
        dropout_p = check_attention_inputs(module, query, key, value, dropout)
        if output_attentions and not warned:
            warned.append(True)
            warnings.warn("triton_attn attention functions never materialise attention weights; "
                          "attn_weights is None (use attn_implementation='eager' to get them)", stacklevel=2)
        cap = float(softcap) if softcap is not None and float(softcap) > 0 else None
        scale = None if scaling is None else float(scaling)
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if score_mod is None and position_bias is None and s_aux is None and sinks is None and indices is None:
            # Packed sequences in one row: each runs alone, without a mask over the row.
            plan = plan_varlen(query, key, attention_mask, causal=bool(causal), sliding_window=sliding_window,
                               position_ids=position_ids, cu_seq_lens_q=cu_seq_lens_q, cu_seq_lens_k=cu_seq_lens_k,
                               max_length_q=max_length_q, max_length_k=max_length_k)
            if plan is not None:
                return run_varlen(plan, query, key, value, scale=scale, softcap=cap, dropout_p=dropout_p,
                                  backend=backend), None
        batch, q_heads, q_len, _ = query.shape
        kv_len = key.shape[2]
        q_offset, kv_offset, q_positions = kv_len - q_len, 0, None
        if indices is not None:  # sparse attention: the mask as a tensor, restricted to the selected keys
            keep = _default_keep(module, is_causal, sliding_window, q_len, kv_len, query.device)
            attention_mask = _with_selected_keys(attention_mask, _selected_keys(indices, batch, q_len, kv_len), keep)
        block_mask, biases = None, []
        if isinstance(attention_mask, BlockMask) or type(attention_mask).__name__ == "BlockMask":
            block_mask = attention_mask
            if isinstance(attention_mask, ModelBlockMask):
                if attention_mask.view == "blocked":
                    raise ValueError("attention_mask is an inverted ModelBlockMask (True = masked); pass the mask "
                                     "itself (True = attend) or its additive form")
                q_offset, kv_offset = attention_mask.q_offset, attention_mask.kv_offset
                q_positions = attention_mask.q_positions
                if attention_mask.bias is not None:
                    biases.append(("the bias folded into attention_mask", attention_mask.bias))
        elif attention_mask is None:
            mask_mod = _default_mask_mod(bool(causal), sliding_window, q_offset)
            if mask_mod is not None:
                block_mask = create_block_mask(mask_mod, None, None, q_len, kv_len, device=query.device)
        elif isinstance(attention_mask, torch.Tensor):
            mask_mod, dense_bias, mask_batch, mask_heads = _dense_mask_parts(attention_mask, q_len, kv_len)
            if mask_mod is not None:
                block_mask = create_block_mask(mask_mod, mask_batch, mask_heads, q_len, kv_len, device=query.device)
            if dense_bias is not None:
                biases.append(("attention_mask", dense_bias))
        else:
            raise TypeError(f"attention_mask must be a BlockMask, a 4-D tensor or None, got "
                            f"{type(attention_mask).__name__}; is a mask function of another implementation "
                            "registered under this name?")
        if position_bias is not None:
            biases.append(("position_bias", position_bias))
        bias, bias_layout = _score_bias(biases, batch, q_heads, q_len, kv_len)
        sink_logits = _sink_logits(s_aux, sinks, batch, q_heads, q_len)
        call_score_mod = None
        if cap is not None or bias is not None or score_mod is not None:
            # Offsets as tensors: a decode step's new offset is a new input of the same compiled graph.
            offsets = [None if score_mod is None else torch.tensor(offset, dtype=torch.int64, device=query.device)
                       for offset in (q_offset, kv_offset)]
            call_score_mod = ModelScoreMod(cap, bias, bias_layout, score_mod, *offsets, q_positions, user_tensors)
        result = attention(query, key, value, score_mod=call_score_mod, block_mask=block_mask, scale=scale,
                           enable_gqa=q_heads != key.shape[1], return_lse=sink_logits is not None, backend=backend,
                           dropout_p=dropout_p)
        if sink_logits is not None:
            out, lse = result
            if not lse.requires_grad and out.requires_grad and not warned_lse:
                warned_lse.append(True)
                warnings.warn("the attention backend returned an lse without gradient: with attention sinks, "
                              "gradients of query/key through the sink renormalisation are missing", stacklevel=2)
            out = _apply_sinks(out, lse, sink_logits)
        else:
            out = result
        return out.transpose(1, 2).contiguous(), None

    triton_attn_attention.score_mod = score_mod
    triton_attn_attention.backend = backend
    triton_attn_attention.ignore_keywords = ignored
    return triton_attn_attention


def _dense_bias(attention_mask, q_len: int, kv_len: int, dtype) -> Optional[torch.Tensor]:
    """A 4-D mask as an additive float bias ``[B, H or 1, Lq, Lkv]`` (bool: 0 / -inf)."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        raise TypeError(f"reference attention functions take a 4-D tensor mask or None, got "
                        f"{type(attention_mask).__name__}")
    mask = as_bool_if_integer(attention_mask[..., :kv_len])
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def _default_keep(module, is_causal, sliding_window, q_len: int, kv_len: int, device) -> Optional[torch.Tensor]:
    """Bool [q_len, kv_len] of the model's own causal / sliding-window pattern when no mask was given
    (None when every key is allowed); queries are the last ``q_len`` positions of the keys."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    mask_mod = _default_mask_mod(bool(causal), sliding_window, kv_len - q_len)
    if mask_mod is None:
        return None
    q_idx = torch.arange(q_len, device=device).view(-1, 1)
    kv_idx = torch.arange(kv_len, device=device).view(1, -1)
    return mask_mod(None, None, q_idx, kv_idx)


def eager_attention_function(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                             is_causal=None, sliding_window=None, softcap=None, s_aux=None, sinks=None,
                             position_bias=None, **kwargs):
    """Plain PyTorch reference: scores, softcap, position bias and mask, sinks, softmax.
    Returns ([B, Lq, Hq, Dv], weights)."""
    check_attention_inputs(module, query, key, value, 0.0)
    q_len, kv_len = query.shape[2], key.shape[2]
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scaling = 1.0 / math.sqrt(query.shape[-1]) if scaling is None else scaling
    scores = (query @ key.transpose(-1, -2)).float() * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if position_bias is not None:
        scores = scores + position_bias.float()
    bias = _dense_bias(attention_mask, q_len, kv_len, torch.float32)
    if bias is None:
        keep = _default_keep(module, is_causal, sliding_window, q_len, kv_len, query.device)
        if keep is not None:
            bias = torch.zeros(q_len, kv_len, device=query.device).masked_fill(~keep, float("-inf"))
    if bias is not None:
        scores = scores + bias
    sink_logits = _sink_logits(s_aux, sinks, query.shape[0], query.shape[1], q_len)
    if sink_logits is not None:
        scores = torch.cat([scores, sink_logits.unsqueeze(-1).expand(*scores.shape[:3], 1)], dim=-1)
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    weights = torch.exp(scores - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    weights = weights / torch.where(total > 0, total, torch.ones_like(total))
    if sink_logits is not None:
        weights = weights[..., :-1]
    out = weights.to(value.dtype) @ value
    return out.transpose(1, 2).contiguous(), weights


def sdpa_attention_function(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                            is_causal=None, sliding_window=None, softcap=None, s_aux=None, sinks=None, **kwargs):
    """``torch.nn.functional.scaled_dot_product_attention`` reference (no softcap, no sinks, no position_bias)."""
    if softcap is not None or s_aux is not None or sinks is not None or kwargs.get("position_bias") is not None:
        raise ValueError("the 'sdpa' reference supports no softcap, sinks or position_bias; use 'eager' or "
                         "'triton_attn'")
    check_attention_inputs(module, query, key, value, 0.0)
    q_len, kv_len = query.shape[2], key.shape[2]
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    bias = _dense_bias(attention_mask, q_len, kv_len, query.dtype)
    if bias is None:
        bias = _default_keep(module, is_causal, sliding_window, q_len, kv_len, query.device)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scaling)
    # Rows with no allowed key come back NaN from SDPA; the library's convention is 0.
    out = torch.nan_to_num(out, nan=0.0)
    return out.transpose(1, 2).contiguous(), None
