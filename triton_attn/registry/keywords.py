"""The keywords models pass to attention functions, and what ours do with each.

transformers models call ``attention_interface(module, query, key, value, attention_mask, **kwargs)`` with
keywords of their own (``scaling``, ``sliding_window``, ``position_bias``, ...) plus whatever reached the
attention module through ``**kwargs`` (``position_ids``, ``use_cache``, ...). A keyword that changes the
result and that we dropped would give silently wrong outputs (T5's ``position_bias`` once did), so every
keyword is classified in ``ATTENTION_KEYWORDS``:

- ``implemented``: a parameter of our attention function, honoured;
- ``harmless``: does not change the attention result (bookkeeping the model did before the call, or a
  hint for another implementation), ignored;
- ``refused``: changes the result and is not implemented: an error, unless its value means "off"
  (``None`` or ``False``, e.g. ``output_attentions=False``).

A keyword not in the table is an error too (``check_keywords``), unless the user listed it in
``ignore_keywords`` of ``make_attention_function`` / ``register_attention``.
``tests/registry/test_model_families.py`` greps the installed transformers' modeling files and fails when
a keyword they pass to attention functions is not classified here.
"""

from __future__ import annotations

from typing import Dict, FrozenSet, Iterable, NamedTuple, Optional, Union

__all__ = ["KeywordRule", "ATTENTION_KEYWORDS", "KINDS", "check_keywords", "normalize_ignore_keywords"]

KINDS = ("implemented", "harmless", "refused")


class KeywordRule(NamedTuple):
    """How our attention functions treat one keyword: ``kind`` (one of ``KINDS``) and why."""

    kind: str
    reason: str


def _rules(kind: str, reason: str, *names: str) -> Dict[str, KeywordRule]:
    return {name: KeywordRule(kind, reason) for name in names}


_CONTRACT = "an argument of the attention-function contract (some models pass it by name)"
_VARLEN = ("FlashAttention's description of sequences packed in one row (DataCollatorWithFlattening(return_flash_"
           "attn_kwargs=True)): batch 1 runs as varlen attention, each sequence alone, when the mask is None or our "
           "packed mask of position_ids (on CPU checked to agree with it); with another mask (e.g. plain causal: "
           "no position_ids restarting) the mask decides, as for sdpa (registry/packed.py)")
_CACHE = "KV-cache bookkeeping, done by the model before the call (key/value already hold the cached tokens)"
_OUTPUT = "model-level output / loss bookkeeping, not read by attention"
_SPARSE = ("sparse key selection of a sparse-attention model, which the model folds into the mask only for "
           "'eager' / 'sdpa'; for other implementations it passes the indices here")

# keyword -> rule. Keep sorted by kind, then by the model family that introduced it.
ATTENTION_KEYWORDS: Dict[str, KeywordRule] = {
    **_rules("implemented", _CONTRACT, "module", "query", "key", "value", "attention_mask"),
    **_rules("implemented", "softmax scale of the query-key products (default 1/sqrt(head_dim))", "scaling"),
    **_rules("implemented", "attention dropout probability, applied while the module is training (or without a "
             "module); eval mode is no dropout", "dropout"),
    **_rules("implemented", "causal or bidirectional pattern when no mask is given (default module.is_causal)",
             "is_causal"),
    **_rules("implemented", "sliding window of the pattern when no mask is given (with a mask, the mask function "
             "already put the window in it)", "sliding_window"),
    **_rules("implemented", "logit soft-capping c * tanh(score / c) (Gemma 2), in the kernel", "softcap"),
    **_rules("implemented", "per-head attention-sink logits [Hq] (gpt-oss)", "s_aux"),
    **_rules("implemented", "per-query attention-sink logits [B or 1, Hq, Lq, 1] (Inkling 2)", "sinks"),
    **_rules("implemented", "additive score bias [B or 1, Hq or 1, Lq or 1, Lkv] added after scaling (T5-family "
             "relative bias, relative position encodings), differentiable", "position_bias"),
    **_rules("implemented", "token positions (rotary embeddings were applied before the call): restarting inside "
             "a row of batch 1, they are packed sequences, run as varlen attention when our packed mask of them "
             "or no mask is given (the sequences are read from the device once per forward)", "position_ids"),
    **_rules("implemented", _VARLEN, "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"),

    **_rules("harmless", _CACHE, "use_cache", "cache", "past_key_values", "past_key_value", "cache_position"),
    **_rules("harmless", "rotary cos/sin, applied to query and key before the call", "position_embeddings"),
    **_rules("harmless", "the cross-attention source, already projected into key and value",
             "encoder_hidden_states"),
    **_rules("harmless", _OUTPUT, "output_hidden_states", "output_router_logits", "return_dict",
             "num_items_in_batch", "labels", "logits_to_keep"),
    **_rules("harmless", "Mllama-style model-level inputs that reach attention through **kwargs (BLT's causal LM "
             "takes them and its cross-attention forwards them); the mask attention uses is attention_mask, and "
             "the row mask is applied by the decoder layer, not attention (eager and sdpa ignore both)",
             "cross_attention_mask", "full_text_row_masked_out_mask"),
    **_rules("harmless", "packed-sequence index of state-space (Mamba) layers", "seq_idx"),
    **_rules("harmless", "flash-attention determinism flag: our kernels are deterministic (no atomics)",
             "deterministic"),
    **_rules("harmless", "FlexAttention kernel tuning options (tile sizes, warps): speed only", "kernel_options"),

    **_rules("implemented", "asks for the attention probabilities, which the fused kernels never form: "
             "attn_weights is None, with a warning (use attn_implementation='eager' to get them)",
             "output_attentions"),
    **_rules("implemented", "DeepSeek sparse attention: the indexer's top-k key indices [B or 1, Lq, top_k] of "
             "each query, which the model folds into the mask only for 'eager' / 'sdpa'; a query attends to the "
             "keys both its mask and its indices allow (as eager's mask & scatter(indices))", "indices"),
    **_rules("refused", _SPARSE + " (block-sparse top-k block indices)", "block_indices"),
    **_rules("refused", "multiplies the attention probabilities per head (head pruning)", "head_mask",
             "layer_head_mask"),
}


def _is_off(value) -> bool:
    """Whether a refused keyword's value switches its feature off (then it changes nothing)."""
    return value is None or value is False


def normalize_ignore_keywords(ignore_keywords: Union[str, Iterable[str], None]) -> FrozenSet[str]:
    """``ignore_keywords`` of ``make_attention_function`` as a frozenset of names, checked: identifiers, and
    none that we implement or refuse (ignoring those would change the result silently)."""
    if ignore_keywords is None:
        return frozenset()
    names = (ignore_keywords,) if isinstance(ignore_keywords, str) else ignore_keywords
    try:
        names = tuple(names)
    except TypeError:
        raise TypeError(f"ignore_keywords must be keyword names (a str or a collection of str), got "
                        f"{type(ignore_keywords).__name__}") from None
    for name in names:
        if not isinstance(name, str) or not name.isidentifier():
            raise TypeError(f"ignore_keywords must hold keyword names (identifiers), got {name!r}")
        rule = ATTENTION_KEYWORDS.get(name)
        if rule is not None and rule.kind != "harmless":
            what = "is implemented" if rule.kind == "implemented" else "changes the attention result"
            raise ValueError(f"ignore_keywords: {name!r} {what} ({rule.reason}); it cannot be ignored")
    return frozenset(names)


def check_keywords(kwargs: dict, ignore_keywords: FrozenSet[str], module=None) -> None:
    """Raise for any keyword in ``kwargs`` (the extra keywords of one attention call) that is refused with a
    value other than None / False, or unknown and not in ``ignore_keywords``; harmless ones pass."""
    for name, value in kwargs.items():
        rule: Optional[KeywordRule] = ATTENTION_KEYWORDS.get(name)
        if rule is None:
            if name in ignore_keywords:
                continue
            caller = "" if module is None else f" (from {type(module).__name__})"
            raise TypeError(f"triton_attn attention function got the keyword {name!r}{caller}, which it does not "
                            f"know: it could change the attention result. If it does not, pass "
                            f"ignore_keywords=({name!r},) to register_attention / make_attention_function")
        if rule.kind == "refused" and not _is_off(value):
            raise ValueError(f"triton_attn attention function: {name}={_describe(value)} is not supported: "
                             f"{rule.reason}")


def _describe(value) -> str:
    shape = getattr(value, "shape", None)
    return f"<tensor of shape {tuple(shape)}>" if shape is not None else repr(value)
