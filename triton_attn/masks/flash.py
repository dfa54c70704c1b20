"""FlashAttention-2's masking and score semantics as mask_mods and score_mods.

FlashAttention-2 aligns a query row to the *bottom-right* corner of the score matrix: with ``Lq`` queries
and ``Lk`` keys, query ``i`` sits at key position ``i + Lk - Lq`` (its *diagonal*). Over that diagonal:

- ``causal``: key ``j`` is visible iff ``j <= diagonal`` (the window's right edge becomes 0);
- ``window_size=(left, right)``: ``diagonal - left <= j <= diagonal + right``, -1 meaning unbounded;
- ``softcap > 0``: ``score = softcap * tanh(score / softcap)`` on the scaled score, before the mask and ALiBi;
- ``alibi_slopes`` ``[H]`` or ``[B, H]``: ``score -= slope[b, h] * |diagonal - j|`` (FlashAttention-2's
  documented bias; its causal kernel adds ``slope * j`` instead, the same softmax, an lse shifted per row).

The factories here take the diagonal's offset (``Lk - Lq``, an int) or, for a paged or cached call whose
query positions are already logical (``masks/paged.py``), offset 0. Packed variable-length batches have a
per-token diagonal (``masks/varlen.py``); their ALiBi is ``packed_flash_score_mod``.
Every factory returns a named closure, or None when nothing applies (no mask: every key visible).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

__all__ = ["flash_window", "flash_mask_mod", "flash_score_mod", "packed_flash_score_mod", "alibi_table"]


def flash_window(causal: bool, window_size) -> Tuple[Optional[int], Optional[int]]:
    """(left, right) reach of the window around the diagonal, None for unbounded: FlashAttention-2's
    ``window_size`` with -1 unbounded, and ``causal`` setting the right edge to 0. Raises a ValueError
    naming ``window_size`` for anything but a pair of ints >= -1."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise ValueError(f"window_size must be a pair (left, right) of ints >= -1, got {window_size!r}") from None
    for value in (left, right):
        if isinstance(value, bool) or not isinstance(value, int) or value < -1:
            raise ValueError(f"window_size must be a pair (left, right) of ints >= -1, got {window_size!r}")
    if causal:
        right = 0
    return (None if left < 0 else int(left)), (None if right < 0 else int(right))


def _named(fn, name: str):
    fn.__name__ = name
    fn.__qualname__ = name
    return fn


def flash_mask_mod(left: Optional[int], right: Optional[int], *, offset: int = 0,
                   key_start: Optional[torch.Tensor] = None) -> Optional[Callable]:
    """keep(b, h, q, kv): ``kv`` within ``[q + offset - left, q + offset + right]`` (a None edge unbounded) and,
    with ``key_start`` (int32 ``[B]``, FlashAttention's ``cache_leftpad``), ``kv >= key_start[b]``.
    None when every key is visible."""
    if left is None and right is None and key_start is None:
        return None

    def flash_mask(b, h, q_idx, kv_idx):
        diagonal = q_idx + offset
        keep = kv_idx >= 0
        if left is not None:
            keep = keep & (kv_idx >= diagonal - left)
        if right is not None:
            keep = keep & (kv_idx <= diagonal + right)
        if key_start is not None:
            keep = keep & (kv_idx >= key_start[b])
        return keep

    parts = [f"left_{left}" if left is not None else "", f"right_{right}" if right is not None else "",
             f"offset_{offset}" if offset else "", "leftpad" if key_start is not None else ""]
    return _named(flash_mask, "_".join(["flash"] + [p for p in parts if p]))


def alibi_table(alibi_slopes: Optional[torch.Tensor], batch: int, heads: int,
                device: torch.device) -> Optional[torch.Tensor]:
    """``alibi_slopes`` (``[H]`` or ``[B, H]``, float32 as FlashAttention-2 requires) as a float32 ``[B, H]``
    view on ``device`` (no copy: a mod reading it sees in-place changes); a ValueError naming it for another
    shape or dtype."""
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, torch.Tensor):
        raise TypeError(f"alibi_slopes must be a float32 tensor [H] or [B, H], got {type(alibi_slopes).__name__}")
    if alibi_slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be float32 (as FlashAttention-2 requires), got {alibi_slopes.dtype}")
    if alibi_slopes.device != device:
        raise ValueError(f"alibi_slopes must be on the query's device {device}, got {alibi_slopes.device}")
    if tuple(alibi_slopes.shape) == (heads,):
        return alibi_slopes.view(1, heads).expand(batch, heads)
    if tuple(alibi_slopes.shape) == (batch, heads):
        return alibi_slopes
    raise ValueError(f"alibi_slopes must be [H] = [{heads}] or [B, H] = [{batch}, {heads}], "
                     f"got {list(alibi_slopes.shape)}")


def _softcap_value(softcap) -> float:
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or softcap < 0:
        raise ValueError(f"softcap must be a float >= 0 (0 turns it off), got {softcap!r}")
    return float(softcap)


def _flash_score(cap: float, alibi: Optional[Callable], name: str) -> Callable:
    """The score_mod ``softcap`` (when ``cap > 0``) then ``- alibi(b, h, q, kv)`` (the ALiBi bias, when given)."""

    def flash_score(score, b, h, q_idx, kv_idx):
        if cap > 0.0:
            score = torch.tanh(score / cap) * cap
        if alibi is not None:
            score = score - alibi(b, h, q_idx, kv_idx)
        return score

    parts = [f"softcap_{cap:g}" if cap > 0.0 else "", "alibi" if alibi is not None else ""]
    return _named(flash_score, "_".join([name] + [p for p in parts if p]))


def flash_score_mod(softcap: float, slopes: Optional[torch.Tensor], *, offset: int = 0) -> Optional[Callable]:
    """score(s, b, h, q, kv): softcap (when > 0) then ALiBi ``- slopes[b, h] * |q + offset - kv|`` (``slopes``
    from ``alibi_table``, float32 ``[B, H]``). None when neither applies."""
    cap = _softcap_value(softcap)
    if cap == 0.0 and slopes is None:
        return None
    alibi = None if slopes is None else (lambda b, h, q_idx, kv_idx: slopes[b, h] * (q_idx + offset - kv_idx).abs())
    return _flash_score(cap, alibi, f"flash_offset_{offset}" if offset and slopes is not None else "flash")


def packed_flash_score_mod(softcap: float, slopes: Optional[torch.Tensor], sequence_of_query: torch.Tensor,
                           diagonal: torch.Tensor) -> Optional[Callable]:
    """``flash_score_mod`` over a packed batch (B = 1, positions packed): query ``q`` belongs to sequence
    ``sequence_of_query[q]`` (its ALiBi slope row) and sits at packed key position ``diagonal[q]``."""
    cap = _softcap_value(softcap)
    if cap == 0.0 and slopes is None:
        return None
    alibi = None if slopes is None else (
        lambda b, h, q_idx, kv_idx: slopes[sequence_of_query[q_idx], h] * (diagonal[q_idx] - kv_idx).abs())
    return _flash_score(cap, alibi, "flash_packed")
