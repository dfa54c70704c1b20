"""Interval analysis of a traced mask_mod: classify tiles as empty, full or "maybe" without
evaluating the mask element by element.

The traced graph (see ``tracing.py``) is evaluated once per *vector of tiles*. The caller
describes a chunk of the tile grid by index ranges that broadcast against each other (for
example ``b``/``h`` ``[P, 1, 1]``, ``q_idx`` ``[1, R, 1]``, ``kv_idx`` ``[1, 1, NKV]``); every node
then evaluates to

- a ``Num`` for integer values: per-tile lower and upper bounds of every value the node takes on
  the tile (``UNKNOWN`` when nothing is known), or
- a ``Truth`` for bool values: per tile, *can* it be False somewhere, *can* it be True.

A tile is empty when the predicate cannot be True, full when it cannot be False, "maybe"
otherwise; the compiler evaluates only the maybe tiles exactly. Work is O(tiles) tensor ops with
no Python loop over tiles; a node that depends only on ``q_idx`` stays ``[1, R, 1]``.

Soundness rules (exact refinement makes the final result exact, so imprecision only costs time):

- Floats are never bounded (rounding is not modelled): float nodes are unknown.
- Every integer node carries the dtype eager PyTorch would compute it in (the index arguments are
  int64, a load has its tensor's dtype, Python constants adopt the other operand's dtype, as in
  ``torch.result_type``). Tiles where a result could leave that dtype's range (and wrap in eager
  PyTorch) are *poisoned*.
- Operations that raise in eager PyTorch (integer division or modulo by zero, indexing out of
  range -- negative indices included, which wrap in eager mode --, negative integer powers,
  arithmetic on two bool tensors) poison the tiles where they may happen.
- Poisoned tiles are forced to "maybe", so the exact evaluation of those tiles computes (or raises)
  exactly what the exact compiler computes (or raises).
- Loads ``captured[i0, i1, ...]``: an index that is a single value on every tile of the chunk is
  gathered; up to two *ranged* index dimensions are answered from per-granule min/max summaries of
  the captured tensor (one reduction pass, then a sparse table, so any index range costs O(1) per
  tile); further ranged dimensions use the global min/max along them. The granule is the largest
  power of two dividing both block sizes (grown only to bound the table size), so a tile-aligned
  range such as ``ids[b, q_idx]`` is summarized exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from .graph import FLOAT_UNARY, graph_nodes
from .load_summary import LoadSummary
from .tracing import Node, TracedMod

__all__ = ["Num", "Truth", "UNKNOWN", "IntervalEvaluator", "graph_args"]

# Bounds of int64 results are kept within +-2**62 so that our own int64 arithmetic on them
# (sums and differences of two bounds) never wraps; beyond that the tile is poisoned.
_INT64_SAFE = 1 << 62
_INT_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_COMPARE = {"eq", "ne", "lt", "le", "gt", "ge"}
_ARITH = {"add", "sub", "mul", "floordiv", "mod", "pow", "neg", "abs", "invert", "min", "max", "lshift", "rshift"}
# Shift amounts eager PyTorch defines on int64 (beyond them the tile is poisoned).
_MAX_SHIFT = 62


@dataclass
class Num:
    """Per-tile bounds of an integer value; ``lo is None`` means unknown (any value)."""

    lo: Optional[torch.Tensor]
    hi: Optional[torch.Tensor]

    @property
    def known(self) -> bool:
        return self.lo is not None


@dataclass
class Truth:
    """Per tile: can the bool value be False somewhere in the tile, can it be True."""

    can_false: torch.Tensor
    can_true: torch.Tensor


UNKNOWN = Num(None, None)


def graph_args(node: Node) -> set:
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


def eager_dtypes(traced: TracedMod) -> Dict[int, Optional[torch.dtype]]:
    """``id(node) -> dtype`` eager PyTorch computes the node in (None for a Python constant).

    Uses ``torch.result_type`` on stand-ins: index arguments and indexed loads are 1-d tensors,
    0-d captured tensors are 0-d tensors, constants Python scalars -- the three priority classes of
    PyTorch's type promotion.
    """
    stand_in: Dict[int, object] = {}
    dtypes: Dict[int, Optional[torch.dtype]] = {}
    for node in graph_nodes(traced.graph):
        op = node.op
        args = [stand_in[id(a)] for a in node.args if isinstance(a, Node)]
        dims = any(isinstance(a, torch.Tensor) and a.dim() > 0 for a in args)
        if op == "arg":
            dtype, dims = (torch.float32 if node.args[0] == "score" else torch.int64), True
        elif op == "const":
            stand_in[id(node)] = node.args[0]
            dtypes[id(node)] = None
            continue
        elif op == "load":
            dtype, dims = traced.captured[node.args[0]].dtype, len(node.args) > 1
        elif op in _COMPARE or op == "not":
            dtype = torch.bool
        elif op == "to_float" or op == "truediv" or op in FLOAT_UNARY:
            dtype = torch.float32 if not any(isinstance(a, torch.Tensor) and a.dtype == torch.float64
                                             for a in args) else torch.float64
        elif op == "to_int":
            dtype = torch.int64
        elif op in ("neg", "abs", "invert", "floor", "ceil"):
            a = args[0]
            dtype = a.dtype if isinstance(a, torch.Tensor) else (torch.bool if isinstance(a, bool) else
                                                                 torch.int64 if isinstance(a, int) else torch.float32)
        else:  # binary arithmetic / logic, where (branches only)
            values = args[1:] if op == "where" else args
            tensors = [v for v in values if isinstance(v, torch.Tensor)]
            if tensors:
                dtype = torch.result_type(*values) if len(values) == 2 else tensors[0].dtype
            else:  # Python scalars only
                dtype = torch.result_type(torch.tensor(values[0]), values[1])
        stand_in[id(node)] = torch.zeros((1,) if dims else (), dtype=dtype)
        dtypes[id(node)] = dtype
    return dtypes


def _dtype_range(dtype: Optional[torch.dtype]) -> Optional[Tuple[int, int]]:
    if dtype is None or dtype == torch.int64:
        return -_INT64_SAFE, _INT64_SAFE
    if dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        return info.min, info.max
    return None  # bool / float / exotic: handled by the caller


class IntervalEvaluator:
    """Evaluates a traced mask graph over tile vectors (see the module docstring).

    One evaluator serves every chunk of one ``create_block_mask`` call: the summaries of the
    captured tensors are built once, on first use.
    """

    def __init__(self, traced: TracedMod, block_size: Tuple[int, int], device: torch.device):
        self.traced = traced
        self.device = torch.device(device)
        q_bs, kv_bs = block_size
        both = _gcd(q_bs, kv_bs)
        self.granule = both & -both  # the largest power of two dividing both block sizes
        self.captured = [t.detach().to(self.device) for t in traced.captured]
        self.dtypes = eager_dtypes(traced)
        self._summaries: Dict[tuple, LoadSummary] = {}
        self._bounds: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._true = torch.tensor(True, device=self.device)
        self._false = torch.tensor(False, device=self.device)

    # -- public ---------------------------------------------------------------------------------
    def classify(self, leaves: Dict[str, Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``leaves`` maps b/h/q_idx/kv_idx to (lo, hi) int64 tensors broadcasting to the tile grid.

        Returns (can_false, can_true) bool tensors broadcastable to the grid, poisoned tiles
        forced to maybe (both True).
        """
        self._leaves = leaves
        self._memo: Dict[int, object] = {}
        self._poison: Optional[torch.Tensor] = None
        try:
            result = self._truth(self._run(self.traced.graph))
        finally:
            self._memo = {}
        can_false, can_true = result.can_false, result.can_true
        self.last_poison = self._poison  # tiles where eager evaluation might raise or wrap (None: nowhere)
        if self._poison is not None:
            can_false = can_false | self._poison
            can_true = can_true | self._poison
        return can_false, can_true

    # -- helpers --------------------------------------------------------------------------------
    def _int(self, value: int) -> torch.Tensor:
        return torch.tensor(value, dtype=torch.int64, device=self.device)

    def _poison_where(self, mask) -> None:
        if isinstance(mask, bool):
            if not mask:
                return
            mask = self._true
        self._poison = mask if self._poison is None else (self._poison | mask)

    def _both(self) -> Truth:
        return Truth(self._true, self._true)

    def _truth(self, value) -> Truth:
        if isinstance(value, Truth):
            return value
        if not value.known:  # a numeric value used as a condition: True where nonzero
            return self._both()
        return Truth((value.lo <= 0) & (value.hi >= 0), (value.lo != 0) | (value.hi != 0))

    def _num(self, value) -> Num:
        if isinstance(value, Num):
            return value
        one, zero = self._int(1), self._int(0)
        return Num(torch.where(value.can_false, zero, one), torch.where(value.can_true, one, zero))

    def _fit(self, node: Node, num: Num) -> Num:
        """Poison tiles where ``num`` may leave the range of the node's eager dtype."""
        if not num.known:
            return num
        bounds = _dtype_range(self.dtypes.get(id(node)))
        if bounds is None:
            return num
        self._poison_where((num.lo < bounds[0]) | (num.hi > bounds[1]))
        return num

    # -- evaluation -----------------------------------------------------------------------------
    def _run(self, node: Node):
        key = id(node)
        if key not in self._memo:
            self._memo[key] = self._eval(node)
        return self._memo[key]

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
                return Truth(self._false if value else self._true, self._true if value else self._false)
            if kind == "float":
                return UNKNOWN
            return Num(self._int(int(value)), self._int(int(value)))
        if op == "load":
            return self._load(node)
        args = [self._run(a) for a in node.args]
        eager = self.dtypes.get(id(node))
        if op == "where":
            return self._where(node, *args)
        if op in _COMPARE:
            if any(a.kind == "float" for a in node.args):
                return self._both()
            return self._compare(op, self._num(args[0]), self._num(args[1]))
        if kind == "float":
            return UNKNOWN
        if kind == "bool":
            if op == "not":
                a = self._truth(args[0])
                return Truth(a.can_true, a.can_false)
            if op in ("and", "or", "xor"):
                a, b = self._truth(args[0]), self._truth(args[1])
                if op == "and":
                    return Truth(a.can_false | b.can_false, a.can_true & b.can_true)
                if op == "or":
                    return Truth(a.can_false & b.can_false, a.can_true | b.can_true)
                return Truth((a.can_true & b.can_true) | (a.can_false & b.can_false),
                             (a.can_true & b.can_false) | (a.can_false & b.can_true))
            return self._both()
        # integer-kind node
        if eager is None or eager not in _INT_DTYPES:
            return UNKNOWN  # computed in float (or unknown) by eager PyTorch: not modelled
        if eager == torch.bool:
            if op in _ARITH and op not in ("min", "max"):
                self._poison_where(True)  # bool arithmetic differs from (or raises in) integer semantics
                return UNKNOWN
        if any(a.kind == "float" for a in node.args):
            return UNKNOWN
        return self._fit(node, self._int_op(op, [self._num(a) for a in args]))

    def _where(self, node: Node, cond, if_true, if_false):
        c = self._truth(cond)
        if node.kind == "bool":
            t, f = self._truth(if_true), self._truth(if_false)
            return Truth((c.can_true & t.can_false) | (c.can_false & f.can_false),
                         (c.can_true & t.can_true) | (c.can_false & f.can_true))
        if node.kind == "float" or self.dtypes.get(id(node)) not in _INT_DTYPES:
            return UNKNOWN
        t, f = self._num(if_true), self._num(if_false)
        if not (t.known and f.known):
            return UNKNOWN
        lo = torch.where(c.can_true, torch.where(c.can_false, torch.minimum(t.lo, f.lo), t.lo), f.lo)
        hi = torch.where(c.can_true, torch.where(c.can_false, torch.maximum(t.hi, f.hi), t.hi), f.hi)
        return self._fit(node, Num(lo, hi))

    def _compare(self, op: str, a: Num, b: Num) -> Truth:
        if not (a.known and b.known):
            return self._both()
        if op in ("eq", "ne"):
            overlap = (a.lo <= b.hi) & (b.lo <= a.hi)
            all_equal = (a.lo == a.hi) & (b.lo == b.hi) & (a.lo == b.lo)
            return Truth(~all_equal, overlap) if op == "eq" else Truth(overlap, ~all_equal)
        if op in ("gt", "ge"):
            a, b, op = b, a, "lt" if op == "gt" else "le"
        if op == "lt":
            return Truth(a.hi >= b.lo, a.lo < b.hi)
        return Truth(a.hi > b.lo, a.lo <= b.hi)  # le

    def _int_op(self, op: str, nums: List[Num]) -> Num:
        if op in ("to_int", "floor", "ceil"):
            return nums[0]
        if op in ("floordiv", "mod") and len(nums) == 2:
            divisor = nums[1]
            if divisor.known:
                self._poison_where((divisor.lo <= 0) & (divisor.hi >= 0))
            else:
                self._poison_where(True)
        if op == "pow":
            exponent = nums[1]
            self._poison_where((exponent.lo < 0) if exponent.known else True)
            return UNKNOWN
        if op in ("lshift", "rshift"):
            amount = nums[1]
            self._poison_where(((amount.lo < 0) | (amount.hi > _MAX_SHIFT)) if amount.known else True)
        if not all(n.known for n in nums):
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
            return Num(lo, torch.maximum(a.hi.abs(), a.lo.abs()))
        a, b = nums
        if op == "add":
            return Num(a.lo + b.lo, a.hi + b.hi)
        if op == "sub":
            return Num(a.lo - b.hi, a.hi - b.lo)
        if op == "mul":
            # Poison where the product might not fit (our int64 corners would wrap there).
            size_a = torch.maximum(a.lo.abs(), a.hi.abs()).to(torch.float64)
            size_b = torch.maximum(b.lo.abs(), b.hi.abs()).to(torch.float64)
            self._poison_where(size_a * size_b > float(_INT64_SAFE))
            corners = [a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi]
            return Num(_reduce(torch.minimum, corners), _reduce(torch.maximum, corners))
        if op == "min":
            return Num(torch.minimum(a.lo, b.lo), torch.minimum(a.hi, b.hi))
        if op == "max":
            return Num(torch.maximum(a.lo, b.lo), torch.maximum(a.hi, b.hi))
        if op == "floordiv":
            # Floor division is monotone in each argument while the divisor keeps one sign, so the
            # corners bound it. Where the divisor range holds 0 the tile is poisoned: use 1 there.
            zero = (b.lo <= 0) & (b.hi >= 0)
            b_lo = torch.where(zero, torch.ones_like(b.lo), b.lo)
            b_hi = torch.where(zero, torch.ones_like(b.hi), b.hi)
            # Clamped so that no corner is INT64_MIN // -1 (which traps); only poisoned tiles are that big.
            a_lo, a_hi = a.lo.clamp(-_INT64_SAFE, _INT64_SAFE), a.hi.clamp(-_INT64_SAFE, _INT64_SAFE)
            corners = [torch.floor_divide(x, y) for x in (a_lo, a_hi) for y in (b_lo, b_hi)]
            return Num(_reduce(torch.minimum, corners), _reduce(torch.maximum, corners))
        if op == "mod":
            return self._mod(a, b)
        if op in ("lshift", "rshift"):
            return self._shift(op, a, b)
        if op == "and":  # bitwise on integers: with a non-negative operand x, 0 <= result <= x
            a_pos, b_pos = a.lo >= 0, b.lo >= 0
            if not bool((a_pos | b_pos).all()):
                return UNKNOWN
            hi = torch.where(a_pos & b_pos, torch.minimum(a.hi, b.hi), torch.where(a_pos, a.hi, b.hi))
            return Num(torch.zeros_like(hi), hi)
        if op in ("or", "xor"):
            if not (bool((a.lo >= 0).all()) and bool((b.lo >= 0).all())):
                return UNKNOWN
            top = int(torch.maximum(a.hi, b.hi).max())
            return Num(self._int(0), self._int((1 << max(top, 1).bit_length()) - 1))
        return UNKNOWN

    def _shift(self, op: str, a: Num, b: Num) -> Num:
        """``a << b`` / ``a >> b``: monotone in ``a``, and in ``b`` for each sign of ``a``, so the
        corners bound it. Shift amounts outside [0, 62] are poisoned (by ``_int_op``) and clamped here."""
        amounts = (b.lo.clamp(0, _MAX_SHIFT), b.hi.clamp(0, _MAX_SHIFT))
        values = (a.lo.clamp(-_INT64_SAFE, _INT64_SAFE), a.hi.clamp(-_INT64_SAFE, _INT64_SAFE))
        if op == "lshift":
            # Poison where the result may leave the safe range (our corners would wrap there too).
            size = torch.maximum(values[0].abs(), values[1].abs()).to(torch.float64)
            self._poison_where(size * torch.exp2(amounts[1].to(torch.float64)) > float(_INT64_SAFE))
            shift = torch.bitwise_left_shift
        else:
            shift = torch.bitwise_right_shift
        corners = [shift(x, y) for x in values for y in amounts]
        return Num(_reduce(torch.minimum, corners), _reduce(torch.maximum, corners))

    def _mod(self, a: Num, b: Num) -> Num:
        """Python-semantics remainder (sign of the divisor); tiles with 0 in the divisor range are poisoned."""
        positive, negative = b.lo > 0, b.hi < 0
        one = torch.ones_like(b.lo)
        a = Num(a.lo.clamp(-_INT64_SAFE, _INT64_SAFE), a.hi.clamp(-_INT64_SAFE, _INT64_SAFE))
        # A single divisor value and a dividend within one period: the remainder is an exact shift.
        divisor = torch.where(b.lo == 0, one, b.lo)
        same_period = (b.lo == b.hi) & (positive | negative) & (
            torch.floor_divide(a.lo, divisor) == torch.floor_divide(a.hi, divisor))
        # A non-negative dividend below every (positive) divisor value is unchanged.
        unchanged = positive & (a.lo >= 0) & (a.hi < b.lo)
        # divisor > 0: [0, b.hi - 1]; divisor < 0: [b.lo + 1, 0]; both signs (0 poisoned): the union.
        generic_lo = torch.where(positive, torch.zeros_like(b.lo), torch.minimum(b.lo + 1, torch.zeros_like(b.lo)))
        generic_hi = torch.where(negative, torch.zeros_like(b.hi), torch.maximum(b.hi - 1, torch.zeros_like(b.hi)))
        lo = torch.where(unchanged, a.lo, torch.where(same_period, torch.remainder(a.lo, divisor), generic_lo))
        hi = torch.where(unchanged, a.hi, torch.where(same_period, torch.remainder(a.hi, divisor), generic_hi))
        return Num(lo, hi)

    def _mod_unknown_dividend(self, b: Num) -> Num:
        if bool((b.lo > 0).all()):
            return Num(torch.zeros_like(b.hi), b.hi - 1)
        if bool((b.hi < 0).all()):
            return Num(b.lo + 1, torch.zeros_like(b.lo))
        return UNKNOWN

    # -- loads ----------------------------------------------------------------------------------
    def _load(self, node: Node):
        slot = node.args[0]
        tensor = self.captured[slot]
        modelled = tensor.dtype in _INT_DTYPES
        index_nodes = node.args[1:]
        if not index_nodes:  # a 0-d captured tensor: a constant
            if not modelled:
                return self._as_kind(node, UNKNOWN)
            if slot not in self._bounds:
                value = tensor.to(torch.int64)
                self._bounds[slot] = (value, value)
            return self._as_kind(node, Num(*self._bounds[slot]))
        raw = [self._run(i) for i in index_nodes]
        if any(isinstance(r, Truth) for r in raw) or any(i.kind != "int" for i in index_nodes):
            self._poison_where(True)  # a bool index is a boolean-mask selection in eager PyTorch
            return self._as_kind(node, UNKNOWN)
        indices = [self._num(r) for r in raw]
        if tensor.numel() == 0 or not all(n.known for n in indices):
            self._poison_where(True)
            if tensor.numel() == 0 or not modelled:
                return self._as_kind(node, UNKNOWN)
            lo, hi = self._global_bounds(slot)
            return self._as_kind(node, Num(lo, hi))
        for n, size in zip(indices, tensor.shape):
            self._poison_where((n.lo < 0) | (n.hi >= size))
        if not modelled:
            return self._as_kind(node, UNKNOWN)
        clamped = [Num(n.lo.clamp(0, size - 1), n.hi.clamp(0, size - 1)) for n, size in zip(indices, tensor.shape)]
        ranged = [d for d, n in enumerate(clamped) if not torch.equal(n.lo, n.hi)]
        if not ranged:  # one element per tile: gather it
            value = self._as_int64(slot)[tuple(n.lo for n in clamped)]
            return self._as_kind(node, Num(value, value))
        summary_key = (slot, tuple(ranged[:2]), tuple(ranged[2:]))
        if summary_key not in self._summaries:
            self._summaries[summary_key] = LoadSummary(self._as_int64(slot), tuple(ranged[:2]), tuple(ranged[2:]),
                                                        self.granule)
        lo, hi = self._summaries[summary_key].query(clamped)
        return self._as_kind(node, Num(lo, hi))

    def _as_int64(self, slot: int) -> torch.Tensor:
        key = ("int64", slot)
        if key not in self._bounds:
            self._bounds[key] = self.captured[slot].to(torch.int64)
        return self._bounds[key]

    def _global_bounds(self, slot: int):
        key = ("global", slot)
        if key not in self._bounds:
            t = self.captured[slot]
            self._bounds[key] = (t.min().to(torch.int64), t.max().to(torch.int64))
        return self._bounds[key]

    def _as_kind(self, node: Node, num: Num):
        if node.kind != "bool":
            return num if node.kind == "int" else UNKNOWN
        if not num.known:
            return self._both()
        return Truth(num.lo == 0, num.hi != 0)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def _reduce(fn, values):
    out = values[0]
    for v in values[1:]:
        out = fn(out, v)
    return out
