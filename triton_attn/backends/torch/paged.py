"""The ``torch`` backend of ``paged_attention``: each sequence's pages gathered into one slab.

The mask and score_mod move to logical positions (``masks/paged.py``), and the slab is attended by
the blockwise backend, so paged attention has the same specification as contiguous attention.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

from ...masks.compiler import create_block_mask
from ...masks.library import causal_mask
from ...masks.paged import PAGED_KV_BLOCK_SIZE, causal_paged_block_mask, depends_on_head
from .blockwise import blockwise_attention


def gather_pages(cache: torch.Tensor, pages: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` logical positions of one sequence as a contiguous ``[1, Hkv, length, D]``.

    cache: ``[num_pages, Hkv, page_size, D]``; pages: its physical page ids in logical order ``[n]``.
    One ``index_select`` of (page, head) rows straight into the ``[Hkv, pages, page_size, D]`` order:
    no transposed copy afterwards.
    """
    num_pages, kv_heads, page_size, dim = cache.shape
    used = -(-length // page_size)
    heads = torch.arange(kv_heads, dtype=torch.long, device=cache.device).view(-1, 1)
    rows = pages[:used].long().view(1, -1) * kv_heads + heads                          # [Hkv, used]
    slab = cache.reshape(num_pages * kv_heads, page_size * dim).index_select(0, rows.view(-1))
    slab = slab.view(1, kv_heads, used * page_size, dim)
    return slab if used * page_size == length else slab[:, :, :length]


def _shift_batch(mod: Optional[Callable], batch: int, kind: str) -> Optional[Callable]:
    """``mod`` called with ``b + batch``: sequence ``batch`` of the call, run as a batch of one."""
    if mod is None:
        return None
    if kind == "mask":
        def shifted_mask(b, h, q_idx, kv_idx):
            return mod(b + batch, h, q_idx, kv_idx)
        shifted_mask.__name__ = getattr(mod, "__name__", "mask")
        return shifted_mask

    def shifted_score(score, b, h, q_idx, kv_idx):
        return mod(score, b + batch, h, q_idx, kv_idx)
    shifted_score.__name__ = getattr(mod, "__name__", "score")
    return shifted_score


def paged_attention_torch(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                          page_table: torch.Tensor, kv_lens: torch.Tensor, *, mask_mod: Optional[Callable],
                          score_mod: Optional[Callable], scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``torch`` backend of ``paged_attention`` (inputs validated by the API).

    Each sequence's pages are gathered into a contiguous ``[1, Hkv, kv_lens[b], D]`` slab and attended
    by ``blockwise_attention`` with the mask moved to logical positions: a batch of one
    with a layout shared by all heads, the backend's fast path. Returns out ``[B, Hq, Lq, Dv]`` in
    the query dtype and lse ``[B, Hq, Lq]`` float32.
    """

    q_len, q_heads = query.shape[2], query.shape[1]
    lengths: List[int] = [int(n) for n in kv_lens.tolist()]
    head_dependent = depends_on_head(mask_mod)
    outs, lses = [], []
    for batch, length in enumerate(lengths):
        key = gather_pages(key_cache, page_table[batch], length)
        value = gather_pages(value_cache, page_table[batch], length)
        first = length - q_len  # logical position of query row 0
        if mask_mod is None and q_len <= PAGED_KV_BLOCK_SIZE:
            block_mask = causal_paged_block_mask(kv_lens[batch:batch + 1], q_len, length)
        else:
            user_mask = _shift_batch(causal_mask if mask_mod is None else mask_mod, batch, "mask")

            def sequence_mask(b, h, q_idx, kv_idx, user_mask=user_mask, first=first):
                return user_mask(b, h, q_idx + first, kv_idx)

            sequence_mask.__name__ = f"paged_{getattr(user_mask, '__name__', 'mask')}"
            block_mask = create_block_mask(sequence_mask, None, q_heads if head_dependent else None, q_len, length,
                                           device=query.device, BLOCK_SIZE=PAGED_KV_BLOCK_SIZE)
        user_score = _shift_batch(score_mod, batch, "score")
        sequence_score = None
        if user_score is not None:
            def sequence_score(score, b, h, q_idx, kv_idx, user_score=user_score, first=first):
                return user_score(score, b, h, q_idx + first, kv_idx)
        out, lse = blockwise_attention(query[batch:batch + 1], key, value, block_mask, score_mod=sequence_score,
                                       scale=scale)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=0), torch.cat(lses, dim=0)
