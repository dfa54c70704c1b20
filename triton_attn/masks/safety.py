"""Host-side checks that make the Triton backends fail where the torch backend fails.

The torch backend runs a mod eagerly, so indexing a captured tensor out of range raises
``IndexError``, integer ``//`` or ``%`` by zero raises, and a score that is not a floating-point
tensor is a ``TypeError``. A kernel cannot raise: its captured loads are bounds-masked (an
out-of-range read gives 0) and an integer division by zero gives an arbitrary value. So before a
Triton launch, ``check_mods`` proves the mods safe on the positions the kernel will evaluate, or
raises the error the torch backend gives (same type, same opening words):

- a score_mod must return a floating-point score (a bool or an integer tensor is a ``TypeError``, as
  ``evaluate.call_score_mod`` says): ``check_score_result_type``, which ``attention()`` runs on every
  backend, so the answer does not depend on whether a tile runs;
- every *index* of a captured-tensor load and every integer *divisor* (the "sites") must be in
  range / nonzero wherever the mod runs: a score_mod on every tile the BlockMask visits (partial
  or full), a mask_mod on its partial tiles, for every batch and query head of the call.

How: the interval analysis (``interval.py``) first bounds the sites over the whole call in one
step; only when it cannot prove them safe are the visited tiles bounded one by one, and only the
tiles it still cannot prove are evaluated exactly, and then only the sites' index / divisor
expressions, never the whole score. A site that depends on ``score`` itself cannot be known
before the kernel runs and is left to the kernel's bounds-masked loads.

Every result is cached per (mod structure, captured tensors by storage, version and shape, call
shape, and -- only when the whole-call proof failed -- the BlockMask), so a model calling the same
mods repeatedly pays once; on CUDA the first check reads the device (a sync), later calls do not.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .evaluate import call_score_mod, mod_name
from .interval import IntervalEvaluator, graph_args
from .tracing import Node, TracedMod, UntraceableModError, evaluate, trace_mask_mod, trace_score_mod

__all__ = ["check_mods", "check_score_result_type", "unsafe_sites", "CHECK_CACHE_SIZE"]

CHECK_CACHE_SIZE = 512
# Elements (tile rows x columns summed over the tiles of a chunk) evaluated at once in the exact pass.
EXACT_CHUNK_ELEMENTS = 1 << 22

_checked: "OrderedDict[tuple, bool]" = OrderedDict()


def _remember(key: tuple) -> None:
    _checked[key] = True
    while len(_checked) > CHECK_CACHE_SIZE:
        _checked.popitem(last=False)


def _postorder(graph: Node) -> List[Node]:
    """Every node once, children first (so inner loads are checked before the loads they index)."""
    order, seen, stack = [], set(), [(graph, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        stack.extend((a, False) for a in reversed(node.args) if isinstance(a, Node))
    return order


def unsafe_sites(traced: TracedMod) -> List[Node]:
    """Loads with indices and integer floordiv/mod nodes whose operands do not depend on ``score``."""
    sites = []
    for node in _postorder(traced.graph):
        is_load = node.op == "load" and len(node.args) > 1
        is_division = node.op in ("floordiv", "mod") and node.kind == "int"
        if (is_load or is_division) and "score" not in graph_args(node):
            sites.append(node)
    return sites


def _safe_predicate(site: Node, traced: TracedMod) -> TracedMod:
    """A bool graph, True where ``site`` is safe: every index in ``[-size, size)`` (torch wraps
    negative ones), or the divisor nonzero. Interval analysis of it bounds the indices without
    summarizing the loaded tensor itself."""
    if site.op == "load":
        size_of = traced.captured[site.args[0]].shape
        checks = [Node("and", (Node("ge", (index, Node("const", (-size,), "int")), "bool"),
                               Node("lt", (index, Node("const", (size,), "int")), "bool")), "bool")
                  for index, size in zip(site.args[1:], size_of)]
    else:
        checks = [Node("ne", (site.args[1], Node("const", (0,), "int")), "bool")]
    graph = checks[0]
    for check in checks[1:]:
        graph = Node("and", (graph, check), "bool")
    return TracedMod("mask", graph, traced.captured, traced.name)


def _doubtful(site: Node, traced: TracedMod, leaves, block_size, device) -> torch.Tensor:
    """Bool, broadcastable over the tiles of ``leaves``: where interval analysis cannot prove ``site`` safe."""
    evaluator = IntervalEvaluator(_safe_predicate(site, traced), block_size, device)
    can_false, _ = evaluator.classify(leaves)  # poisoned tiles (an inner load may fail) come back doubtful
    return can_false


def check_score_result_type(score_mod: Callable, device, dtype: torch.dtype = torch.float32) -> None:
    """``TypeError`` unless ``score_mod`` returns a floating-point tensor, as the torch backend requires.

    The tracer turns any result into a float for the kernel, so the type is read from one eager
    call at position (0, 0, 0, 0) through ``call_score_mod``, the torch backend's own check. A mod
    that raises there (say, an index out of range at 0) is left to the other checks.
    """
    zero = torch.zeros((1, 1, 1, 1), dtype=torch.int64, device=device)
    try:
        call_score_mod(score_mod, torch.zeros((1, 1, 1, 1), dtype=dtype, device=device), zero, zero, zero, zero)
    except ValueError:
        return


def _tensor_signature(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t._version, tuple(t.shape), t.stride(), t.dtype, str(t.device))


class _CallShape:
    """What one attention call evaluates a mod over."""

    def __init__(self, batch: int, heads: int, q_len: int, kv_len: int, block_mask, partial_only: bool):
        self.batch, self.heads, self.q_len, self.kv_len = batch, heads, q_len, kv_len
        self.block_mask, self.partial_only = block_mask, partial_only
        self.block_size = tuple(block_mask.BLOCK_SIZE)

    def whole_call_leaves(self, device) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        def span(top: int):
            return torch.zeros((), dtype=torch.int64, device=device), torch.tensor(top - 1, device=device)
        return {"b": span(self.batch), "h": span(self.heads), "q_idx": span(self.q_len), "kv_idx": span(self.kv_len)}

    def visited_tiles(self, uses_b: bool, uses_h: bool) -> torch.Tensor:
        """Bool ``[Bx, Hx, NQ, NKV]``: tiles the kernel evaluates the mod on, for every (b, h) of the
        call (b / h folded to size 1 when the mod does not use them)."""
        blocks = self.block_mask.partial_blocks()
        if not self.partial_only:
            blocks = blocks | self.block_mask.full_blocks()
        blocks = blocks.expand(self.batch if blocks.shape[0] == 1 else blocks.shape[0],
                               self.heads if blocks.shape[1] == 1 else blocks.shape[1], *blocks.shape[2:])
        if not uses_b:
            blocks = blocks.any(0, keepdim=True)
        if not uses_h:
            blocks = blocks.any(1, keepdim=True)
        return blocks


def _tile_leaves(tiles: torch.Tensor, shape: _CallShape) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Per-tile index ranges over a ``[Bx, Hx, NQ, NKV]`` grid."""
    device = tiles.device
    bx, hx, nq, nkv = tiles.shape
    q_bs, kv_bs = shape.block_size
    b = torch.arange(bx, device=device).view(-1, 1, 1, 1)
    h = torch.arange(hx, device=device).view(1, -1, 1, 1)
    q0 = torch.arange(nq, device=device).view(1, 1, -1, 1) * q_bs
    kv0 = torch.arange(nkv, device=device).view(1, 1, 1, -1) * kv_bs
    return {"b": (b, b), "h": (h, h), "q_idx": (q0, (q0 + q_bs - 1).clamp(max=shape.q_len - 1)),
            "kv_idx": (kv0, (kv0 + kv_bs - 1).clamp(max=shape.kv_len - 1))}


def _site_error(site: Node, traced: TracedMod, what: str, name: str, values: List[torch.Tensor]) -> Optional[str]:
    """The torch backend's error message for ``site`` over evaluated operand ``values``, or None."""
    if site.op == "load":
        tensor = traced.captured[site.args[0]]
        for dim, (index, size) in enumerate(zip(values, tensor.shape)):
            bad = (index < -size) | (index >= size)
            if bool(bad.any()):
                example = int(index[bad].flatten()[0])
                return (f"{what} {name!r} raised IndexError: index {example} is out of bounds for dimension {dim} "
                        f"with size {size} (captured tensor of shape {tuple(tensor.shape)}; the Triton backends "
                        "check every position the kernel evaluates, as the torch backend does)")
        return None
    if bool((values[0] == 0).any()):
        return (f"{what} {name!r} raised RuntimeError: ZeroDivisionError (integer "
                f"{'//' if site.op == 'floordiv' else '%'} by zero at a position the kernel evaluates)")
    return None


def _exact_check(traced: TracedMod, sites: List[Node], tiles: torch.Tensor, shape: _CallShape,
                 what: str, name: str) -> None:
    """Evaluate the sites' operands element by element on ``tiles`` (bool ``[Bx, Hx, NQ, NKV]``)."""
    positions = torch.nonzero(tiles)
    if positions.numel() == 0:
        return
    device = tiles.device
    q_bs, kv_bs = shape.block_size
    per_chunk = max(1, EXACT_CHUNK_ELEMENTS // (q_bs * kv_bs))
    rows, cols = torch.arange(q_bs, device=device), torch.arange(kv_bs, device=device)
    operands = [(site, [a for a in (site.args[1:] if site.op == "load" else site.args[1:2])]) for site in sites]
    for start in range(0, positions.shape[0], per_chunk):
        chunk = positions[start:start + per_chunk]
        # Positions past the sequence are clamped onto its last row / column, as the torch backend does.
        q_idx = (chunk[:, 2:3] * q_bs + rows).clamp(max=shape.q_len - 1).view(-1, q_bs, 1)
        kv_idx = (chunk[:, 3:4] * kv_bs + cols).clamp(max=shape.kv_len - 1).view(-1, 1, kv_bs)
        args = {"b": chunk[:, 0].view(-1, 1, 1), "h": chunk[:, 1].view(-1, 1, 1), "q_idx": q_idx, "kv_idx": kv_idx}
        for site, nodes in operands:
            values = [evaluate(TracedMod(traced.kind, node, traced.captured, traced.name), args).long()
                      for node in nodes]
            message = _site_error(site, traced, what, name, values)
            if message is not None:
                raise ValueError(message)


def _check_tiles(traced: TracedMod, sites: List[Node], shape: _CallShape, what: str, name: str, device) -> None:
    """Sites bounded tile by tile over the visited tiles, then evaluated exactly where still doubtful."""
    uses = set().union(*(graph_args(site) for site in sites))
    tiles = shape.visited_tiles("b" in uses, "h" in uses).to(device)
    leaves = _tile_leaves(tiles, shape)
    doubtful = torch.zeros_like(tiles)
    for site in sites:
        doubtful |= _doubtful(site, traced, leaves, shape.block_size, device).expand_as(tiles)
    _exact_check(traced, sites, tiles & doubtful, shape, what, name)


def _check_one(mod: Optional[Callable], kind: str, shape: _CallShape, device, mask_token) -> None:
    if mod is None:
        return
    try:
        traced = trace_score_mod(mod) if kind == "score" else trace_mask_mod(mod)
    except (UntraceableModError, TypeError):
        return  # the kernel path reports (score_mod) or falls back to a bitmask (mask_mod)
    what = f"{kind}_mod"
    base = (what, traced.key, tuple(_tensor_signature(t) for t in traced.captured),
            shape.batch, shape.heads, shape.q_len, shape.kv_len, shape.block_size)
    if base in _checked or base + (mask_token,) in _checked:
        return
    sites = unsafe_sites(traced)
    if not sites:
        _remember(base)
        return
    if _proven_whole(traced, sites, shape, device):  # most safe mods, whatever the BlockMask
        _remember(base)
        return
    _check_tiles(traced, sites, shape, what, mod_name(mod), device)
    _remember(base + (mask_token,))


def _proven_whole(traced: TracedMod, sites: List[Node], shape: _CallShape, device) -> bool:
    """Whether interval analysis proves every site safe over the whole call taken as one tile."""
    whole = shape.whole_call_leaves(device)
    return not any(bool(_doubtful(site, traced, whole, shape.block_size, device).any()) for site in sites)


def check_mods(score_mod: Optional[Callable], block_mask, batch: int, heads: int, q_len: int, kv_len: int,
               device) -> None:
    """Raise what the torch backend would raise for ``score_mod`` / ``block_mask.mask_mod`` on this
    call (``ValueError`` naming the mod for an out-of-range index or an integer division by zero),
    before a Triton kernel runs. ``heads``: query heads. Cached; see the module docstring."""
    if getattr(block_mask, "visits_every_tile", False):
        mask_token = ("every tile",)  # the mask attention() builds for block_mask=None
    else:
        mask_token = ("block_mask", id(block_mask), block_mask.layout_signature())
    _check_one(score_mod, "score", _CallShape(batch, heads, q_len, kv_len, block_mask, False), device, mask_token)
    _check_one(block_mask.mask_mod, "mask", _CallShape(batch, heads, q_len, kv_len, block_mask, True), device,
               mask_token)
