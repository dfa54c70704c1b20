"""How the work of context parallelism is spread: per-rank allowed pairs, computed and skipped steps.

- ``work_report`` predicts it for a layout on one process (no communication): for every rank and
  ring step it builds the step's BlockMask and counts the (query, key) pairs the mask allows.
- ``record_ring_stats`` records what ``context_parallel_attention`` actually did on this rank.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional

import torch

from ..masks.block_mask import BlockMask
from ..masks.evaluate import call_mask_mod
from .balance import layout_positions, resolve_load_balance
from .plan import plan_steps

COUNT_BUDGET = 1 << 22  # mask elements evaluated per batch of partial tiles


def allowed_pairs(block_mask: BlockMask, batch: int, heads: int) -> int:
    """(b, h, q, kv) elements the mask allows over ``[batch, heads, Q_LEN, KV_LEN]``.

    Full tiles count their in-bounds area; partial tiles are evaluated element by element.
    """
    q_len, kv_len = block_mask.seq_lengths
    q_bs, kv_bs = block_mask.BLOCK_SIZE
    nq, nkv = block_mask.num_blocks
    rows = (q_len - torch.arange(nq) * q_bs).clamp(max=q_bs)
    cols = (kv_len - torch.arange(nkv) * kv_bs).clamp(max=kv_bs)
    area = rows.view(-1, 1) * cols.view(1, -1)
    full, partial = block_mask.full_blocks().cpu(), block_mask.partial_blocks().cpu()
    layouts_b, layouts_h = full.shape[:2]
    total = int((full.long() * area).sum())
    tiles = partial.nonzero()
    device = block_mask.device
    per_batch = max(1, COUNT_BUDGET // (q_bs * kv_bs))
    q_off, kv_off = torch.arange(q_bs, device=device), torch.arange(kv_bs, device=device)
    for t0 in range(0, tiles.shape[0], per_batch):
        chunk = tiles[t0:t0 + per_batch].to(device)
        n = chunk.shape[0]
        b, h = chunk[:, 0].view(n, 1, 1), chunk[:, 1].view(n, 1, 1)
        q_idx = (chunk[:, 2] * q_bs).view(n, 1, 1) + q_off.view(1, -1, 1)
        kv_idx = (chunk[:, 3] * kv_bs).view(n, 1, 1) + kv_off.view(1, 1, -1)
        inside = (q_idx < q_len) & (kv_idx < kv_len)
        values = call_mask_mod(block_mask.mask_mod, b, h, q_idx.clamp(max=q_len - 1), kv_idx.clamp(max=kv_len - 1),
                               (n, q_bs, kv_bs))
        total += int((values & inside).sum())
    # A layout that broadcasts over B or H stands for every batch entry or head it covers.
    return total * (batch // layouts_b) * (heads // layouts_h)


@dataclass
class WorkReport:
    """Per rank: allowed (b, h, q, kv) pairs, ring steps computed and skipped, for one layout."""

    load_balance: str
    world_size: int
    seq_len: int
    allowed_pairs: List[int]
    steps_computed: List[int]
    steps_skipped: List[int]

    @property
    def imbalance(self) -> float:
        """Busiest rank's pairs over the mean (1.0 = perfectly even; what the slowest rank waits for)."""
        mean = sum(self.allowed_pairs) / len(self.allowed_pairs)
        return max(self.allowed_pairs) / mean if mean else 1.0

    def __str__(self) -> str:
        return (f"{self.load_balance} over {self.world_size} ranks, L={self.seq_len}: pairs per rank "
                f"{self.allowed_pairs} (imbalance {self.imbalance:.3f}), steps skipped {self.steps_skipped}")


def work_report(mask_mod: Callable, seq_len: int, world_size: int, *, load_balance="head_tail",
                B: Optional[int] = None, H: Optional[int] = None, device=None) -> WorkReport:
    """Predict the per-rank work of ``context_parallel_attention`` for one layout, on this process.

    B/H: as in ``create_block_mask`` (None when the mask does not depend on them; counts are then
    per (b, h)).
    """
    balancer = resolve_load_balance(load_balance)
    positions = layout_positions(balancer, seq_len, world_size)
    alignment = balancer.alignment(seq_len, world_size)
    batch, heads = B or 1, H or 1
    pairs, computed, skipped = [], [], []
    for rank in range(world_size):
        plan = plan_steps(mask_mod, batch, heads, positions, rank, balancer.key(), alignment,
                          torch.device(device or "cpu"))
        masks = [m for m in plan.masks if m is not None]
        pairs.append(sum(allowed_pairs(m, batch, heads) for m in masks))
        computed.append(len(masks))
        skipped.append(len(plan.skipped))
    return WorkReport(balancer.key(), world_size, seq_len, pairs, computed, skipped)


@dataclass
class RingStats:
    """What ``context_parallel_attention`` did on this rank while recording (summed over calls).

    ``allowed_pairs`` counts the (b, h, q, kv) pairs of the computed forward steps (counted only
    while recording, since it evaluates the partial tiles once more).
    """

    forward_calls: int = 0
    forward_steps_computed: int = 0
    forward_steps_skipped: int = 0
    backward_steps_computed: int = 0
    backward_steps_skipped: int = 0
    allowed_pairs: int = 0
    skipped_steps: List[List[int]] = field(default_factory=list)  # per forward call: the skipped step numbers


_ACTIVE: List[RingStats] = []


def active_recorders() -> List[RingStats]:
    """The ``RingStats`` being recorded into now (innermost last)."""
    return list(_ACTIVE)


@contextlib.contextmanager
def record_ring_stats() -> Iterator[RingStats]:
    """Record this rank's ring steps: ``with record_ring_stats() as stats: ...`` (covers backward
    passes run inside the block)."""
    stats = RingStats()
    _ACTIVE.append(stats)
    try:
        yield stats
    finally:
        _ACTIVE.remove(stats)
