"""Recognizing a mask_mod's family from its traced graph (not from its name).

``is_causal(mask_mod)`` says whether the mask is exactly top-left causal attention, ``q_idx >= kv_idx``,
however it is spelled: ``kv_idx <= q_idx``, ``q_idx - kv_idx >= 0``, ``q_idx + 1 > kv_idx``,
``~(q_idx < kv_idx)``, ``(q_idx > kv_idx) | (q_idx == kv_idx)``, ``torch.where(q_idx >= kv_idx, True,
False)``, ``and_masks(causal_mask)``, ... A backend that has causal attention built in (PyTorch's SDPA
``is_causal``) may then compute the call without evaluating the mask.

How: every comparison in the graph must compare two integer expressions that are linear in ``q_idx`` and
``kv_idx`` with constant coefficients and depend on them only through the distance ``d = q_idx - kv_idx``
(``a * q_idx - a * kv_idx + c``; ``b`` and ``h`` absent). Each such comparison is then a set of integers
``d``, a union of intervals, and ``&``, ``|``, ``^``, ``~``, ``==`` / ``!=`` between bools and
``torch.where`` on bools combine those sets exactly. The mask is causal when the set is exactly
``d >= 0``. Anything else in the graph (a captured tensor, a float conversion -- exact only below 2**24 --,
``//``, ``%``, ``min``, a term in ``b`` or ``h``) makes the answer False: a False is always safe, the mask
is then evaluated as written.

The answer is cached per traced graph (weakly). ``trace_mask_mod`` keeps one graph per mod object (weakly,
re-traced when what the mod reads is rebound), so asking again about the same mod costs that cache's lookup,
which walks what the mod reads (``closure.reach_identity``: tens of microseconds). A caller that already
holds the trace (the custom op path traces every mod to key it) passes the ``TracedMod`` instead and pays
one dictionary lookup. A cache keyed by the mod object alone would be faster still but wrong: a mod reading
a rebound global or closure variable (``q_idx - kv_idx >= OFFSET``) would keep its first answer.
"""

from __future__ import annotations

import weakref
from typing import Callable, Dict, List, Optional, Tuple, Union

from .graph import Node
from .tracing import TracedMod, trace_mask_mod

__all__ = ["is_causal", "distance_set"]

# A linear form over the index arguments: {"q_idx": a, "kv_idx": b, "b": ..., "h": ..., "": constant}.
Linear = Dict[str, int]
# A set of integers as sorted, disjoint, non-adjacent closed intervals; None is an infinite end.
Interval = Tuple[Optional[int], Optional[int]]
IntSet = List[Interval]

EVERYTHING: IntSet = [(None, None)]
NOTHING: IntSet = []
CAUSAL: IntSet = [(0, None)]

# Coefficients and constants beyond this are not recognized: the kernels evaluate the graph in int64, and
# with positions below 2**31 such forms cannot overflow there, so the exact Python-int reasoning here holds.
LIMIT = 1 << 31


class _Unrecognized(Exception):
    """The graph holds something this analysis does not model (the answer is then False)."""


def _linear(node: Node) -> Linear:
    """``node`` (an int expression) as a linear form, or ``_Unrecognized``."""
    if node.kind != "int":
        raise _Unrecognized
    if node.op == "arg":
        return {node.args[0]: 1}
    if node.op == "const":
        return {"": node.args[0]}
    if node.op == "to_int":
        return _linear(node.args[0])
    if node.op == "neg":
        return {name: -value for name, value in _linear(node.args[0]).items()}
    if node.op in ("add", "sub"):
        left, right = _linear(node.args[0]), _linear(node.args[1])
        sign = 1 if node.op == "add" else -1
        result = dict(left)
        for name, value in right.items():
            result[name] = result.get(name, 0) + sign * value
        return _bounded(result)
    if node.op == "mul":
        left, right = _linear(node.args[0]), _linear(node.args[1])
        if set(left) == {""}:
            left, right = right, left
        if set(right) != {""}:
            raise _Unrecognized  # a product of two index expressions is not linear
        return _bounded({name: value * right[""] for name, value in left.items()})
    raise _Unrecognized


def _bounded(form: Linear) -> Linear:
    if any(abs(value) >= LIMIT for value in form.values()):
        raise _Unrecognized
    return form


def _floor_div(a: int, b: int) -> int:
    return a // b


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


FLIPPED = {"ge": "le", "gt": "lt", "le": "ge", "lt": "gt", "eq": "eq", "ne": "ne"}


def _compare(op: str, left: Node, right: Node) -> IntSet:
    """The set of distances ``d = q_idx - kv_idx`` where ``left op right`` holds (two int expressions)."""
    form = _linear(left)
    for name, value in _linear(right).items():
        form[name] = form.get(name, 0) - value
    a, b, c = form.get("q_idx", 0), form.get("kv_idx", 0), form.get("", 0)
    if form.get("b", 0) or form.get("h", 0) or a != -b:
        raise _Unrecognized  # depends on b, h, or on q_idx and kv_idx other than through their distance
    # Now: a * d + c  op  0.
    if a == 0:
        holds = {"ge": c >= 0, "gt": c > 0, "le": c <= 0, "lt": c < 0, "eq": c == 0, "ne": c != 0}[op]
        return EVERYTHING if holds else NOTHING
    if a < 0:
        a, c, op = -a, -c, FLIPPED[op]
    # a > 0: a * d + c op 0  <=>  d op -c / a, solved over the integers.
    if op == "ge":
        return [(_ceil_div(-c, a), None)]
    if op == "gt":
        return [(_floor_div(-c, a) + 1, None)]
    if op == "le":
        return [(None, _floor_div(-c, a))]
    if op == "lt":
        return [(None, _ceil_div(-c, a) - 1)]
    exact = [(-c // a, -c // a)] if -c % a == 0 else NOTHING
    return exact if op == "eq" else _complement(exact)


def _complement(values: IntSet) -> IntSet:
    result, start = [], None  # start: the lowest integer not yet covered (None: from -inf)
    for low, high in values:
        if low is not None and (start is None or start <= low - 1):
            result.append((start, low - 1))
        if high is None:
            return result
        start = high + 1
    result.append((start, None))
    return result


def _intersect(left: IntSet, right: IntSet) -> IntSet:
    result = []
    for l_low, l_high in left:
        for r_low, r_high in right:
            low = l_low if r_low is None else r_low if l_low is None else max(l_low, r_low)
            high = l_high if r_high is None else r_high if l_high is None else min(l_high, r_high)
            if low is None or high is None or low <= high:
                result.append((low, high))
    return _normalize(result)


def _union(left: IntSet, right: IntSet) -> IntSet:
    return _complement(_intersect(_complement(left), _complement(right)))


def _normalize(values: IntSet) -> IntSet:
    """Sorted, merged (overlapping or adjacent intervals become one)."""
    ordered = sorted(values, key=lambda iv: float("-inf") if iv[0] is None else iv[0])
    merged: IntSet = []
    for low, high in ordered:
        if merged:
            last_low, last_high = merged[-1]
            if last_high is None or low is None or low <= last_high + 1:
                merged[-1] = (last_low, None if last_high is None or high is None else max(last_high, high))
                continue
        merged.append((low, high))
    return merged


def _distance_set(node: Node) -> IntSet:
    """The set of distances ``q_idx - kv_idx`` where the bool ``node`` is True, or ``_Unrecognized``."""
    if node.kind != "bool":
        raise _Unrecognized
    op, args = node.op, node.args
    if op == "const":
        return EVERYTHING if args[0] else NOTHING
    if op == "not":
        return _complement(_distance_set(args[0]))
    if op in ("and", "or", "xor", "eq", "ne") and args[0].kind == "bool" and args[1].kind == "bool":
        left, right = _distance_set(args[0]), _distance_set(args[1])
        if op == "and":
            return _intersect(left, right)
        if op == "or":
            return _union(left, right)
        differ = _union(_intersect(left, _complement(right)), _intersect(_complement(left), right))
        return _complement(differ) if op == "eq" else differ
    if op == "where" and args[1].kind == "bool" and args[2].kind == "bool":
        cond = _distance_set(args[0])
        return _union(_intersect(cond, _distance_set(args[1])), _intersect(_complement(cond), _distance_set(args[2])))
    if op in FLIPPED:
        return _compare(op, args[0], args[1])
    raise _Unrecognized


def graph_is_causal(graph: Node) -> bool:
    """Whether a traced mask graph is ``q_idx >= kv_idx`` (see the module docstring)."""
    try:
        return _distance_set(graph) == CAUSAL
    except (_Unrecognized, RecursionError):
        return False


# traced graph -> answer; graphs are immutable, and the tracer keeps one per mod (and per structure).
_BY_GRAPH: "weakref.WeakKeyDictionary[Node, bool]" = weakref.WeakKeyDictionary()


def is_causal(mask_mod: Union[None, Callable, TracedMod]) -> bool:
    """Whether ``mask_mod(b, h, q_idx, kv_idx)`` is exactly top-left causal (``q_idx >= kv_idx``) for every
    index, recognized from its traced graph. ``mask_mod`` may also be its ``TracedMod`` (``trace_mask_mod``).
    An untraceable mod (or None) is not."""
    if mask_mod is None:
        return False
    if isinstance(mask_mod, TracedMod):
        if mask_mod.kind != "mask":
            raise ValueError(f"is_causal: expected a mask_mod or a traced mask_mod, got a traced {mask_mod.kind}_mod")
        graph = mask_mod.graph
    else:
        try:
            graph = trace_mask_mod(mask_mod).graph
        except TypeError:  # UntraceableModError, or a mask_mod that returns a non-bool
            return False
    answer = _BY_GRAPH.get(graph)
    if answer is None:
        answer = _BY_GRAPH[graph] = graph_is_causal(graph)
    return answer


# traced graph -> its distance set (None: not a function of the distance); see ``distance_set``.
_SETS_BY_GRAPH: "weakref.WeakKeyDictionary[Node, Optional[IntSet]]" = weakref.WeakKeyDictionary()


def distance_set(mask_mod: Optional[Callable]) -> Optional[IntSet]:
    """The distances ``d = q_idx - kv_idx`` where ``mask_mod`` is True, as sorted disjoint closed intervals
    ``[(low, high), ...]`` (None: an unbounded end), when the mask depends on its indices only through ``d``
    (causal ``[(0, None)]``, ``sliding_window_mask(w)`` ``[(0, w - 1)]``); None otherwise, or when the mod
    cannot be traced. Exact in the same sense as ``is_causal`` (the module docstring)."""
    if mask_mod is None:
        return None
    try:
        graph = trace_mask_mod(mask_mod).graph
    except TypeError:  # UntraceableModError, or a mask_mod that returns a non-bool
        return None
    if graph not in _SETS_BY_GRAPH:
        try:
            _SETS_BY_GRAPH[graph] = _distance_set(graph)
        except (_Unrecognized, RecursionError):
            _SETS_BY_GRAPH[graph] = None
    answer = _SETS_BY_GRAPH[graph]
    return None if answer is None else list(answer)
