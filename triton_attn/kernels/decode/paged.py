"""Paged decode planned once per step: ``PagedDecode`` (what ``paged_attention`` and ``plan_paged`` run).

A serving engine's decode step runs the same attention for every layer over the same page table and
lengths; only the layer's query and cache differ. ``PagedDecode`` makes every decision that depends on
the batch composition once: the BlockMask over logical positions (``masks/paged.py``), the mods'
functions, the split count, the tuned config and the split partials. ``run(query, key_cache,
value_cache)`` then only launches: no device read, no allocation but its outputs, so a whole step can
be captured in a CUDA graph.

The plan owns its page table, lengths and block lists; ``update(page_table, kv_lens)`` copies the next
step's values into them in place (the logical mask and score_mod read the plan's lengths buffer), so a
graph captured once replays every later step: launch decisions (split count, config, grid) depend on
shapes only, and each row's work is split from the counts the kernel reads.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import torch

from ...masks.block_mask import BlockMask
from ...masks.paged import logical_score_mod, paged_block_mask
from ..host import MaskPlan, traced_mask_plan
from .launch import DecodeChooser, prepare_decode

# The block lists a BlockMask carries (``update`` refreshes each in place).
LAYOUT_FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


class PagedProblem(NamedTuple):
    """A paged call in the terms of ``prepare_decode``: the BlockMask over logical positions
    (``masks.paged.paged_block_mask``), the score_mod at logical positions, and the mask plan when known
    without tracing the user's mask (None: ``plan_mask``). Both mods read ``kv_lens`` as given."""

    block_mask: BlockMask
    score_mod: Optional[Callable]
    mask_plan: Optional[MaskPlan]


def paged_problem(kv_lens: torch.Tensor, *, q_len: int, q_heads: int, capacity: int, mask_mod: Optional[Callable],
                  score_mod: Optional[Callable], lengths: Optional[Sequence[int]] = None) -> PagedProblem:
    """The ``PagedProblem`` of ``q_len`` query rows of ``q_heads`` heads per sequence over ``capacity``
    logical positions (max_pages * page_size); kv_lens: int32 [B]; lengths: the same as ints when read.

    The default causal mask takes the closed-form BlockMask (``masks.paged.causal_paged_block_mask``),
    built with device ops only: its launch plan (hence the split count) comes from the capacity."""
    from ...masks.tracing import trace_mask_mod

    block_mask = paged_block_mask(mask_mod, kv_lens, q_len, q_heads, capacity, lengths=lengths)
    mask_plan = None
    if mask_mod is None and q_len <= block_mask.BLOCK_SIZE[0]:
        mask_plan = traced_mask_plan(trace_mask_mod(block_mask.mask_mod))
    return PagedProblem(block_mask, logical_score_mod(score_mod, kv_lens, q_len), mask_plan)


class PagedDecode:
    """The paged decode kernel planned for one step; ``run`` per layer, ``update`` per step.

    page_table: int32 [B, max_pages]; kv_lens: int32 [B]; key_cache / value_cache: one layer's pages
    [num_pages, Hkv, page_size, D / Dv] (every layer's have these shapes); query rows: ``q_len`` per
    sequence and ``num_q_heads`` heads, in the caches' dtype. mask_mod / score_mod at logical positions
    (``masks/paged.py``). lengths: kv_lens as ints when the caller read them (validation).
    ``make_chooser(template_query, block_mask, score_mod, page_table, kv_lens)`` (the plan's own buffers)
    returns the tuned-config chooser (``kernels.entry``).
    """

    def __init__(self, page_table: torch.Tensor, kv_lens: torch.Tensor, key_cache: torch.Tensor,
                 value_cache: torch.Tensor, *, num_q_heads: int, q_len: int, mask_mod: Optional[Callable],
                 score_mod: Optional[Callable], scale: float, interpret: bool,
                 lengths: Optional[Sequence[int]] = None,
                 make_chooser: Optional[Callable[..., DecodeChooser]] = None):
        batch = page_table.shape[0]
        self.q_shape = (batch, num_q_heads, q_len)
        self.mask_mod = mask_mod
        self.capacity = page_table.shape[1] * key_cache.shape[2]
        # The plan's own buffers: what every launch (and a graph that captured one) reads.
        self.page_table = page_table.contiguous().clone()
        self.kv_lens = kv_lens.contiguous().clone()
        problem = paged_problem(self.kv_lens, q_len=q_len, q_heads=num_q_heads, capacity=self.capacity,
                                mask_mod=mask_mod, score_mod=score_mod, lengths=lengths)
        self.block_mask = problem.block_mask
        # Only shape, dtype and device of the template are read (and, when a search runs, it is timed on).
        template = torch.empty(*self.q_shape, key_cache.shape[3], dtype=key_cache.dtype, device=key_cache.device)
        chooser = (make_chooser(template, problem.block_mask, problem.score_mod, self.page_table, self.kv_lens)
                   if make_chooser else None)
        self.launch = prepare_decode(template, key_cache.shape[1], value_cache.shape[3], problem.block_mask,
                                     score_mod=problem.score_mod, scale=scale, interpret=interpret,
                                     page_table=self.page_table, kv_lens=self.kv_lens, mask_plan=problem.mask_plan,
                                     choose_config=chooser, preallocate=True)

    def update(self, page_table: torch.Tensor, kv_lens: torch.Tensor, lengths: Optional[Sequence[int]] = None) -> None:
        """The next step's table and lengths (same shapes), copied into the plan's buffers in place with the
        block lists rebuilt from them: device work only for the default mask (a mask_mod's lists are
        rebuilt by ``create_block_mask``, which reads its block counts)."""
        self.page_table.copy_(page_table)
        self.kv_lens.copy_(kv_lens)
        fresh = paged_block_mask(self.mask_mod, self.kv_lens, self.q_shape[2], self.q_shape[1], self.capacity,
                                 lengths=lengths)
        for name in LAYOUT_FIELDS:
            current, new = getattr(self.block_mask, name), getattr(fresh, name)
            if current.shape != new.shape:
                raise RuntimeError(f"PagedDecode.update: block list {name} changed shape {tuple(current.shape)} -> "
                                   f"{tuple(new.shape)}")
            current.copy_(new)
        self.block_mask.trusted()

    def run(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor
            ) -> Tuple[torch.Tensor, torch.Tensor]:
        """out [B, Hq, Lq, Dv] and lse [B, Hq, Lq] float32 of query [B, Hq, Lq, D] over this layer's pages."""
        return self.launch.run(query, key_cache, value_cache)
