"""Tracing a mask_mod / score_mod into a small expression graph (``graph.py``).

The mod is called once with symbolic values (``Symbol``) in place of its arguments, with
FlexAttention's per-element semantics: every argument is one value (a 0-d tensor under Flex's
``vmap``), and the mod's result is one value. Python operators, the torch functions and tensor
methods in ``torch_ops.HANDLERS`` record ``Node``s instead of computing: ``Symbol`` declares its
operators in its class body, each one the handler of ``torch.Tensor``'s method of the same name.
The handlers build values through the ``Tracer`` they are given, so ``torch_ops`` and ``pointwise``
do not import this module: the tracer's modules import one way (graph, composites <- pointwise <-
torch_ops <- tracing).

Captured tensors are read through indexing, with any mix of forms a per-element mod can use:
``ids[b, q_idx]``, chained ``bias[b][q_idx]``, ``table[h][q_idx][kv_idx]``, ``t[..., kv_idx]``,
constant and size-1 slices, and values computed from other loads as indices
(``starts[doc_ids[q_idx]] + 1``). A partly indexed tensor stays a lazy view until every
dimension is fixed, so indexing a large table costs nothing. A view that is used whole (``(table[q_idx]
* table[kv_idx]).sum(-1)``, ``torch.isin(kv_idx, allowed)``, ``(q_idx == special).any()``) becomes a
small array of loads with constant indices, at most ``MAX_ELEMENTS`` of them; reductions over it
unroll into the graph. The captured values never enter the graph: each indexed tensor is a
numbered *captured input*, so new values of the same shape reuse the same compiled kernel.

Torch calls on real tensors during the trace (no traced value among the arguments) run eagerly, under a
``TorchFunctionMode`` that remembers where each result came from (``eager.py``):

- basic indexing of a tensor (ints, constant slices, ``...``, 0-d integer tensors: ``table[0]``,
  ``bias[head_tensor]``) stays a lazy view of the tensor it indexes, so the kernel reads the original
  tensor (its in-place changes are seen, and its gradient is the one autograd computes for it);
- any other result (``table * 2``, ``bias.T``, ``ids.long()``) is a *derived* tensor: a constant of this
  trace. When it is indexed, the trace refuses it if one of its sources requires grad (a kernel argument
  computed inside the mod is recomputed on every call, so a gradient taken through the one the trace saw
  would never reach the source; the PyTorch backend runs such a mod exactly), and otherwise records the
  sources' versions: a traced mod is reused only while they are unchanged (and while what the mod
  reads, ``closure.reach_identity``, is the same objects).

A score_mod that reads a tensor requiring grad that ``closure.captured_tensors`` cannot find (so
autograd would not be told about it) is an error (``HiddenTensorError``), not a lost gradient.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import math
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .closure import StructuredMod, captured_tensors, positions_by_identity, reach_identity
from .composites import round_node, trunc_node
from .eager import EagerResults, EagerTorch, HiddenTensorError, flatten_args
from .graph import (
    DTYPE_OF_KIND,
    MAX_ELEMENTS,
    Node,
    UntraceableModError,
    binary,
    const,
    evaluate_graph,
    flat_positions,
    kind_of_dtype,
    promote,
    unary,
    where,
)
from .torch_ops import HANDLERS

__all__ = ["INDEX_ARGS", "MAX_ELEMENTS", "HiddenTensorError", "Node", "Symbol", "TracedMod", "UntraceableModError",
           "evaluate", "trace_mask_mod", "trace_score_mod"]

INDEX_ARGS = ("b", "h", "q_idx", "kv_idx")


class Tracer:
    """Collects captured tensors while one mod is traced, and where eager tensors came from.

    It is also how the handlers (``torch_ops``, ``pointwise``) make traced values: ``lift``,
    ``elementwise``, ``array`` and ``is_traced``, without naming ``Symbol``.
    """

    def __init__(self):
        self.captured: List[torch.Tensor] = []
        self._slots: Dict[int, int] = {}
        self.eager = EagerResults()  # where the real tensors made during the trace came from

    def slot(self, tensor: torch.Tensor) -> int:
        if id(tensor) not in self._slots:
            self._slots[id(tensor)] = len(self.captured)
            self.captured.append(tensor)
        return self._slots[id(tensor)]

    def lift(self, value) -> "Symbol":
        """A Symbol, Python scalar or captured tensor as a Symbol (tensors beyond 0-d as arrays of loads)."""
        if isinstance(value, Symbol):
            return value
        if isinstance(value, torch.Tensor):
            return self.symbol_of(value)
        if isinstance(value, (list, tuple)):
            items = [self.lift(v) for v in value]
            if not all(item.shape == items[0].shape for item in items):
                raise UntraceableModError("a ragged list of values")
            nodes = tuple(n for item in items for n in item.nodes)
            return Symbol(self, nodes, (len(items),) + (items[0].shape if items else ()))
        return Symbol(self, (const(value),), ())

    def array(self, nodes: tuple, shape: tuple) -> Symbol:
        """A traced value of ``shape`` with one node per element, in row-major order."""
        return Symbol(self, nodes, shape)

    @staticmethod
    def is_traced(value) -> bool:
        return isinstance(value, Symbol)

    def elementwise(self, fn: Callable[..., Node], *values) -> Symbol:
        """``fn`` applied per element to the broadcast of ``values`` (Symbols, scalars, tensors)."""
        lifted = [self.lift(v) for v in values]
        try:
            shape = tuple(torch.broadcast_shapes(*[v.shape for v in lifted]))
        except RuntimeError as error:
            raise UntraceableModError("values of shapes that do not broadcast", str(error)) from error
        if not shape:
            return Symbol(self, (fn(*[v.nodes[0] for v in lifted]),), ())
        picks = [flat_positions(v.shape).expand(shape).reshape(-1).tolist() for v in lifted]
        nodes = tuple(fn(*[v.nodes[p[j]] for v, p in zip(lifted, picks)]) for j in range(math.prod(shape)))
        return Symbol(self, nodes, shape)

    def symbol_of(self, tensor: torch.Tensor) -> "Symbol":
        """A real tensor as a traced value: a lazy view of the tensor the kernel will read."""
        recipe = self.eager.recipe(tensor)
        if recipe is not None:
            return self.symbol_of(recipe[0])[recipe[1]]
        view = self.view(tensor)
        if tensor.dim() == 0:
            return view.index([])
        return Symbol(self, None, view.shape, view)

    def view(self, tensor: torch.Tensor) -> "CapturedView":
        self.eager.check_captured(tensor)
        if tensor.dim() == 0:
            return CapturedView(self, tensor, self.slot(tensor), ())
        return CapturedView(self, tensor, self.slot(tensor), tuple(range(s) for s in tensor.shape))


class CapturedView:
    """A captured tensor with some dimensions fixed by index nodes: ``dims[d]`` is a Node (fixed) or
    a ``range`` of positions along original dim ``d`` (free, possibly sliced)."""

    def __init__(self, tracer: Tracer, tensor: torch.Tensor, slot: int, dims: tuple):
        self.tracer, self.tensor, self.slot, self.dims = tracer, tensor, slot, dims

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(len(d) for d in self.dims if isinstance(d, range))

    def _load(self, dims) -> Node:
        return Node("load", (self.slot, *dims), kind_of_dtype(self.tensor.dtype))

    def whole(self) -> "Symbol":
        """Every element, as an array of loads (small views only)."""
        shape = self.shape
        if math.prod(shape) > MAX_ELEMENTS:
            raise UntraceableModError(
                f"using a captured tensor of shape {tuple(self.tensor.shape)} whole ({math.prod(shape)} elements)",
                f"index it with the traced arguments, or keep such arrays under {MAX_ELEMENTS} elements")
        nodes = []
        for positions in itertools.product(*[d for d in self.dims if isinstance(d, range)]):
            chosen = iter(positions)
            nodes.append(self._load([d if isinstance(d, Node) else const(next(chosen)) for d in self.dims]))
        return Symbol(self.tracer, tuple(nodes), shape)

    def index(self, entries: list) -> "Symbol":
        dims, entries = list(self.dims), iter(entries)
        for d, current in enumerate(self.dims):
            if isinstance(current, range):
                dims[d] = _apply_entry(self.tracer, current, next(entries))
        if any(isinstance(d, range) for d in dims):
            return Symbol(self.tracer, None, tuple(len(d) for d in dims if isinstance(d, range)),
                          CapturedView(self.tracer, self.tensor, self.slot, tuple(dims)))
        return Symbol(self.tracer, (self._load(dims),), ())


def normalize_index(index, ndim: int) -> list:
    """The index as one entry per dimension (``slice(None)`` for the ones not mentioned)."""
    entries = list(index) if isinstance(index, tuple) else [index]
    if any(e is None for e in entries):
        raise UntraceableModError("indexing with None (a new axis)")
    ellipses = sum(1 for e in entries if e is Ellipsis)
    if ellipses > 1:
        raise UntraceableModError("an index with more than one Ellipsis")
    specified = len(entries) - ellipses
    if specified > ndim:
        raise UntraceableModError("too many indices", f"{specified} indices for {ndim} dimension(s)")
    if ellipses:
        at = entries.index(Ellipsis)
        entries[at:at + 1] = [slice(None)] * (ndim - specified)
    return entries + [slice(None)] * (ndim - len(entries))


def _apply_entry(tracer: Tracer, positions: range, entry):
    """One index entry applied to a free dim: a new ``range`` (slice) or the original index Node."""
    if isinstance(entry, slice):
        for bound in (entry.start, entry.stop, entry.step):
            if bound is not None and not isinstance(bound, int):
                raise UntraceableModError("a slice with a traced or non-int bound",
                                          "slices must have constant bounds; index with the traced value instead")
        return positions[entry]
    if isinstance(entry, bool) or (isinstance(entry, torch.Tensor) and entry.dim() > 0) or isinstance(entry, list):
        raise UntraceableModError("indexing with a bool, list or tensor (advanced indexing)",
                                  "index with one traced or int value per dimension")
    if isinstance(entry, int):
        try:
            return const(positions[entry])
        except IndexError as error:
            raise UntraceableModError("an index out of range", f"index {entry} for size {len(positions)}") from error
    value = tracer.lift(entry)
    if value.shape != ():
        raise UntraceableModError("indexing with an array of values", f"index of shape {value.shape}")
    node = value.node
    if node.kind == "float":
        raise UntraceableModError("indexing a captured tensor with a float value")
    if positions.start == 0 and positions.step == 1:
        return node  # negative indices wrap against the dim's size downstream, as in torch
    wrapped = where(binary("lt", node, const(0)), binary("add", node, const(len(positions))), node)
    return binary("add", const(positions.start), binary("mul", const(positions.step), wrapped))


def _operator(name: str) -> Callable:
    """Symbol's binary operator ``name``: the handler of ``torch.Tensor``'s method of that name."""
    handler = HANDLERS[getattr(torch.Tensor, name)]

    def method(self, other):
        return handler(self.tracer, self, other)
    method.__name__, method.__qualname__ = name, f"Symbol.{name}"
    return method


def _unary_operator(name: str) -> Callable:
    """Symbol's unary operator ``name``: the handler of ``torch.Tensor``'s method of that name."""
    handler = HANDLERS[getattr(torch.Tensor, name)]

    def method(self):
        return handler(self.tracer, self)
    method.__name__, method.__qualname__ = name, f"Symbol.{name}"
    return method


class Symbol:
    """A traced value: one ``Node`` per element of ``shape`` (``()`` for the usual single value), or
    a lazy ``CapturedView`` that becomes nodes only when used whole."""

    __slots__ = ("tracer", "_nodes", "shape", "view")

    def __init__(self, tracer: Tracer, nodes: Optional[tuple], shape: tuple, view: Optional[CapturedView] = None):
        self.tracer, self._nodes, self.shape, self.view = tracer, nodes, tuple(shape), view

    @property
    def nodes(self) -> tuple:
        if self._nodes is None:
            self._nodes = self.view.whole().nodes
        return self._nodes

    @property
    def node(self) -> Node:
        if math.prod(self.shape) != 1:
            raise UntraceableModError(f"a value of shape {self.shape} where a single value is needed",
                                      "index the remaining dimensions or reduce them (.sum(), .any(), ...)")
        return self.nodes[0]

    @property
    def kind(self) -> str:
        return promote(*[n.kind for n in self.nodes]) if self.nodes else "int"

    @property
    def dtype(self) -> torch.dtype:
        # What the kernel computes in: float32 for scores, int64 for indices.
        return DTYPE_OF_KIND[self.kind]

    @property
    def device(self):
        return None  # a traced value lives wherever the kernel runs; creation functions ignore it

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: Optional[int] = None):
        return torch.Size(self.shape) if dim is None else self.shape[dim]

    def numel(self) -> int:
        return math.prod(self.shape)

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d value")
        return self.shape[0]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, index):
        entries = normalize_index(index, len(self.shape))
        if self.view is not None:
            return self.view.index(entries)
        grid = flat_positions(self.shape)
        picks = []
        for entry in entries:
            if isinstance(entry, slice) or (isinstance(entry, int) and not isinstance(entry, bool)):
                picks.append(entry)
            else:
                raise UntraceableModError("indexing a computed array with a traced or tensor index")
        chosen = grid[tuple(picks)]
        return Symbol(self.tracer, tuple(self.nodes[i] for i in chosen.reshape(-1).tolist()), tuple(chosen.shape))

    def __getattr__(self, name):
        handler = HANDLERS.get(getattr(torch.Tensor, name, None))
        if handler is None:
            raise AttributeError(f"cannot trace the tensor attribute or method {name!r}")
        return lambda *args, **kwargs: handler(self.tracer, self, *args, **kwargs)

    def __bool__(self):
        raise UntraceableModError("Python control flow on a traced value (if / and / or / bool())",
                                  "use &, |, ~ and torch.where instead")

    def __index__(self):
        raise UntraceableModError("using a traced value as a Python int (indexing a list, range(), ...)")

    __int__ = __float__ = __index__
    __hash__ = None  # type: ignore[assignment]

    # Python operators, all of them: each is the handler (torch_ops.HANDLERS) of torch.Tensor's method of
    # the same name, so ``q_idx >= kv_idx`` on traced values records what it computes on tensors, and the
    # reflected forms make ``1 + q_idx`` trace too (``tensor + q_idx`` comes through __torch_function__).
    __add__, __radd__ = _operator("__add__"), _operator("__radd__")
    __sub__, __rsub__ = _operator("__sub__"), _operator("__rsub__")
    __mul__, __rmul__ = _operator("__mul__"), _operator("__rmul__")
    __truediv__, __rtruediv__ = _operator("__truediv__"), _operator("__rtruediv__")
    __floordiv__, __rfloordiv__ = _operator("__floordiv__"), _operator("__rfloordiv__")
    __mod__, __rmod__ = _operator("__mod__"), _operator("__rmod__")
    __pow__, __rpow__ = _operator("__pow__"), _operator("__rpow__")
    __matmul__, __rmatmul__ = _operator("__matmul__"), _operator("__rmatmul__")
    __and__, __rand__ = _operator("__and__"), _operator("__rand__")
    __or__, __ror__ = _operator("__or__"), _operator("__ror__")
    __xor__, __rxor__ = _operator("__xor__"), _operator("__rxor__")
    __lshift__, __rlshift__ = _operator("__lshift__"), _operator("__rlshift__")
    __rshift__, __rrshift__ = _operator("__rshift__"), _operator("__rrshift__")
    __eq__, __ne__ = _operator("__eq__"), _operator("__ne__")
    __lt__, __le__ = _operator("__lt__"), _operator("__le__")
    __gt__, __ge__ = _operator("__gt__"), _operator("__ge__")
    __neg__, __pos__ = _unary_operator("__neg__"), _unary_operator("__pos__")
    __abs__, __invert__ = _unary_operator("__abs__"), _unary_operator("__invert__")

    # round(), math.floor/ceil/trunc: torch.Tensor has none of these, so they are ours (as torch.round etc.).
    def __round__(self, ndigits=None):
        if ndigits is not None and not (isinstance(ndigits, int) and ndigits == 0):
            raise UntraceableModError("round with decimals != 0")  # as torch.round(x, decimals=...)
        return self.tracer.elementwise(round_node, self)

    def __floor__(self):
        return self.tracer.elementwise(lambda n: unary("floor", n), self)

    def __ceil__(self):
        return self.tracer.elementwise(lambda n: unary("ceil", n), self)

    def __trunc__(self):
        return self.tracer.elementwise(trunc_node, self)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tracer = next(a.tracer for a in flatten_args(list(args) + list(kwargs.values())) if isinstance(a, Symbol))
        handler = HANDLERS.get(func)
        if handler is None:
            name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
            raise UntraceableModError(f"torch function {name}")
        return handler(tracer, *args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------

@dataclass
class TracedMod:
    """A traced mod: its graph, its captured inputs, and a structure key for caches.

    ``kind`` is "mask" or "score". ``key`` hashes the graph structure and each captured input's
    dtype and rank, not values or sizes, so new data reuses the compiled kernel.
    """

    kind: str
    graph: Node
    captured: List[torch.Tensor]
    name: str
    key: str = field(init=False)

    def __post_init__(self):
        signature = self.kind + "|" + self.graph.key() + "|" + ";".join(
            f"{t.dtype}:{t.dim()}" for t in self.captured)
        self.key = hashlib.sha256(signature.encode()).hexdigest()[:24]


@dataclass
class _Traced:
    """A cached trace and what it is valid for."""

    identity: tuple        # ids of what the mod reads (closure.reach_identity)
    traced: TracedMod
    watched: tuple         # (tensor, version, requires_grad) of tensors whose values the trace baked in
    hidden: tuple          # tensors the trace read that closure.captured_tensors does not find

    def still_valid(self, identity: tuple) -> bool:
        return identity == self.identity and all(
            t._version == version and t.requires_grad == grad for t, version, grad in self.watched)


# mod -> {kind: _Traced}: a mod is traced once per identity (and per what it reaches), not per call.
_TRACED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _check_hidden(kind: str, name: str, hidden: tuple) -> None:
    """Never lose a gradient silently: a learnable tensor autograd is not told about is an error."""
    if kind != "score" or not torch.is_grad_enabled():
        return
    for tensor in hidden:
        if tensor.requires_grad:
            raise HiddenTensorError(
                f"score_mod {name!r} reads a tensor of shape {tuple(tensor.shape)} ({tensor.dtype}) that requires "
                "grad, but triton_attn cannot find it from the function (closure cells, defaults, globals and "
                "attribute chains its code names, self of a method, functools.partial arguments, a callable "
                "object's attributes), so its gradient would be lost. Reach it through one of those (e.g. a "
                "closure variable or a default argument), or detach it if it needs no gradient.")


# (kind, StructuredMod type, structure, tensor specs) -> (traced stand-in, captured order); a few recent ones.
_STRUCTURED: "collections.OrderedDict" = collections.OrderedDict()
STRUCTURED_CACHE_SIZE = 256


def _trace_structured(mod: StructuredMod, kind: str) -> TracedMod:
    """A ``StructuredMod``'s graph depends only on its structure and its tensors' dtypes and ranks (see
    ``StructuredMod``), so it is traced once per structure and bound to each instance's tensors: a model
    builds a new mask_mod object for every decode step, and re-tracing it every step is host time."""
    tensors = mod.tensors()
    specs = tuple((t.dtype, t.dim()) for t in tensors)
    cache_key = (kind, type(mod), mod.structure(), specs)
    try:
        cached = _STRUCTURED.get(cache_key)
    except TypeError:  # an unhashable structure: trace every time
        return _trace_now(mod, kind)
    if cached is None:
        stand_in = type(mod).stand_in(cache_key[2], specs)
        template, placeholders = _trace_now(stand_in, kind), stand_in.tensors()
        order = positions_by_identity(template.captured, placeholders)
        cached = _STRUCTURED[cache_key] = (template, order)
        while len(_STRUCTURED) > STRUCTURED_CACHE_SIZE:
            _STRUCTURED.popitem(last=False)
    else:
        _STRUCTURED.move_to_end(cache_key)
    template, order = cached
    return TracedMod(kind, template.graph, [tensors[i] for i in order], getattr(mod, "__name__", template.name))


def _trace(fn: Callable, kind: str) -> TracedMod:
    prebuilt = getattr(fn, "traced_mod", None)  # a graph bound to new tensors (triton_attn.ops.BoundMod)
    if isinstance(prebuilt, TracedMod) and prebuilt.kind == kind:
        return prebuilt
    if isinstance(fn, StructuredMod):
        return _trace_structured(fn, kind)
    try:
        entry = _TRACED.get(fn)
    except TypeError:  # not weak-referenceable or not hashable: trace every time
        cached = _trace_checked(fn, kind)
        _check_hidden(kind, cached.traced.name, cached.hidden)
        return cached.traced
    identity = reach_identity(fn)
    cached = entry.get(kind) if entry is not None else None
    if cached is None or not cached.still_valid(identity):
        cached = _trace_checked(fn, kind, identity)
        _TRACED.setdefault(fn, {})[kind] = cached
    _check_hidden(kind, cached.traced.name, cached.hidden)
    return cached.traced


def _trace_checked(fn: Callable, kind: str, identity: tuple = ()) -> _Traced:
    """Trace ``fn`` and note what the trace depends on (see ``_Traced``)."""
    tracer = Tracer()
    traced = _trace_now(fn, kind, tracer)
    read = {id(t): t for t in traced.captured if not tracer.eager.is_derived(t)}
    read.update(tracer.eager.watched)
    found = {id(t) for t in captured_tensors(fn)}
    hidden = tuple(t for key, t in read.items() if key not in found)
    watched = tuple((t, t._version, t.requires_grad) for t in tracer.eager.watched.values())
    return _Traced(identity, traced, watched, hidden)


def _trace_now(fn: Callable, kind: str, tracer: Optional[Tracer] = None) -> TracedMod:
    tracer = Tracer() if tracer is None else tracer
    symbols = [Symbol(tracer, (Node("arg", (name,), "int"),), ()) for name in INDEX_ARGS]
    name = getattr(fn, "__name__", type(fn).__name__)
    if kind == "score":
        symbols.insert(0, Symbol(tracer, (Node("arg", ("score",), "float"),), ()))
    try:
        with EagerTorch(tracer.eager, lambda value: isinstance(value, Symbol)):
            result = fn(*symbols)
        if isinstance(result, (bool, int, float, torch.Tensor)):
            result = tracer.lift(result)
        if not isinstance(result, Symbol):
            raise UntraceableModError(f"a {kind}_mod result of type {type(result).__name__}",
                                      "the result must be computed from the arguments")
        graph = result.node
    except UntraceableModError:
        raise
    except Exception as error:  # anything else the mod tried that symbols cannot do
        raise UntraceableModError(f"{type(error).__name__} while tracing {name!r}", str(error)) from error
    if kind == "mask" and graph.kind != "bool":
        raise TypeError(f"mask_mod {name!r} must return a bool, got a traced {graph.kind} value")
    if kind == "score" and graph.kind != "float":
        graph = unary("to_float", graph)
    return TracedMod(kind, graph, tracer.captured, name)


def trace_mask_mod(mask_mod: Callable) -> TracedMod:
    """Trace ``mask_mod(b, h, q_idx, kv_idx) -> bool``; raises ``UntraceableModError``."""
    return _trace(mask_mod, "mask")


def trace_score_mod(score_mod: Callable) -> TracedMod:
    """Trace ``score_mod(score, b, h, q_idx, kv_idx) -> score``; raises ``UntraceableModError``."""
    return _trace(score_mod, "score")


def evaluate(traced: TracedMod, args: Dict[str, torch.Tensor], captured: Optional[List[torch.Tensor]] = None):
    """Interpret the graph on tensors: ``args`` maps b/h/q_idx/kv_idx(/score) to broadcastable tensors.

    ``captured`` replaces the traced inputs (same order), as a kernel launch would.
    """
    return evaluate_graph(traced.graph, traced.captured if captured is None else captured, args)
