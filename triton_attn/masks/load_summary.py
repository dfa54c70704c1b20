"""Per-tile min/max of a captured tensor over index ranges, in O(1) per tile.

The interval analysis (``interval.py``) meets loads like ``doc_ids[b, q_idx]`` where an index
ranges over a tile. One reduction pass cuts the tensor into granules (the largest power of two
dividing both block sizes, grown only to bound the table size), then a sparse table of mins and
maxes over power-of-two runs of granules answers any range with two overlapping lookups per
ranged dimension (at most two ranged dimensions; further ones use the global min/max).
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch

# Largest sparse table (elements) built for one captured tensor; the granule grows beyond it.
TABLE_LIMIT = 1 << 22


def _sparse_table(values: torch.Tensor, dim: int, reduce_min: bool) -> torch.Tensor:
    """``[K, *values.shape]``: level k holds the min (max) over ``2**k`` consecutive entries along ``dim``
    (starting at each position; entries that would run past the end are padding, never read)."""
    fn = torch.minimum if reduce_min else torch.maximum
    n = values.shape[dim]
    levels = [values]
    k = 1
    while (1 << k) <= n:
        prev = levels[-1]
        half = 1 << (k - 1)
        count = n - (1 << k) + 1
        nxt = fn(prev.narrow(dim, 0, count), prev.narrow(dim, half, count))
        pad = n - count
        if pad:
            nxt = torch.cat([nxt, prev.narrow(dim, n - pad, pad)], dim=dim)
        levels.append(nxt)
        k += 1
    return torch.stack(levels)


def _floor_log2(length: torch.Tensor) -> torch.Tensor:
    """floor(log2(length)) for int64 ``length >= 1``, exactly."""
    level = torch.floor(torch.log2(length.to(torch.float64))).to(torch.int64)
    level = torch.where(torch.bitwise_left_shift(torch.ones_like(level), level) > length, level - 1, level)
    return torch.where(torch.bitwise_left_shift(torch.ones_like(level), level + 1) <= length, level + 1, level)


class LoadSummary:
    """Min/max summaries of one captured tensor for loads with the given ranged dims (at most two)
    and reduced dims (collapsed to their global min/max)."""

    def __init__(self, tensor: torch.Tensor, ranged: Tuple[int, ...], reduced: Tuple[int, ...], granule: int):
        t = tensor.detach().to(torch.int64)
        lo, hi = t, t
        for d in reduced:
            lo, hi = lo.amin(dim=d, keepdim=True), hi.amax(dim=d, keepdim=True)
        self.ranged, self.reduced = ranged, reduced
        others = 1
        for d in range(t.dim()):
            if d not in ranged:
                others *= lo.shape[d]
        # Grow the granule until the tables stay small.
        sizes = [t.shape[d] for d in ranged]
        granules = [granule] * len(ranged)

        def table_size():
            total = others
            for size, g in zip(sizes, granules):
                n = -(-size // g)
                total *= n * max(1, n.bit_length())
            return total

        while table_size() > TABLE_LIMIT:
            widest = max(range(len(ranged)), key=lambda i: -(-sizes[i] // granules[i]))
            granules[widest] *= 2
        self.granules = granules
        for d, g in zip(ranged, granules):
            lo, hi = self._block_reduce(lo, d, g, True), self._block_reduce(hi, d, g, False)
        # Sparse tables: levels of the last ranged dim first, then (2-d) of the first one.
        self.lo_table, self.hi_table = lo, hi
        for d in reversed(ranged):
            # Each table build stacks a new leading level dim, shifting data dims by one.
            shift = 0 if d == ranged[-1] else 1
            self.lo_table = _sparse_table(self.lo_table, d + shift, True)
            self.hi_table = _sparse_table(self.hi_table, d + shift, False)

    @staticmethod
    def _block_reduce(values: torch.Tensor, dim: int, granule: int, reduce_min: bool) -> torch.Tensor:
        if granule == 1:
            return values
        size = values.shape[dim]
        n_blocks = -(-size // granule)
        pad = n_blocks * granule - size
        if pad:  # pad with the last value, which changes no min/max of a block containing it
            last = values.narrow(dim, size - 1, 1)
            values = torch.cat([values, last.expand(*[pad if i == dim else s for i, s in enumerate(last.shape)])],
                               dim=dim)
        shape = list(values.shape)
        shape[dim:dim + 1] = [n_blocks, granule]
        blocks = values.reshape(shape)
        return blocks.amin(dim=dim + 1) if reduce_min else blocks.amax(dim=dim + 1)

    def query(self, clamped: Sequence) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-tile (lo, hi) of ``tensor[ranges]``; ``clamped``: per index dim, bounds with ``.lo``/``.hi`` in range."""
        starts = []  # per ranged dim: (level, first block, second block)
        for d, g in zip(self.ranged, self.granules):
            first, last = torch.floor_divide(clamped[d].lo, g), torch.floor_divide(clamped[d].hi, g)
            last = torch.maximum(first, last)  # lo > hi only on poisoned tiles: keep the query in range
            level = _floor_log2(last - first + 1)
            second = last - torch.bitwise_left_shift(torch.ones_like(level), level) + 1
            starts.append((level, first, second))
        base = []
        for d, n in enumerate(clamped):
            if d in self.reduced:
                base.append(0)
            elif d in self.ranged:
                base.append(None)
            else:
                base.append(n.lo)
        # Table dims: [level of each ranged dim, in order, *data dims].
        levels = [level for level, _, _ in starts]
        lo = hi = None
        choices = [(0,), (1,)] if len(starts) == 1 else [(0, 0), (0, 1), (1, 0), (1, 1)]
        for choice in choices:
            position = list(base)
            for which, d, (_, first, second) in zip(choice, self.ranged, starts):
                position[d] = first if which == 0 else second
            index = tuple(levels + position)
            lo_part, hi_part = self.lo_table[index], self.hi_table[index]
            lo = lo_part if lo is None else torch.minimum(lo, lo_part)
            hi = hi_part if hi is None else torch.maximum(hi, hi_part)
        return lo, hi
