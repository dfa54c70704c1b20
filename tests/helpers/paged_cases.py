"""Paged-cache test inputs and their contiguous equivalent, shared by the paged and decode tests.

The golden side is built independently of ``triton_attn.masks.paged``: keys are copied position by
position out of the pages, and the logical mask is written out here again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from triton_attn.masks import causal_mask


@dataclass
class PagedInputs:
    query: torch.Tensor        # [B, Hq, Lq, D]
    key_cache: torch.Tensor    # [num_pages, Hkv, page_size, D]
    value_cache: torch.Tensor
    page_table: torch.Tensor   # int32 [B, max_pages]
    kv_lens: torch.Tensor      # int32 [B]

    @property
    def args(self):
        return self.query, self.key_cache, self.value_cache, self.page_table, self.kv_lens


def make_paged(lengths: Sequence[int], q_len: int, q_heads: int, kv_heads: int, head_dim: int, page_size: int, *,
               dtype=torch.float16, spare_pages: int = 3, value_dim: Optional[int] = None) -> PagedInputs:
    """Random caches for sequences of ``lengths`` tokens in a shuffled pool (extra pages hold noise,
    unused page-table slots point at random pages)."""
    value_dim = value_dim or head_dim
    needed = [-(-n // page_size) for n in lengths]
    max_pages = max(needed) + 1
    num_pages = sum(needed) + spare_pages
    order = torch.randperm(num_pages).tolist()
    table = torch.randint(0, num_pages, (len(lengths), max_pages), dtype=torch.int32)
    for b, count in enumerate(needed):
        table[b, :count] = torch.tensor(order[:count], dtype=torch.int32)
        order = order[count:]

    def draw(*shape):
        return torch.randn(*shape).to(dtype)

    return PagedInputs(draw(len(lengths), q_heads, q_len, head_dim), draw(num_pages, kv_heads, page_size, head_dim),
                       draw(num_pages, kv_heads, page_size, value_dim), table,
                       torch.tensor(list(lengths), dtype=torch.int32))


def contiguous_kv(inputs: PagedInputs):
    """K/V ``[B, Hkv, max(kv_lens), D]`` copied position by position from the pages (zeros past each end)."""
    lengths = inputs.kv_lens.tolist()
    page_size = inputs.key_cache.shape[2]
    batch, longest = len(lengths), max(lengths)
    kv_heads = inputs.key_cache.shape[1]
    key = torch.zeros(batch, kv_heads, longest, inputs.key_cache.shape[3], dtype=inputs.key_cache.dtype)
    value = torch.zeros(batch, kv_heads, longest, inputs.value_cache.shape[3], dtype=inputs.value_cache.dtype)
    for b, n in enumerate(lengths):
        for pos in range(n):
            page = int(inputs.page_table[b, pos // page_size])
            key[b, :, pos] = inputs.key_cache[page, :, pos % page_size]
            value[b, :, pos] = inputs.value_cache[page, :, pos % page_size]
    return key, value


def logical_mask(mask_mod: Optional[Callable], kv_lens: torch.Tensor, q_len: int) -> Callable:
    """The golden mask over (b, h, query row, kv position): inside the sequence, and the user's mask
    at the row's logical position ``kv_lens[b] - q_len + row``."""
    user = mask_mod or causal_mask
    lengths = kv_lens.long()

    def golden_paged_mask(b, h, q_idx, kv_idx):
        return (kv_idx < lengths[b]) & user(b, h, q_idx + lengths[b] - q_len, kv_idx)

    return golden_paged_mask


def logical_score(score_mod: Optional[Callable], kv_lens: torch.Tensor, q_len: int) -> Optional[Callable]:
    if score_mod is None:
        return None
    lengths = kv_lens.long()

    def golden_paged_score(score, b, h, q_idx, kv_idx):
        return score_mod(score, b, h, q_idx + lengths[b] - q_len, kv_idx)

    return golden_paged_score


def ragged_lengths(batch: int, longest: int, q_len: int) -> List[int]:
    """``batch`` different lengths in [q_len, longest], the longest included."""
    lengths = torch.randint(q_len, longest + 1, (batch,)).tolist()
    lengths[0] = longest
    return lengths
