"""Packed variable-length sequences (FlashAttention-2's ``flash_attn_varlen_func``) as a BlockMask.

Queries are packed ``[total_q, H, D]``, keys ``[total_k, Hkv, D]``; ``cu_seqlens_q`` / ``cu_seqlens_k``
(int32 ``[S + 1]``, on the device, ``cu[0] = 0``) say that sequence ``s`` owns query rows
``[cu_q[s], cu_q[s + 1])`` and keys ``[cu_k[s], cu_k[s + 1])``. Attention over the packed tensors viewed
as ``[1, H, total, D]`` with this module's BlockMask (``B = H = 1``, ``Q_LEN = total_q``,
``KV_LEN = total_k``) is FlashAttention-2's varlen attention, on every backend, unchanged.

The rule (FlashAttention-2's): a query sees only keys of its own sequence; within a sequence of
``Lq_s`` queries and ``Lk_s`` keys, causal is aligned to the bottom-right corner, and
``window = (left, right)`` (-1 = unbounded; causal means ``right = 0``) bounds the keys around the
diagonal. In packed coordinates, with ``diag(q) = q + cu_k[s + 1] - cu_q[s + 1]``, query ``q`` of
sequence ``s`` sees ``kv`` iff

    cu_k[s] <= kv < cu_k[s + 1]  and  diag(q) - left <= kv (left >= 0)  and  kv <= diag(q) + right (right >= 0)

so every row sees one interval ``[first_key(q), last_key(q)]`` (empty when ``first > last``: causal with
``Lq_s > Lk_s``, an empty key sequence). The mask_mod compares ``kv_idx`` with those two per-token
tensors; the layout is built in closed form from ``cu_seqlens`` with no read of the device:

- The rows of a row block are cut into *segments*, the pieces that lie in one sequence (block starts
  and sequence starts, merged: ``NQ + S + 1`` of them). A segment's visible keys are one interval,
  from its first non-empty row's ``first_key`` to its last's ``last_key``. Over the non-empty rows,
  both ends never decrease (a sequence's keys come after the previous one's), so the union of the
  segments' key blocks in a row block is enumerated in order: each segment adds the blocks past the
  last one its predecessor in the block reached. That union is exactly the non-empty tiles.
- A tile is full iff the row block lies in one sequence, none of its rows is empty, and the key block
  lies inside ``[first_key(last row), last_key(first row)]`` (a ragged last key block counts by its
  in-bounds keys); partial = union minus full (in a full row block, the union is one run, so at most
  two partial runs around the full one).
- The transposed (``q_*``) lists are the same construction with the roles of queries and keys swapped:
  key ``kv`` of sequence ``s`` sees the queries ``q`` with ``diag_k(kv) - right <= q <= diag_k(kv) + left``,
  ``diag_k(kv) = kv + cu_q[s + 1] - cu_k[s + 1]``.

Memory is O(row blocks x widest row) and time O(tokens + blocks): the index lists' width is a bound
computed from the host ints (``max_seqlen_*``, ``BLOCK_SIZE``, the window, the number of sequences,
whether queries and keys are the same sequences and, optionally, ``min_seqlen_*``), never the number of
key blocks unless the bound reaches it (``index_widths``). For self-attention packing (``cu_seqlens_q`` and
``cu_seqlens_k`` the same sequences) a block's keys lie within ``max_seqlen - 1`` of its rows, so the width is
about ``(BLOCK + 2 max_seqlen) / BLOCK`` (half that causal) for any lengths. Otherwise, without a
``min_seqlen_*`` hint, the bound must hold for any lengths (a block of 128 one-token queries may meet 128
sequences of ``max_seqlen_k`` keys each), so with many long sequences it reaches the grid; a hint of at least
the block size narrows it to two sequences per block. The lists are Flex's narrow form, which ``BlockMask``
takes as it is (its grid comes from its row counts, never the width), eager or compiled.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from .block_mask import BlockMask, LaunchPlan
from .block_mask_flex import normalize_block_size
from .scalars import as_int

__all__ = ["VarlenLayout", "varlen_layout", "varlen_block_mask", "varlen_mask_mod", "index_widths",
           "sequences_per_block"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# -- widths: how many blocks one row of the lists can hold, from host ints ---------------------------------
def sequences_per_block(block_rows: int, num_seqs: int, min_seqlen: int = 1) -> int:
    """At most how many sequences have rows in one block of ``block_rows`` rows, when every sequence that has
    rows has at least ``min_seqlen`` of them: the first and last may be cut, each one between holds
    ``min_seqlen`` rows or more."""
    return max(0, min(num_seqs, block_rows, 1 + _cdiv(block_rows - 1, max(1, min_seqlen))))


def index_widths(block_rows: int, block_cols: int, num_col_blocks: int, num_seqs: int, max_seqlen_cols: int,
                 min_seqlen_rows: int = 1, before: int = -1, after: int = -1,
                 aligned: bool = False) -> Tuple[int, int]:
    """(width, most full): upper bounds on the blocks (partial + full) and on the full blocks of one row of the
    lists, for row blocks of ``block_rows`` rows over ``num_col_blocks`` column blocks of ``block_cols``. Both
    index lists of a row (partial, full) are ``width`` wide: the kernels read them with the same strides.

    A row sees at most ``max_seqlen_cols`` columns (fewer, ``before + after + 1``, under a two-sided window),
    all in its own sequence; a row block meets at most ``m = sequences_per_block(...)`` sequences, whose
    intervals together span at most ``min(m * max_seqlen_cols, block_rows + m * (before + after))`` columns;
    an interval of ``l`` columns touches at most ``floor((l + block_cols - 2) / block_cols) + 1`` column blocks.
    Full blocks exist only in a row block of one sequence, inside every row's interval: at most
    ``floor(l / block_cols) + 1`` (the ragged last block counts when its in-bounds columns are covered).

    ``aligned``: rows and columns are the same sequences (self-attention packing: every sequence has as many
    rows as columns, so a row's diagonal is the row itself). A row then sees only columns within
    ``reach = max_seqlen_cols - 1`` of it (``before`` / ``after`` when smaller), so a row block's columns lie in
    ``[first row - reach_before, last row + reach_after]``, one interval of ``block_rows + reach_before +
    reach_after`` columns however many sequences the block meets: causal (``after = 0``) ``block_rows +
    max_seqlen - 1``, bidirectional ``block_rows + 2 max_seqlen - 2``.
    """
    m = sequences_per_block(block_rows, num_seqs, min_seqlen_rows)
    span = m * max_seqlen_cols
    row_span = max_seqlen_cols
    if before >= 0 and after >= 0:
        span = min(span, block_rows + m * (before + after))
        row_span = min(row_span, before + after + 1)
    union = (span + m * (block_cols - 2)) // block_cols + m if m else 0
    if aligned and m:
        reach = max(max_seqlen_cols - 1, 0)
        reach_before, reach_after = (reach if side < 0 else min(side, reach) for side in (before, after))
        union = min(union, (block_rows + reach_before + reach_after + block_cols - 2) // block_cols + 1)
    most_full = max(0, min(num_col_blocks, row_span // block_cols + 1))
    return max(most_full, min(num_col_blocks, union)), most_full


def computed_blocks_bound(total_q: int, total_k: int, max_seqlen_q: int, max_seqlen_k: int, num_seqs: int,
                          block_size: Tuple[int, int], width: int) -> int:
    """An upper bound on the tiles the layout visits, from host ints (the launch plan's ``computed_blocks``):
    a visited tile holds a visible pair of one sequence, so it is one of that sequence's query blocks times
    one of its key blocks, at most ``(Lq_s / Bq + 2) (Lk_s / Bk + 2)`` per sequence."""
    q_bs, kv_bs = block_size
    nq, nkv = _cdiv(total_q, q_bs), _cdiv(total_k, kv_bs)
    pairs = (min(total_q * max_seqlen_k, total_k * max_seqlen_q) // (q_bs * kv_bs) + 2 * nq + 2 * nkv
             + 4 * num_seqs)
    return min(pairs, nq * width, nq * nkv)


# -- the mask_mod -------------------------------------------------------------------------------------------
def varlen_mask_name(causal: bool, window: Tuple[int, int]) -> str:
    """``varlen``, ``varlen_causal``, ``varlen_window_L_R``, ``varlen_causal_window_L_R`` (window as given,
    with causal's right = 0)."""
    left, right = window
    name = "varlen_causal" if causal else "varlen"
    plain = (-1, 0) if causal else (-1, -1)
    return name if (left, right) == plain else f"{name}_window_{left}_{right}"


def varlen_mask_mod(first_key: torch.Tensor, last_key: torch.Tensor, name: str = "varlen") -> Callable:
    """The mask_mod of per-row key intervals: query ``q_idx`` sees ``kv_idx`` iff
    ``first_key[q_idx] <= kv_idx <= last_key[q_idx]`` (``first_key``, ``last_key``: int ``[total_q]``).
    Traces to two loads and two comparisons per row, so the kernels inline it."""
    def varlen(b, h, q_idx, kv_idx):
        return (kv_idx >= first_key[q_idx]) & (kv_idx <= last_key[q_idx])

    varlen.__name__ = varlen.__qualname__ = name
    return varlen


# -- the layout ---------------------------------------------------------------------------------------------
@dataclass
class VarlenLayout:
    """A varlen BlockMask and the per-token tensors it was built from (all on ``cu_seqlens``' device).

    - ``block_mask``: the ``BlockMask`` over ``[1, 1, total_q, total_k]`` (index lists ``widths`` wide, at most
      the grid; ``exact_layout``);
    - ``first_key`` / ``last_key``: int32 ``[total_q]``, the keys each query row sees (none when first > last),
      which its mask_mod reads;
    - built on first access: ``seq_of_query``, int32 ``[total_q]``, the sequence of each query row (``S`` past
      ``cu_q[S]``); ``diagonal``, int32 ``[total_q]``, ``q + cu_k[s + 1] - cu_q[s + 1]``, the key on the row's
      causal diagonal (far below 0 past ``cu_q[S]``); ``fits``, bool 0-d, whether every row of the index
      lists holds all its blocks (always, unless a ``min_seqlen_*`` hint or ``same_sequences=True`` was
      wrong: such a build also asserts it on the device, ``torch._assert_async``).
    """

    block_mask: BlockMask
    first_key: torch.Tensor
    last_key: torch.Tensor
    sequence_index: torch.Tensor   # int64 [total_q]: seq_of_query
    sequence_shift: torch.Tensor   # int64 [S + 1]: cu_k[s + 1] - cu_q[s + 1]
    union_count: torch.Tensor      # int64 [NQ + NKV]: blocks per row of the kv lists, then of the q lists
    widths: Tuple[int, int]        # the index lists' widths (kv, q)

    @functools.cached_property
    def seq_of_query(self) -> torch.Tensor:
        return self.sequence_index.to(torch.int32)

    @functools.cached_property
    def diagonal(self) -> torch.Tensor:
        rows = torch.arange(self.sequence_index.numel(), device=self.sequence_index.device, dtype=torch.int32)
        return rows + self.sequence_shift.to(torch.int32).index_select(0, self.sequence_index)

    @functools.cached_property
    def fits(self) -> torch.Tensor:
        num_q_blocks = self.block_mask.num_blocks[0]
        return ((self.union_count[:num_q_blocks] <= self.widths[0]).all()
                & (self.union_count[num_q_blocks:] <= self.widths[1]).all())


@dataclass(frozen=True)
class _Direction:
    """One direction of the layout as host ints: rows (queries; keys for the transposed lists) over columns."""

    total_rows: int
    total_cols: int
    block_rows: int
    block_cols: int
    before: int               # columns before the diagonal a row may see (-1: unbounded)
    after: int                # columns after it (-1: unbounded)
    width: int                # of the index lists (partial and full alike: kernels read both with one stride)
    most_full: int            # at most this many full blocks per row (the launch plan's bound)

    @property
    def num_row_blocks(self) -> int:
        return _cdiv(self.total_rows, self.block_rows)

    @property
    def num_col_blocks(self) -> int:
        return _cdiv(self.total_cols, self.block_cols)


def _per_direction(choice: torch.Tensor):
    """``pick(kv_value, q_value)``: the value of each element's direction (``choice`` True: the transposed
    one), a plain int when both directions agree (so that it broadcasts without a tensor)."""
    def pick(kv_value: int, q_value: int):
        return kv_value if kv_value == q_value else torch.where(choice, q_value, kv_value)
    return pick


def _sequence_tables(kv: _Direction, q: _Direction, cu_q: torch.Tensor, cu_k: torch.Tensor) -> torch.Tensor:
    """int64 ``[2 (S + 1), 7]``: ``S + 1`` rows per direction (kv lists, then q lists), one per sequence and an
    empty one at index ``S`` (rows past ``cu[S]``). A row of sequence ``s`` sees the columns
    ``lo = max(col0, row + shift - before)`` to ``hi = min(col1, row + shift + after)``; the columns are
    ``col0, col1, shift, shift - before, shift + after, first non-empty row, last non-empty row``
    (first > last when none). ``cu_q``, ``cu_k``: int64 ``[S + 1]``."""
    pick = _per_direction(torch.arange(2, device=cu_q.device).view(2, 1) == 1)
    # Unbounded sides become a distance no diagonal reaches, so one formula serves every window.
    reach = kv.total_rows + kv.total_cols + 2

    def bounded(side: int) -> int:
        return side if 0 <= side < reach else reach

    before, after = pick(bounded(kv.before), bounded(q.before)), pick(bounded(kv.after), bounded(q.after))
    total_rows, total_cols = pick(kv.total_rows, q.total_rows), pick(kv.total_cols, q.total_cols)
    cu_r = torch.stack([cu_q, cu_k])                                               # [2, S + 1]
    cu_c = cu_r.flip(0)
    col0 = torch.cat([cu_c[:, :-1], cu_c[:, -1:]], 1).clamp(max=total_cols)
    col1 = torch.cat([cu_c[:, 1:], cu_c[:, -1:]], 1).clamp(max=total_cols) - 1
    # (The empty entry's diagonal lies before every column: its rows see nothing, whatever the window.)
    shift = torch.cat([cu_c[:, 1:] - cu_r[:, 1:], cu_r.new_full((2, 1), -reach)], 1)
    row0 = torch.cat([cu_r[:, :-1], cu_r[:, -1:]], 1).clamp(max=total_rows)
    row1 = torch.cat([cu_r[:, 1:], cu_r[:, -1:]], 1).clamp(max=total_rows) - 1
    # Non-empty rows: lo <= hi, i.e. row + shift + after >= col0 and row + shift - before <= col1.
    first_row = torch.maximum(row0, col0 - shift - after)
    last_row = torch.where(col0 <= col1, torch.minimum(row1, col1 - shift + before), first_row - 1)
    table = torch.stack([col0, col1, shift, shift - before, shift + after, first_row, last_row], dim=2)
    return table.view(-1, 7)


def _block_lists(kv: _Direction, q: _Direction, tables: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor):
    """The block lists of both directions, computed together (the number of tensor operations, not their size,
    is what costs at 64k tokens). Returns, per direction, ``(num, indices, full_num, full_indices)`` int32
    ``[NR]``, ``[NR, width]``, ``[NR]``, ``[NR, width]``, and the union counts (partial + full)
    ``[NR_kv + NR_q]`` before they were clipped to the width. ``tables``: ``_sequence_tables``."""
    device = cu_q.device
    # Segments: the pieces of the rows inside one row block and one sequence, in row order (a sequence that
    # starts at a block start, or has no rows, gives an empty one). The transposed direction's rows follow
    # the first's, shifted by its row count, so one sort and one search serve both.
    shift_rows = kv.total_rows
    cu_rows = torch.cat([cu_q.clamp(max=kv.total_rows), cu_k.clamp(max=q.total_rows) + shift_rows])
    cuts = torch.cat([torch.arange(0, kv.num_row_blocks * kv.block_rows, kv.block_rows, device=device),
                      torch.arange(shift_rows, shift_rows + q.num_row_blocks * q.block_rows, q.block_rows,
                               device=device), cu_rows])
    at = torch.sort(cuts).values                                                    # [P]
    transposed = at >= shift_rows
    pick = _per_direction(transposed)
    row_shift = pick(0, shift_rows)
    starts = at - row_shift
    ends = torch.cat([at[1:], at.new_full((1,), shift_rows + q.total_rows)]) - row_shift
    seg = tables[torch.searchsorted(cu_rows, at, right=True) - 1]                   # [P, 7] (cu[0] = 0)
    block_rows, block_cols = pick(kv.block_rows, q.block_rows), pick(kv.block_cols, q.block_cols)
    local_block = (starts // block_rows).clamp_(max=pick(kv.num_row_blocks - 1, q.num_row_blocks - 1))
    block = local_block + pick(0, kv.num_row_blocks)                                # row block, both directions
    first = torch.maximum(starts, seg[:, 5])                                        # its non-empty rows
    last = torch.minimum(ends - 1, seg[:, 6])
    nonempty = first <= last
    lo = torch.maximum(seg[:, 0], first + seg[:, 3])                                # the columns it sees
    hi = torch.minimum(seg[:, 1], last + seg[:, 4])
    col_a, col_b = lo // block_cols, hi // block_cols

    # Its new column blocks: past the last block that an earlier segment of its row block reached. Over
    # non-empty segments col_b never decreases, so a running max of (row block, col_b) finds it.
    block_key = block * (max(kv.num_col_blocks, q.num_col_blocks) + 1)
    reached = torch.cummax(torch.where(nonempty, block_key + col_b, -1), 0).values
    reached = torch.cat([reached.new_full((1,), -1), reached[:-1]]) - block_key    # < 0: none in its row block
    new_start = torch.maximum(col_a, reached + 1)
    new_count = torch.where(nonempty, (col_b - new_start + 1).clamp_(min=0), 0)

    # Full blocks: a segment that is its whole row block with every row non-empty, the column blocks inside
    # [lo(last row), hi(first row)] (a ragged last column block counts by its in-bounds columns).
    block_first = local_block * block_rows
    covers = (first == block_first) & (last == (block_first + block_rows).clamp_(max=pick(kv.total_rows,
                                                                                           q.total_rows)) - 1)
    max_lo = torch.maximum(seg[:, 0], last + seg[:, 3])
    min_hi = torch.minimum(seg[:, 1], first + seg[:, 4])
    full0 = (max_lo + block_cols - 1) // block_cols
    last_col_block = pick(kv.num_col_blocks - 1, q.num_col_blocks - 1)
    full1 = torch.where(min_hi >= pick(kv.total_cols, q.total_cols) - 1, last_col_block,
                        (min_hi + 1) // block_cols - 1)
    full_count = torch.where(covers, (full1 - full0 + 1).clamp_(min=0), 0)
    num_blocks = kv.num_row_blocks + q.num_row_blocks
    counts = torch.zeros(num_blocks, 3, dtype=torch.int64, device=device).index_add_(
        0, block, torch.stack([new_count, full_count, torch.where(covers, full0, 0)], 1))
    union_count, full_num, full_first = counts.unbind(1)

    # The partial lists, slot by slot: slot t of a row block holds t + offset, the offset being that of the
    # run the slot falls in. A segment's run starts at slot `slot` with offset new_start - slot; in a row
    # block with full blocks (one segment, one run) the full run is skipped, which adds full_count to the
    # offset. Placing each change of the offset at its slot (flat over both directions' [NR, width + 1]
    # grids, a last column for slots past the width) and summing them up gives every slot's offset;
    # padding slots get whatever follows.
    below = torch.cumsum(new_count, 0) - new_count
    slot = below - (torch.cumsum(union_count, 0) - union_count)[block]
    offset = new_start - slot
    exit_offset = offset + full_count
    change = offset - torch.cat([exit_offset.new_zeros(1), exit_offset[:-1]])
    kv_cells = kv.num_row_blocks * (kv.width + 1)
    last_slot = pick(kv.width, q.width)
    row_base = pick(0, kv_cells) + local_block * (last_slot + 1)
    where = torch.cat([row_base + slot.clamp(max=last_slot),
                       row_base + (full0 - col_a).clamp_(min=0).clamp_(max=last_slot)])
    changes = torch.zeros(kv_cells + q.num_row_blocks * (q.width + 1), dtype=torch.int32, device=device)
    offsets = changes.index_add_(0, where, torch.cat([change, full_count]).to(torch.int32)).cumsum(0, dtype=torch.int32)

    def finish(rows: slice, cells: slice, direction: _Direction):
        """The four lists of the row blocks ``rows`` (their slots: ``cells`` of the flat grid)."""
        width, last_block = direction.width, max(direction.num_col_blocks - 1, 0)
        slots = torch.arange(width, device=device, dtype=torch.int32)
        partial = offsets[cells].view(-1, width + 1)[:, :width] + slots
        full = full_first[rows].to(torch.int32)[:, None] + slots
        return ((union_count[rows] - full_num[rows]).clamp_(max=width).to(torch.int32), partial.clamp_(0, last_block),
                full_num[rows].clamp(max=direction.most_full).to(torch.int32), full.clamp_(0, last_block))

    nr = kv.num_row_blocks
    if (kv.width, kv.most_full, kv.num_col_blocks) == (q.width, q.most_full, q.num_col_blocks):
        both = finish(slice(None), slice(None), kv)  # (self-attention: one pass, then the rows split)
        return tuple(t[:nr] for t in both), tuple(t[nr:] for t in both), union_count
    return (finish(slice(0, nr), slice(0, kv_cells), kv), finish(slice(nr, None), slice(kv_cells, None), q),
            union_count)


def _check_cu(cu: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 1:
        got = f"shape {tuple(cu.shape)}" if isinstance(cu, torch.Tensor) else type(cu).__name__
        raise ValueError(f"{what} must be a 1-D integer tensor [S + 1] (cumulative lengths from 0), got {got}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{what} must be int32 or int64, got {cu.dtype}")
    return cu


def _check_window(window, causal: bool) -> Tuple[int, int]:
    try:
        left, right = window
    except (TypeError, ValueError):
        raise ValueError(f"window must be a (left, right) pair of ints >= -1, got {window!r}") from None
    left = as_int(left, "window[0]", minimum=-1, expected="an int >= -1 (-1: unbounded)")
    right = as_int(right, "window[1]", minimum=-1, expected="an int >= -1 (-1: unbounded)")
    return left, 0 if causal else right


def _same_sequences(cu_q: torch.Tensor, cu_k: torch.Tensor, same_sequences: Optional[bool]) -> bool:
    """``varlen_layout``'s ``same_sequences`` as a bool (True asserts equal values on the device)."""
    if same_sequences is None:
        return cu_q is cu_k
    if not isinstance(same_sequences, bool):
        raise ValueError(f"same_sequences must be None, True or False, got {same_sequences!r}")
    if same_sequences and cu_q is not cu_k:
        torch._assert_async((cu_q == cu_k).all(), "varlen_layout: same_sequences=True but cu_seqlens_q and "
                                                  "cu_seqlens_k differ; the index lists cannot hold their blocks")
    return same_sequences


def varlen_layout(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                  *, total_q: int, total_k: int, causal: bool = False, window: Tuple[int, int] = (-1, -1),
                  BLOCK_SIZE=128, min_seqlen_q: int = 1, min_seqlen_k: int = 1,
                  same_sequences: Optional[bool] = None) -> VarlenLayout:
    """The ``VarlenLayout`` of packed sequences (see the module docstring), built without reading the device.

    cu_seqlens_q / cu_seqlens_k: int32 (or int64) ``[S + 1]``, cumulative lengths from 0, on the device the
    mask will live on. max_seqlen_q / max_seqlen_k: host ints, at least every sequence's length (as
    FlashAttention-2 takes them). total_q / total_k: the packed lengths (``cu[S]``; rows or keys past
    ``cu[S]`` see nothing). causal: bottom-right aligned. window: ``(left, right)``, -1 unbounded (causal
    sets right to 0). BLOCK_SIZE: an int or a ``(Q_BLOCK_SIZE, KV_BLOCK_SIZE)`` pair.
    min_seqlen_q / min_seqlen_k: optional host hints, a length no non-empty query (key) sequence is
    shorter than; they narrow the index lists (a block of B rows then meets at most ``1 + ceil((B - 1) /
    min)`` sequences instead of B). A wrong hint fails ``torch._assert_async`` on the device (never a silent
    read past a list) and leaves ``fits`` False. same_sequences: whether queries and keys are the same
    sequences (self-attention packing, ``cu_seqlens_q == cu_seqlens_k``), which bounds the lists' width by
    ``max_seqlen`` around each block for any lengths (``index_widths(aligned=True)``). None (default): when
    ``cu_seqlens_q is cu_seqlens_k`` (no device read); True: asserts the values equal on the device
    (``torch._assert_async``, as a hint); False: never assumed.
    """
    cu_q, cu_k = _check_cu(cu_seqlens_q, "cu_seqlens_q"), _check_cu(cu_seqlens_k, "cu_seqlens_k")
    if cu_q.shape != cu_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both be [S + 1], got {tuple(cu_q.shape)} and "
                         f"{tuple(cu_k.shape)}")
    if cu_q.device != cu_k.device:
        raise ValueError(f"cu_seqlens_q is on {cu_q.device} but cu_seqlens_k on {cu_k.device}")
    max_q = as_int(max_seqlen_q, "max_seqlen_q", minimum=0)
    max_k = as_int(max_seqlen_k, "max_seqlen_k", minimum=0)
    total_q, total_k = as_int(total_q, "total_q"), as_int(total_k, "total_k")
    hint_q, hint_k = as_int(min_seqlen_q, "min_seqlen_q"), as_int(min_seqlen_k, "min_seqlen_k")
    left, right = _check_window(window, bool(causal))
    q_bs, kv_bs = normalize_block_size(BLOCK_SIZE)
    num_seqs = cu_q.numel() - 1
    nq, nkv = _cdiv(total_q, q_bs), _cdiv(total_k, kv_bs)
    aligned = _same_sequences(cu_seqlens_q, cu_seqlens_k, same_sequences)
    if aligned:  # one set of lengths, which both ints bound
        max_q = max_k = min(max_q, max_k)

    kv_widths = index_widths(q_bs, kv_bs, nkv, num_seqs, max_k, hint_q, left, right, aligned)
    q_widths = index_widths(kv_bs, q_bs, nq, num_seqs, max_q, hint_k, right, left, aligned)
    kv = _Direction(total_q, total_k, q_bs, kv_bs, left, right, *kv_widths)
    q = _Direction(total_k, total_q, kv_bs, q_bs, right, left, *q_widths)
    cu_q64, cu_k64 = cu_q.to(torch.int64), cu_k.to(torch.int64)
    tables = _sequence_tables(kv, q, cu_q64, cu_k64)
    kv_lists, q_lists, union_count = _block_lists(kv, q, tables, cu_q64, cu_k64)
    if hint_q > 1 or hint_k > 1:  # without hints the widths are proven bounds
        fits = ((union_count[:nq] <= kv.width).all() & (union_count[nq:] <= q.width).all())
        torch._assert_async(fits, "varlen_layout: a sequence is shorter than min_seqlen_q / min_seqlen_k; the "
                                  "index lists cannot hold its blocks")

    # Per-token tensors of the mask_mod: each query row's key interval, from its sequence's table row.
    rows_per_seq = torch.diff(cu_q64.clamp(max=total_q), append=cu_q64.new_full((1,), total_q))   # [S + 1]
    seq = torch.repeat_interleave(rows_per_seq, output_size=total_q)                         # [total_q] int64
    rows = torch.arange(total_q, device=cu_q.device, dtype=torch.int32)

    def per_row(column: int) -> torch.Tensor:
        return tables[:num_seqs + 1, column].to(torch.int32).index_select(0, seq)

    # (right = 0, as causal: the diagonal never passes the sequence's last key, so no minimum is needed.)
    first_key = per_row(0) if left < 0 else torch.maximum(per_row(0), rows + per_row(3))
    last_key = (per_row(1) if right < 0 else rows + per_row(2) if right == 0
                else torch.minimum(per_row(1), rows + per_row(4)))
    mask_mod = varlen_mask_mod(first_key, last_key, varlen_mask_name(bool(causal), (left, right)))

    plan = LaunchPlan(kv_widths[0], kv_widths[1], q_widths[0], q_widths[1], exact=False,
                      computed_blocks=computed_blocks_bound(total_q, total_k, max_q, max_k, num_seqs, (q_bs, kv_bs),
                                                            kv_widths[0]),
                      heavy_tiles_last=False)  # per sequence causal, not over the packed rows

    fields = {}
    for prefix, (num, indices, full_num, full_indices) in (("kv", kv_lists), ("q", q_lists)):
        fields.update({f"{prefix}_num_blocks": num.view(1, 1, -1), f"{prefix}_indices": indices[None, None],
                       f"full_{prefix}_num_blocks": full_num.view(1, 1, -1),
                       f"full_{prefix}_indices": full_indices[None, None]})
    block_mask = BlockMask(**fields, BLOCK_SIZE=(q_bs, kv_bs), seq_lengths=(total_q, total_k), mask_mod=mask_mod,
                           launch_plan=plan)
    block_mask.exact_layout = True  # closed form: empty tiles allow nothing, full tiles everything
    if not torch.compiler.is_compiling():  # consistent by construction (a compiled region knows no versions)
        block_mask.trusted()
    return VarlenLayout(block_mask, first_key, last_key, seq, tables[:num_seqs + 1, 2], union_count,
                        (kv.width, q.width))


def varlen_block_mask(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                      max_seqlen_k: int, *, total_q: int, total_k: int, causal: bool = False,
                      window: Tuple[int, int] = (-1, -1), BLOCK_SIZE=128, min_seqlen_q: int = 1,
                      min_seqlen_k: int = 1, same_sequences: Optional[bool] = None) -> BlockMask:
    """The BlockMask of FlashAttention-2's varlen attention over ``[1, 1, total_q, total_k]``; see
    ``varlen_layout`` for the arguments (and for the per-token tensors it is built from)."""
    return varlen_layout(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, total_q=total_q, total_k=total_k,
                         causal=causal, window=window, BLOCK_SIZE=BLOCK_SIZE, min_seqlen_q=min_seqlen_q,
                         min_seqlen_k=min_seqlen_k, same_sequences=same_sequences).block_mask
