"""Interval analysis of a traced mask_mod: classify tiles as empty, full or "maybe" without
evaluating the mask element by element.

Every node of the traced graph (see ``tracing.py``) is evaluated once per *vector of tiles*: a
tile grid chunk is described by tensors that broadcast to ``[B', H', R, NKV]`` (batch, head,
query-block rows, kv blocks). A numeric node evaluates to an ``Num`` (per-tile lower/upper bounds
of every value it takes on the tile, or "unknown"), a bool node to a ``Truth`` (per tile: can it be
False, can it be True). A tile is empty when the predicate cannot be True, full when it cannot be
False, "maybe" otherwise; the caller evaluates the maybe tiles exactly.

Soundness rules (refinement makes the result exact, so imprecision only costs time):

- Anything that cannot be bounded soundly is "unknown" (floats are always unknown: their
  rounding is not modelled; integer bounds that might overflow int64 are unknown).
- Operations that raise in eager PyTorch (integer division or modulo by zero, indexing out of
  range, negative integer powers) *poison* the tiles where they may happen: those tiles are
  forced to "maybe", so the exact evaluation raises the same error the exact compiler raises.
- Loads ``captured[i0, i1, ...]`` use min/max summaries of the captured tensor: along one
  ranged index dimension a sparse table over blocks of ``G`` elements (``G`` a power of two
  dividing the tile sizes, so a tile-aligned ``q_idx`` range is answered exactly), point
  dimensions are gathered, and any further ranged dimension is reduced to its global min/max.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from .tracing import Node, TracedMod

_LIMIT = 1 << 61  # integer bounds beyond this might overflow int64 arithmetic: give up on them


@dataclass
class Num:
    """Per-tile bounds of a numeric value; ``lo is None`` means unknown (any value)."""

    lo: Optional[torch.Tensor]
    hi: Optional[torch.Tensor]

    @property
    def known(self) -> bool:
        return self.lo is not None


@dataclass
class Truth:
    """Per-tile: can the bool value be False somewhere in the tile, can it be True."""

    can_false: torch.Tensor
    can_true: torch.Tensor


UNKNOWN = Num(None, None)


def graph_args(node: Node, seen: Optional[set] = None) -> set:
    """The index arguments (b, h, q_idx, kv_idx) a graph depends on."""
    found: set = set()
    stack, visited = [node], set()
    while stack:
        current = stack.pop()
        if id(current) in visited:
            continue
        visited.add(id(current))
        if current.op == "arg":
            found.add(current.args[0])
        stack.extend(a for a in current.args if isinstance(a, Node))
    return found


def _sparse_tables(values: torch.Tensor, reduce_min: bool) -> torch.Tensor:
    """``[K, ..., n]``: level k holds the min (max) over ``2**k`` consecutive entries of the last dim."""
    levels = [values]
    n = values.shape[-1]
    k = 1
    while (1 << k) <= n:
        prev = levels[-1]
        half = 1 << (k - 1)
        a, b = prev[..., : n - (1 << k) + 1], prev[..., half: half + n - (1 << k) + 1]
        nxt = torch.minimum(a, b) if reduce_min else torch.maximum(a, b)
        pad = n - nxt.shape[-1]
        levels.append(torch.nn.functional.pad(nxt, (0, pad)) if pad else nxt)
        k += 1
    return torch.stack(levels)


class _LoadSummary:
    """Min/max of one captured tensor over ranges of one dimension (others gathered or reduced)."""

    def __init__(self, tensor: torch.Tensor, range_dim: Optional[int], reduce_dims: Tuple[int, ...], granule: int):
        t = tensor.detach()
        if t.dtype == torch.bool:
            t = t.to(torch.int64)
        else:
            t = t.to(torch.int64)
        for d in sorted(reduce_dims, reverse=True):
            t = torch.cat([t.amin(dim=d, keepdim=True), t.amax(dim=d, keepdim=True)], dim=d)
        # After the reduction the reduced dims have size 2 (min, max); keep both by reducing again
        # when reading: lo from index 0, hi from index 1.
        self.reduce_dims = reduce_dims
        self.range_dim = range_dim
        self.granule = granule
        if range_dim is None:
            self.lo_table = self.hi_table = None
            self.base = t
            return
        size = t.shape[range_dim]
        n_blocks = -(-size // granule)
        moved = t.movedim(range_dim, -1)
        pad = n_blocks * granule - size
        if pad:
            moved = torch.cat([moved, moved[..., -1:].expand(*moved.shape[:-1], pad)], dim=-1)
        blocks = moved.reshape(*moved.shape[:-1], n_blocks, granule)
        self.lo_table = _sparse_tables(blocks.amin(dim=-1), True)   # [K, ..., n_blocks]
        self.hi_table = _sparse_tables(blocks.amax(dim=-1), False)
        self.size = size


class IntervalEvaluator:
    """Evaluates a traced mask graph over tile vectors (see module docstring)."""

    def __init__(self, traced: TracedMod, block_size: Tuple[int, int], device: torch.device):
        self.traced = traced
        self.device = device
        q_bs, kv_bs = block_size
        self.granule = math.gcd(q_bs, kv_bs) & -math.gcd(q_bs, kv_bs)  # largest power of two dividing both
        self.captured = [t.to(device) for t in traced.captured]
        self._summaries: Dict[tuple, _LoadSummary] = {}
        self._scalars: Dict[int, torch.Tensor] = {}

    # -- public ---------------------------------------------------------------------------------
    def classify(self, leaves: Dict[str, Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``leaves`` maps b/h/q_idx/kv_idx to (lo, hi) int64 tensors broadcasting to the tile grid.

        Returns (can_false, can_true) bool tensors (broadcastable to the grid) with poisoned tiles
        forced to maybe.
        """
        self._leaves = leaves
        self._memo: Dict[int, object] = {}
        self._poison: Optional[torch.Tensor] = None
        result = self._truth(self._run(self.traced.graph))
        can_false, can_true = result.can_false, result.can_true
        if self._poison is not None:
            can_false = can_false | self._poison
            can_true = can_true | self._poison
        return can_false, can_true

    # -- helpers --------------------------------------------------------------------------------
    def _t(self, value, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(value, dtype=dtype, device=self.device)

    def _poison_where(self, mask) -> None:
        if isinstance(mask, bool):
            mask = self._t(mask, torch.bool)
        self._poison = mask if self._poison is None else (self._poison | mask)

    def _truth(self, value) -> Truth:
        if isinstance(value, Truth):
            return value
        # A numeric value used as a condition: True where it is nonzero.
        num = value
        if not num.known:
            return Truth(self._t(True, torch.bool), self._t(True, torch.bool))
        can_false = (num.lo <= 0) & (num.hi >= 0)
        can_true = (num.lo != 0) | (num.hi != 0)
        return Truth(can_false, can_true)

    def _num(self, value) -> Num:
        if isinstance(value, Num):
            return value
        # bool -> 0/1
        lo = torch.where(value.can_false, 0, 1)
        hi = torch.where(value.can_true, 1, 0)
        return Num(lo, hi)

    def _checked(self, lo: torch.Tensor, hi: torch.Tensor) -> Num:
        if lo.numel() and (bool((lo < -_LIMIT).any()) or bool((hi > _LIMIT).any())):
            return UNKNOWN
        return Num(lo, hi)

    # -- evaluation -----------------------------------------------------------------------------
    def _run(self, node: Node):
        key = id(node)
        if key in self._memo:
            return self._memo[key]
        value = self._eval(node)
        self._memo[key] = value
        return value

    def _eval(self, node: Node):
        op, kind = node.op, node.kind
        if op == "arg":
            name = node.args[0]
            if name not in self._leaves:
                return UNKNOWN
            lo, hi = self._leaves[name]
            return Num(lo, hi)
        if op == "const":
            value = node.args[0]
            if kind == "bool":
                return Truth(self._t(not value, torch.bool), self._t(bool(value), torch.bool))
            if kind == "float":
                return UNKNOWN
            return Num(self._t(int(value)), self._t(int(value)))
        if op == "load":
            return self._load(node)
        args = [self._run(a) for a in node.args]
        if op == "where":
            return self._where(node, *args)
        if kind == "float" or any(isinstance(a, Num) and a is UNKNOWN for a in args) and op in _COMPARE:
            if op in _COMPARE:
                return Truth(self._t(True, torch.bool), self._t(True, torch.bool))
            return UNKNOWN
        if op == "not":
            a = self._truth(args[0])
            return Truth(a.can_true, a.can_false)
        if op in ("and", "or", "xor") and kind == "bool":
            a, b = self._truth(args[0]), self._truth(args[1])
            if op == "and":
                return Truth(a.can_false | b.can_false, a.can_true & b.can_true)
            if op == "or":
                return Truth(a.can_false & b.can_false, a.can_true | b.can_true)
            return Truth((a.can_true & b.can_true) | (a.can_false & b.can_false),
                         (a.can_true & b.can_false) | (a.can_false & b.can_true))
        if op in _COMPARE:
            return self._compare(op, self._num(args[0]), self._num(args[1]))
        if any(a.kind == "float" for a in node.args):
            return UNKNOWN
        nums = [self._num(a) for a in args]
        return self._int_op(op, nums)

    def _where(self, node: Node, cond, if_true, if_false):
        c = self._truth(cond)
        if node.kind == "bool":
            t, f = self._truth(if_true), self._truth(if_false)
            can_false = (c.can_true & t.can_false) | (c.can_false & f.can_false)
            can_true = (c.can_true & t.can_true) | (c.can_false & f.can_true)
            return Truth(can_false, can_true)
        if node.kind == "float":
            return UNKNOWN
        t, f = self._num(if_true), self._num(if_false)
        if not (t.known and f.known):
            return UNKNOWN
        lo = torch.where(~c.can_false, t.lo, torch.where(~c.can_true, f.lo, torch.minimum(t.lo, f.lo)))
        hi = torch.where(~c.can_false, t.hi, torch.where(~c.can_true, f.hi, torch.maximum(t.hi, f.hi)))
        return Num(lo, hi)

    def _compare(self, op: str, a: Num, b: Num) -> Truth:
        if not (a.known and b.known):
            return Truth(self._t(True, torch.bool), self._t(True, torch.bool))
        if op == "eq" or op == "ne":
            overlap = (a.lo <= b.hi) & (b.lo <= a.hi)
            all_equal = (a.lo == a.hi) & (b.lo == b.hi) & (a.lo == b.lo)
            return Truth(~all_equal, overlap) if op == "eq" else Truth(overlap, ~all_equal)
        if op in ("gt", "ge"):
            a, b, op = b, a, "lt" if op == "gt" else "le"
        if op == "lt":
            return Truth(a.hi >= b.lo, a.lo < b.hi)
        return Truth(a.hi > b.lo, a.lo <= b.hi)  # le

    def _int_op(self, op: str, nums: List[Num]):
        if op in ("to_int", "floor", "ceil"):
            return nums[0]
        if op == "to_float":
            return UNKNOWN
        if not all(n.known for n in nums):
            if op in ("floordiv", "mod") and nums[1].known:
                self._poison_where((nums[1].lo <= 0) & (nums[1].hi >= 0))
            elif op in ("floordiv", "mod"):
                self._poison_where(True)
            if op == "pow" and nums[1].known:
                self._poison_where(nums[1].lo < 0)
            elif op == "pow":
                self._poison_where(True)
            if op == "mod" and nums[1].known:
                return self._mod_unknown_dividend(nums[1])
            return UNKNOWN
        if op == "neg":
            return Num(-nums[0].hi, -nums[0].lo)
        if op == "invert":
            return Num(-nums[0].hi - 1, -nums[0].lo - 1)
        if op == "abs":
            a = nums[0]
            lo = torch.where(a.lo >= 0, a.lo, torch.where(a.hi <= 0, -a.hi, torch.zeros_like(a.lo)))
            hi = torch.maximum(a.hi.abs(), a.lo.abs())
            return Num(lo, hi)
        a, b = nums
        if op == "add":
            return self._checked(a.lo + b.lo, a.hi + b.hi)
        if op == "sub":
            return self._checked(a.lo - b.hi, a.hi - b.lo)
        if op == "mul":
            big = max(float(a.lo.abs().max()), float(a.hi.abs().max())) * max(float(b.lo.abs().max()),
                                                                               float(b.hi.abs().max()))
            if big > _LIMIT:
                return UNKNOWN
            corners = [a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi]
            return Num(_reduce(torch.minimum, corners), _reduce(torch.maximum, corners))
        if op == "min":
            return Num(torch.minimum(a.lo, b.lo), torch.minimum(a.hi, b.hi))
        if op == "max":
            return Num(torch.maximum(a.lo, b.lo), torch.maximum(a.hi, b.hi))
        if op == "floordiv":
            zero = (b.lo <= 0) & (b.hi >= 0)
            self._poison_where(zero)
            # Floor division is monotone in each argument while the divisor keeps its sign.
            b_lo = torch.where(zero, torch.ones_like(b.lo), b.lo)
            b_hi = torch.where(zero, torch.ones_like(b.hi), b.hi)
            corners = [torch.floor_divide(x, y) for x in (a.lo, a.hi) for y in (b_lo, b_hi)]
            return Num(_reduce(torch.minimum, corners), _reduce(torch.maximum, corners))
        if op == "mod":
            zero = (b.lo <= 0) & (b.hi >= 0)
            self._poison_where(zero)
            positive = b.lo > 0
            # Divisor a single positive value and the dividend within one period: exact shift.
            same_period = positive & (b.lo == b.hi) & (torch.floor_divide(a.lo, torch.where(positive, b.lo, 1))
                                                       == torch.floor_divide(a.hi, torch.where(positive, b.lo, 1)))
            # Non-negative dividend below every divisor value: unchanged.
            unchanged = positive & (a.lo >= 0) & (a.hi < b.lo)
            safe_b = torch.where(positive, b.lo, 1)
            lo = torch.where(unchanged, a.lo, torch.where(same_period, torch.remainder(a.lo, safe_b),
                                                          torch.where(positive, 0, b.lo + 1)))
            hi = torch.where(unchanged, a.hi, torch.where(same_period, torch.remainder(a.hi, safe_b),
                                                          torch.where(positive, b.hi - 1, 0)))
            return Num(torch.minimum(lo, hi), torch.maximum(lo, hi))
        if op == "pow":
            self._poison_where(b.lo < 0)
            return UNKNOWN
        if op == "and":
            nonneg = (a.lo >= 0) | (b.lo >= 0)
            if bool(nonneg.all()):
                hi = torch.where(a.lo >= 0, a.hi, b.hi)
                hi = torch.where((a.lo >= 0) & (b.lo >= 0), torch.minimum(a.hi, b.hi), hi)
                return Num(torch.zeros_like(hi), hi)
            return UNKNOWN
        if op in ("or", "xor"):
            if bool((a.lo >= 0).all()) and bool((b.lo >= 0).all()):
                top = int(torch.maximum(a.hi, b.hi).max())
                bound = (1 << max(top, 1).bit_length()) - 1
                return Num(self._t(0), self._t(bound))
            return UNKNOWN
        return UNKNOWN

    def _mod_unknown_dividend(self, b: Num) -> Num:
        positive = b.lo > 0
        negative = b.hi < 0
        if bool(positive.all()):
            return Num(torch.zeros_like(b.hi), b.hi - 1)
        if bool(negative.all()):
            return Num(b.lo + 1, torch.zeros_like(b.lo))
        return UNKNOWN

    # -- loads ----------------------------------------------------------------------------------
    def _load(self, node: Node):
        slot = node.args[0]
        tensor = self.captured[slot]
        index_nodes = node.args[1:]
        if not index_nodes:  # a 0-d captured tensor: a constant
            if slot not in self._scalars:
                self._scalars[slot] = tensor.detach().to(torch.int64) if not tensor.dtype.is_floating_point else None
            value = self._scalars[slot]
            if value is None:
                return UNKNOWN
            return self._as_kind(node, Num(value, value))
        if tensor.dtype.is_floating_point or tensor.dtype not in (torch.int64, torch.int32, torch.bool):
            # Floats are not modelled; narrow integer dtypes may wrap in later arithmetic.
            indices = [self._num(self._run(i)) for i in index_nodes]
            self._check_range(indices, tensor.shape)
            return UNKNOWN if node.kind != "bool" else self._as_kind(node, UNKNOWN)
        if tensor.numel() == 0:
            self._poison_where(True)
            return self._as_kind(node, UNKNOWN)
        indices = [self._num(self._run(i)) for i in index_nodes]
        if not all(n.known for n in indices):
            self._poison_where(True)
            lo, hi = tensor.min().to(torch.int64), tensor.max().to(torch.int64)
            return self._as_kind(node, Num(lo, hi))
        self._check_range(indices, tensor.shape)
        clamped = [Num(n.lo.clamp(0, size - 1), n.hi.clamp(0, size - 1)) for n, size in zip(indices, tensor.shape)]
        ranged = [d for d, n in enumerate(clamped) if not torch.equal(n.lo, n.hi)]
        range_dim = ranged[0] if ranged else None
        reduce_dims = tuple(ranged[1:])
        summary_key = (slot, range_dim, reduce_dims)
        if summary_key not in self._summaries:
            self._summaries[summary_key] = _LoadSummary(tensor, range_dim, reduce_dims, self.granule)
        summary = self._summaries[summary_key]
        lo, hi = self._query(summary, clamped)
        return self._as_kind(node, Num(lo, hi))

    def _check_range(self, indices: List[Num], shape) -> None:
        for n, size in zip(indices, shape):
            if not n.known:
                self._poison_where(True)
            else:
                self._poison_where((n.lo < 0) | (n.hi >= size))

    def _query(self, summary: _LoadSummary, clamped: List[Num]) -> Tuple[torch.Tensor, torch.Tensor]:
        ndim = len(clamped)
        point_index = []
        for d in range(ndim):
            if d in summary.reduce_dims:
                point_index.append(None)
            elif d == summary.range_dim:
                point_index.append(None)
            else:
                point_index.append(clamped[d].lo)
        if summary.range_dim is None:
            idx_lo = tuple(p if p is not None else 0 for p in point_index)
            idx_hi = tuple(p if p is not None else 1 for p in point_index)
            value_lo = summary.base[tuple(p if p is not None else slice(None) for p in point_index)]
            return summary.base[idx_lo], summary.base[idx_hi]
        g = summary.granule
        r = clamped[summary.range_dim]
        first, last = torch.floor_divide(r.lo, g), torch.floor_divide(r.hi, g)
        length = last - first + 1
        level = torch.floor(torch.log2(length.to(torch.float64))).to(torch.int64)
        second = last - (1 << level) + 1
        # Table layout: [K, *dims without range_dim (reduced dims have size 2), n_blocks].
        others = [d for d in range(ndim) if d != summary.range_dim]

        def gather(table, which_reduced: int, start):
            index = [level]
            for d in others:
                index.append(point_index[d] if d not in summary.reduce_dims else which_reduced)
            index.append(start)
            return table[tuple(index)]

        lo = torch.minimum(gather(summary.lo_table, 0, first), gather(summary.lo_table, 0, second))
        hi = torch.maximum(gather(summary.hi_table, 1, first), gather(summary.hi_table, 1, second))
        return lo, hi

    def _as_kind(self, node: Node, num: Num):
        if node.kind != "bool":
            return num
        if not num.known:
            return Truth(self._t(True, torch.bool), self._t(True, torch.bool))
        return Truth(num.lo == 0, num.hi != 0)


_COMPARE = {"eq", "ne", "lt", "le", "gt", "ge"}


def _reduce(fn, values):
    out = values[0]
    for v in values[1:]:
        out = fn(out, v)
    return out
