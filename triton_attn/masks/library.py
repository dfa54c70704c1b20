"""The mask library: mask_mods and score_mods with the semantics pinned in docs/design.md.

Every mod takes index tensors that broadcast against each other (``b``, ``h``, ``q_idx``,
``kv_idx``; any shapes) and returns a tensor of that broadcast shape. The same functions are
traced into kernel predicates, so they use only operators, ``torch.where`` and indexing of
captured tensors. Factories return closures whose ``__name__`` says what they are.
"""

from __future__ import annotations

from typing import Callable

import torch

from .scalars import as_float, as_int

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ScoreMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = [
    "causal_mask", "full_mask", "sliding_window_mask", "chunked_mask", "prefix_lm_mask",
    "document_mask", "padding_mask", "and_masks", "or_masks", "not_mask",
    "softcap_score", "alibi_score", "MaskMod", "ScoreMod",
]


def _named(fn, name: str):
    fn.__name__ = name
    fn.__qualname__ = name
    return fn


def _positive_int(value, what: str) -> int:
    return as_int(value, what)


def causal_mask(b, h, q_idx, kv_idx):
    """Query ``q_idx`` sees keys at or before its own position (top-left aligned)."""
    return q_idx >= kv_idx


def full_mask(b, h, q_idx, kv_idx):
    """Every query sees every key (the mask of plain, unmasked attention)."""
    return kv_idx >= 0


def sliding_window_mask(window: int) -> MaskMod:
    """Causal, and at most ``window`` keys back: ``0 <= q_idx - kv_idx < window``.

    The window includes the current token, so ``window=1`` is the diagonal alone.
    """
    window = _positive_int(window, "sliding_window_mask: window")

    def sliding_window(b, h, q_idx, kv_idx):
        distance = q_idx - kv_idx
        return (distance >= 0) & (distance < window)

    return _named(sliding_window, f"sliding_window_{window}")


def chunked_mask(chunk_size: int) -> MaskMod:
    """Attend inside fixed chunks: ``q_idx // chunk_size == kv_idx // chunk_size``.

    Not causal by itself; combine with ``causal_mask`` through ``and_masks``.
    """
    chunk_size = _positive_int(chunk_size, "chunked_mask: chunk_size")

    def chunked(b, h, q_idx, kv_idx):
        return (q_idx // chunk_size) == (kv_idx // chunk_size)

    return _named(chunked, f"chunked_{chunk_size}")


def prefix_lm_mask(prefix_length) -> MaskMod:
    """Bidirectional over the prefix, causal after it: ``kv_idx < prefix`` or ``q_idx >= kv_idx``.

    ``prefix_length``: an int, or an integer tensor ``[B]`` of per-sequence prefix lengths.
    """
    if isinstance(prefix_length, torch.Tensor):
        if prefix_length.dim() != 1 or prefix_length.dtype.is_floating_point or prefix_length.dtype == torch.bool:
            raise ValueError(
                "prefix_lm_mask: prefix_length must be an int or an integer tensor of shape [B], "
                f"got dtype {prefix_length.dtype} and shape {tuple(prefix_length.shape)}")
        prefix = prefix_length

        def prefix_lm_per_batch(b, h, q_idx, kv_idx):
            return (kv_idx < prefix[b]) | (q_idx >= kv_idx)

        return _named(prefix_lm_per_batch, "prefix_lm_per_batch")

    prefix_int = as_int(prefix_length, "prefix_lm_mask: prefix_length", minimum=0,
                        expected="a non-negative int or a [B] tensor")

    def prefix_lm(b, h, q_idx, kv_idx):
        return (kv_idx < prefix_int) | (q_idx >= kv_idx)

    return _named(prefix_lm, f"prefix_lm_{prefix_int}")


def document_mask(document_ids: torch.Tensor) -> MaskMod:
    """Attend only within the same document: ``ids[b, q_idx] == ids[b, kv_idx]``.

    ``document_ids``: integer tensor ``[B, S]``, or ``[S]`` shared by every sequence in the batch.
    Combine with ``causal_mask`` for causal packed sequences.
    """
    ids = _index_tensor(document_ids, "document_mask: document_ids")
    if ids.dim() == 1:
        def document(b, h, q_idx, kv_idx):
            return ids[q_idx] == ids[kv_idx]
    else:
        def document(b, h, q_idx, kv_idx):
            return ids[b, q_idx] == ids[b, kv_idx]
    return _named(document, "document")


def padding_mask(attention_mask: torch.Tensor) -> MaskMod:
    """Attend only to real keys: ``attention_mask[b, kv_idx]``.

    ``attention_mask``: ``[B, KV_LEN]`` 0/1 integer or bool tensor (1/True = a real token), as
    HuggingFace tokenizers return it.
    """
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        got = type(attention_mask).__name__
        if isinstance(attention_mask, torch.Tensor):
            got += f" of shape {tuple(attention_mask.shape)}"
        raise ValueError(f"padding_mask: attention_mask must be a [B, KV_LEN] tensor, got {got}")
    if attention_mask.dtype.is_floating_point:
        raise ValueError(f"padding_mask: attention_mask must be bool or 0/1 integers, got dtype {attention_mask.dtype}")
    keep = attention_mask.bool()

    def padding(b, h, q_idx, kv_idx):
        return keep[b, kv_idx]

    return _named(padding, "padding")


def _index_tensor(t, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dim() not in (1, 2):
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{what} must be an integer tensor [B, S] or [S], got {shape}")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{what} must hold integers, got dtype {t.dtype}")
    return t


def _check_mods(mods, what: str):
    if not mods:
        raise ValueError(f"{what} needs at least one mask_mod")
    for mod in mods:
        if not callable(mod):
            raise TypeError(f"{what}: every argument must be a mask_mod callable, got {type(mod).__name__}")


def _mod_name(mod) -> str:
    return getattr(mod, "__name__", type(mod).__name__)


def and_masks(*mask_mods: MaskMod) -> MaskMod:
    """A mask_mod that attends where every one of ``mask_mods`` does."""
    _check_mods(mask_mods, "and_masks")

    def and_mask(b, h, q_idx, kv_idx):
        result = mask_mods[0](b, h, q_idx, kv_idx)
        for mod in mask_mods[1:]:
            result = result & mod(b, h, q_idx, kv_idx)
        return result

    return _named(and_mask, "and(" + ", ".join(_mod_name(m) for m in mask_mods) + ")")


def or_masks(*mask_mods: MaskMod) -> MaskMod:
    """A mask_mod that attends where any one of ``mask_mods`` does."""
    _check_mods(mask_mods, "or_masks")

    def or_mask(b, h, q_idx, kv_idx):
        result = mask_mods[0](b, h, q_idx, kv_idx)
        for mod in mask_mods[1:]:
            result = result | mod(b, h, q_idx, kv_idx)
        return result

    return _named(or_mask, "or(" + ", ".join(_mod_name(m) for m in mask_mods) + ")")


def not_mask(mask_mod: MaskMod) -> MaskMod:
    """A mask_mod that attends exactly where ``mask_mod`` does not."""
    _check_mods((mask_mod,), "not_mask")

    def inverted(b, h, q_idx, kv_idx):
        return ~mask_mod(b, h, q_idx, kv_idx)

    return _named(inverted, f"not({_mod_name(mask_mod)})")


def softcap_score(cap: float) -> ScoreMod:
    """Gemma-2 style logit soft-capping: ``cap * tanh(score / cap)``."""
    try:
        cap = as_float(cap, "softcap_score: cap", expected="a positive number")
    except TypeError as error:
        raise ValueError(str(error)) from None
    if not cap > 0:
        raise ValueError(f"softcap_score: cap must be a positive number, got {cap!r}")

    def softcap(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / cap) * cap

    return _named(softcap, f"softcap_{cap:g}")


def alibi_score(num_heads: int) -> ScoreMod:
    """ALiBi: ``score + slope[h] * (kv_idx - q_idx)`` with ``slope[h] = 2 ** (-8 * (h + 1) / num_heads)``."""
    num_heads = _positive_int(num_heads, "alibi_score: num_heads")

    def alibi(score, b, h, q_idx, kv_idx):
        # The slope is computed in the score's dtype, so a float64 golden result gets float64 slopes.
        slope = torch.exp2((h + 1).to(score.dtype) * (-8.0 / num_heads))
        return score + slope * (kv_idx - q_idx)

    return _named(alibi, f"alibi_{num_heads}")
