"""Tracing a mask_mod / score_mod into a small expression graph (``graph.py``).

The mod is called once with symbolic values (``Symbol``) in place of its arguments, with
FlexAttention's per-element semantics: every argument is one value (a 0-d tensor under Flex's
``vmap``), and the mod's result is one value. Python operators, the torch functions and tensor
methods in ``_HANDLERS`` record ``Node``s instead of computing.

Captured tensors are read through indexing, with any mix of forms a per-element mod can use:
``ids[b, q_idx]``, chained ``bias[b][q_idx]``, ``table[h][q_idx][kv_idx]``, ``t[..., kv_idx]``,
constant and size-1 slices, and values computed from other loads as indices
(``starts[doc_ids[q_idx]] + 1``). A partly indexed tensor stays a lazy view until every
dimension is fixed, so indexing a large table costs nothing. A view that is used whole (``(table[q_idx]
* table[kv_idx]).sum(-1)``, ``torch.isin(kv_idx, allowed)``, ``(q_idx == special).any()``) becomes a
small array of loads with constant indices, at most ``MAX_ELEMENTS`` of them; reductions over it
unroll into the graph. The captured values never enter the graph: each indexed tensor is a
numbered *captured input*, so new values of the same shape reuse the same compiled kernel.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .graph import (COMPARE, Node, UntraceableModError, binary, const, evaluate_graph, kind_of_dtype, promote,
                    unary, where)

__all__ = ["INDEX_ARGS", "MAX_ELEMENTS", "Node", "Symbol", "TracedMod", "UntraceableModError", "evaluate",
           "trace_mask_mod", "trace_score_mod"]

INDEX_ARGS = ("b", "h", "q_idx", "kv_idx")
# Largest array (a whole small captured tensor, or a partly indexed one) a mod may compute with.
MAX_ELEMENTS = 256
_DTYPE_OF_KIND = {"bool": torch.bool, "int": torch.int64, "float": torch.float32}


class Tracer:
    """Collects captured tensors while one mod is traced."""

    def __init__(self):
        self.captured: List[torch.Tensor] = []
        self._slots: Dict[int, int] = {}

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
            return self.view(value).whole()
        if isinstance(value, (list, tuple)):
            items = [self.lift(v) for v in value]
            if not all(item.shape == items[0].shape for item in items):
                raise UntraceableModError("a ragged list of values")
            nodes = tuple(n for item in items for n in item.nodes)
            return Symbol(self, nodes, (len(items),) + (items[0].shape if items else ()))
        return Symbol(self, (const(value),), ())

    def view(self, tensor: torch.Tensor) -> "CapturedView":
        if tensor.dim() == 0:
            return CapturedView(self, tensor, self.slot(tensor), ())
        return CapturedView(self, tensor, self.slot(tensor), tuple(range(s) for s in tensor.shape))


def _flat_positions(shape: Sequence[int]) -> torch.Tensor:
    return torch.arange(math.prod(shape), dtype=torch.int64).reshape(tuple(shape))


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


def _normalize_index(index, ndim: int) -> list:
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
        return _DTYPE_OF_KIND[self.kind]

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
        entries = _normalize_index(index, len(self.shape))
        if self.view is not None:
            return self.view.index(entries)
        grid = _flat_positions(self.shape)
        picks = []
        for entry in entries:
            if isinstance(entry, slice) or (isinstance(entry, int) and not isinstance(entry, bool)):
                picks.append(entry)
            else:
                raise UntraceableModError("indexing a computed array with a traced or tensor index")
        chosen = grid[tuple(picks)]
        return Symbol(self.tracer, tuple(self.nodes[i] for i in chosen.reshape(-1).tolist()), tuple(chosen.shape))

    def __getattr__(self, name):
        handler = _HANDLERS.get(getattr(torch.Tensor, name, None))
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

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tracer = next(a.tracer for a in _flatten(list(args) + list(kwargs.values())) if isinstance(a, Symbol))
        handler = _HANDLERS.get(func)
        if handler is None:
            name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
            raise UntraceableModError(f"torch function {name}")
        return handler(tracer, *args, **kwargs)


def _flatten(values):
    for value in values:
        if isinstance(value, (tuple, list)):
            yield from _flatten(value)
        else:
            yield value


# ---------------------------------------------------------------------------------------------
# Elementwise application, reductions, and the composite operations
# ---------------------------------------------------------------------------------------------

def elementwise(tracer: Tracer, fn: Callable[..., Node], *values) -> Symbol:
    """``fn`` applied per element to the broadcast of ``values`` (Symbols, scalars, tensors)."""
    lifted = [tracer.lift(v) for v in values]
    try:
        shape = tuple(torch.broadcast_shapes(*[v.shape for v in lifted]))
    except RuntimeError as error:
        raise UntraceableModError("values of shapes that do not broadcast", str(error)) from error
    if not shape:
        return Symbol(tracer, (fn(*[v.nodes[0] for v in lifted]),), ())
    picks = [_flat_positions(v.shape).expand(shape).reshape(-1).tolist() for v in lifted]
    nodes = tuple(fn(*[v.nodes[p[j]] for v, p in zip(lifted, picks)]) for j in range(math.prod(shape)))
    return Symbol(tracer, nodes, shape)


def _op(name: str) -> Callable[..., Node]:
    return lambda a, b: binary(name, a, b)


def _tree(combine: Callable[[Node, Node], Node], nodes: List[Node]) -> Node:
    while len(nodes) > 1:
        nodes = [combine(nodes[i], nodes[i + 1]) if i + 1 < len(nodes) else nodes[i] for i in range(0, len(nodes), 2)]
    return nodes[0]


def _reduce(tracer: Tracer, value, combine, empty, prepare=None, dim=None, keepdim=False) -> Symbol:
    value = tracer.lift(value)
    shape = value.shape
    dims = tuple(range(len(shape))) if dim is None else ((dim,) if isinstance(dim, int) else tuple(dim))
    dims = tuple(sorted(d % max(len(shape), 1) for d in dims)) if shape else ()
    kept = [d for d in range(len(shape)) if d not in dims]
    grid = _flat_positions(shape).permute(*kept, *dims).reshape(math.prod(shape[d] for d in kept), -1)
    out = []
    for row in grid.tolist():
        nodes = [value.nodes[i] for i in row]
        if prepare is not None:
            nodes = [prepare(n) for n in nodes]
        if not nodes:
            if empty is None:
                raise UntraceableModError("a reduction over zero elements with no identity")
            out.append(const(empty))
        else:
            out.append(_tree(combine, nodes))
    out_shape = tuple(1 if d in dims else s for d, s in enumerate(shape)) if keepdim else tuple(shape[d] for d in kept)
    return Symbol(tracer, tuple(out), out_shape)


def _as_bool(node: Node) -> Node:
    return node if node.kind == "bool" else binary("ne", node, const(0))


def _as_number(node: Node) -> Node:
    return unary("to_int", node) if node.kind == "bool" else node


def _trunc_node(x: Node) -> Node:
    if x.kind != "float":
        return _as_number(x)
    return where(binary("lt", x, const(0.0)), unary("ceil", x), unary("floor", x))


def _round_node(x: Node) -> Node:
    """Round half to even, as torch.round."""
    if x.kind != "float":
        return _as_number(x)
    nearest = unary("floor", binary("add", x, const(0.5)))
    tie_to_odd = binary("and", binary("eq", binary("sub", nearest, x), const(0.5)),
                        binary("ne", binary("mod", nearest, const(2.0)), const(0.0)))
    return where(tie_to_odd, binary("sub", nearest, const(1.0)), nearest)


def _sign_node(x: Node) -> Node:
    if x.kind == "bool":
        return x
    one, zero = (const(1.0), const(0.0)) if x.kind == "float" else (const(1), const(0))
    minus = const(-1.0) if x.kind == "float" else const(-1)
    return where(binary("gt", x, zero), one, where(binary("lt", x, zero), minus, zero))


def _signs_differ_inexact(a: Node, b: Node) -> Node:
    return binary("and", binary("ne", binary("mod", a, b), const(0)),
                  binary("ne", binary("lt", a, const(0)), binary("lt", b, const(0))))


def _fmod_node(a: Node, b: Node) -> Node:
    """C remainder (sign of the dividend), as torch.fmod."""
    if promote(a.kind, b.kind) == "float":
        return binary("sub", a, binary("mul", b, _trunc_node(binary("truediv", a, b))))
    remainder = binary("mod", a, b)
    return where(_signs_differ_inexact(a, b), binary("sub", remainder, b), remainder)


def _trunc_div_node(a: Node, b: Node) -> Node:
    if promote(a.kind, b.kind) == "float":
        return _trunc_node(binary("truediv", a, b))
    quotient = binary("floordiv", a, b)
    return where(_signs_differ_inexact(a, b), binary("add", quotient, const(1)), quotient)


def _to_dtype_node(x: Node, dtype: torch.dtype) -> Node:
    kind = kind_of_dtype(dtype)
    if kind == "bool":
        return _as_bool(x)
    if kind == "float":
        return unary("to_float", x)
    x = unary("to_int", x) if x.kind != "int" else x
    bits = {torch.uint8: 8, torch.int8: 8, torch.int16: 16}.get(dtype)
    if bits is None:
        return x
    if dtype == torch.uint8:
        return binary("mod", x, const(1 << bits))
    half = 1 << (bits - 1)
    return binary("sub", binary("mod", binary("add", x, const(half)), const(1 << bits)), const(half))


def _gelu_node(x: Node, approximate: str = "none") -> Node:
    x = unary("to_float", x) if x.kind != "float" else x
    if approximate == "tanh":
        cube = binary("mul", binary("mul", x, x), x)
        inner = binary("mul", const(math.sqrt(2.0 / math.pi)), binary("add", x, binary("mul", const(0.044715), cube)))
        gate = binary("add", const(1.0), unary("tanh", inner))
    elif approximate == "none":
        gate = binary("add", const(1.0), unary("erf", binary("mul", x, const(math.sqrt(0.5)))))
    else:
        raise UntraceableModError(f"gelu with approximate={approximate!r}")
    return binary("mul", binary("mul", const(0.5), x), gate)


def _softplus_node(x: Node, beta=1.0, threshold=20.0) -> Node:
    scaled = binary("mul", x, const(float(beta)))
    smooth = binary("truediv", unary("log1p", unary("exp", scaled)), const(float(beta)))
    return where(binary("gt", scaled, const(float(threshold))), unary("to_float", x), smooth)


def _relu_node(x: Node) -> Node:
    return where(binary("lt", x, const(0)), const(0.0) if x.kind == "float" else const(0), x)


# ---------------------------------------------------------------------------------------------
# Handlers: torch functions and tensor methods on Symbols
# ---------------------------------------------------------------------------------------------

def _unary_handler(make: Callable[[Node], Node]):
    def handler(tracer, x, *args, **kwargs):
        if args or any(v not in (None, 0) for k, v in kwargs.items() if k in ("out", "decimals")) or (
                set(kwargs) - {"out", "decimals"}):
            raise UntraceableModError("extra arguments to an elementwise function", f"{args} {kwargs}")
        return elementwise(tracer, make, x)
    return handler


def _binary_handler(name: str, reflected: bool = False):
    def handler(tracer, a, b=None, *, other=None, alpha=None, rounding_mode=None, out=None):
        b = other if b is None else b
        if reflected:
            a, b = b, a
        if alpha is not None:
            b = elementwise(tracer, _op("mul"), b, alpha)
        if rounding_mode == "floor":
            return elementwise(tracer, _op("floordiv"), a, b)
        if rounding_mode == "trunc":
            return elementwise(tracer, _trunc_div_node, a, b)
        if rounding_mode is not None:
            raise UntraceableModError(f"division with rounding_mode={rounding_mode!r}")
        return elementwise(tracer, _op(name), a, b)
    return handler


def _min_max(name: str):
    def handler(tracer, x, other=None, dim=None, keepdim=False, **kwargs):
        other = kwargs.pop("other", other)
        if isinstance(other, int) and not isinstance(other, bool):
            dim, other = other, None  # torch.max(x, 1) reduces over dim 1
        if dim is not None:
            raise UntraceableModError(f"torch.{name} over a dim (values and indices)", "use amax/amin")
        if other is not None:
            return elementwise(tracer, _op(name), x, other)
        return _reduce(tracer, x, _op(name), None)
    return handler


def _reduction(combine, empty, prepare=None, finish=None):
    def handler(tracer, x, dim=None, keepdim=False, *, dtype=None, out=None):
        result = _reduce(tracer, x, combine, empty, prepare, dim, keepdim)
        if finish is not None:
            count = math.prod(tracer.lift(x).shape) // max(1, math.prod(result.shape))
            result = elementwise(tracer, lambda n: finish(n, count), result)
        if dtype is not None:
            result = elementwise(tracer, lambda n: _to_dtype_node(n, dtype), result)
        return result
    return handler


def _dot(tracer, a, b, **kwargs):
    a, b = tracer.lift(a), tracer.lift(b)
    if len(a.shape) == 1 and len(b.shape) == 1:
        return _reduce(tracer, elementwise(tracer, _op("mul"), a, b), _op("add"), 0, _as_number)
    if len(a.shape) == 2 and len(b.shape) == 1:  # matrix @ vector
        return _reduce(tracer, elementwise(tracer, _op("mul"), a, b), _op("add"), 0, _as_number, dim=-1)
    if len(a.shape) == 1 and len(b.shape) == 2:  # vector @ matrix
        column = Symbol(tracer, a.nodes, (a.shape[0], 1))
        return _reduce(tracer, elementwise(tracer, _op("mul"), column, b), _op("add"), 0, _as_number, dim=0)
    raise UntraceableModError("matmul of shapes other than vector/matrix", f"{a.shape} @ {b.shape}")


def _where(tracer, cond, values=None, other=None, **kwargs):
    if values is None or other is None:
        raise UntraceableModError("torch.where with one argument")
    return elementwise(tracer, where, cond, values, other)


def _tensor_where(tracer, values, cond, other=None, **kwargs):
    return elementwise(tracer, where, cond, values, kwargs.get("y", other))


def _clamp(tracer, x, min=None, max=None, **kwargs):
    result = tracer.lift(x)
    if min is not None:
        result = elementwise(tracer, _op("max"), result, min)
    if max is not None:
        result = elementwise(tracer, _op("min"), result, max)
    return result


def _isin(tracer, elements, test_elements, *, assume_unique=False, invert=False):
    tests = tracer.lift(test_elements).nodes

    def member(x: Node) -> Node:
        hit = _tree(_op("or"), [binary("eq", x, t) for t in tests]) if tests else const(False)
        return unary("not", hit) if invert else hit
    return elementwise(tracer, member, elements)


def _constant_array(tracer, shape, value, kind: str) -> Symbol:
    shape = tuple(shape)
    if math.prod(shape) > MAX_ELEMENTS:
        raise UntraceableModError(f"a constant array of shape {shape}")
    cast = {"bool": bool, "int": int, "float": float}[kind]
    return Symbol(tracer, (const(cast(value)),) * math.prod(shape), shape)


def _size_arg(args, kwargs) -> tuple:
    if "size" in kwargs:
        size = kwargs.pop("size")
    elif len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
        size = args[0]
    else:
        size = args
    return tuple(int(s) for s in size)


def _new_filled(fill):
    def handler(tracer, x, *args, **kwargs):
        value = fill if fill is not None else (args[-1] if args else kwargs.pop("fill_value"))
        size_args = args[:-1] if fill is None and args else args
        dtype = kwargs.get("dtype")
        kind = kind_of_dtype(dtype) if dtype is not None else tracer.lift(x).kind
        return _constant_array(tracer, _size_arg(size_args, dict(kwargs)), value, kind)
    return handler


def _like(fill):
    def handler(tracer, x, fill_value=None, *, dtype=None, **kwargs):
        value = fill if fill is not None else fill_value
        symbol = tracer.lift(x)
        return _constant_array(tracer, symbol.shape, value, kind_of_dtype(dtype) if dtype is not None else symbol.kind)
    return handler


def _new_tensor(tracer, x, data, *, dtype=None, **kwargs):
    value = tracer.lift(data)
    kind = kind_of_dtype(dtype) if dtype is not None else value.kind
    return elementwise(tracer, lambda n: _to_dtype_node(n, _DTYPE_OF_KIND[kind]) if n.kind != kind else n, value)


def _to(tracer, x, *args, dtype=None, **kwargs):
    for arg in args:
        if isinstance(arg, torch.dtype):
            dtype = arg
        elif isinstance(arg, (torch.Tensor, Symbol)):
            dtype = arg.dtype
    if dtype is None:
        return tracer.lift(x)
    return elementwise(tracer, lambda n: _to_dtype_node(n, dtype), x)


def _cast(dtype):
    return lambda tracer, x, *args, **kwargs: elementwise(tracer, lambda n: _to_dtype_node(n, dtype), x)


def _reshape(tracer, x, *shape, **kwargs):
    x = tracer.lift(x)
    shape = _size_arg(shape, dict(kwargs, **({"size": kwargs["shape"]} if "shape" in kwargs else {})))
    target = tuple(torch.empty(x.shape, device="meta").reshape(shape).shape)
    return Symbol(tracer, x.nodes, target)


def _unsqueeze(tracer, x, dim):
    x = tracer.lift(x)
    shape = list(x.shape)
    shape.insert(dim % (len(shape) + 1), 1)
    return Symbol(tracer, x.nodes, tuple(shape))


def _squeeze(tracer, x, dim=None):
    x = tracer.lift(x)
    target = tuple(torch.empty(x.shape, device="meta").squeeze(*(() if dim is None else (dim,))).shape)
    return Symbol(tracer, x.nodes, target)


def _identity(tracer, x, *args, **kwargs):
    return tracer.lift(x)


def _getitem(tracer, tensor, index):
    if isinstance(tensor, Symbol):
        return tensor[index]
    if not isinstance(tensor, torch.Tensor):
        raise UntraceableModError(f"indexing a {type(tensor).__name__}")
    view = tracer.view(tensor)
    return view.index(_normalize_index(index, tensor.dim()))


def _item(tracer, x, *args, **kwargs):
    raise UntraceableModError("Tensor.item() (a traced value as a Python number)")


_UNARY_OPS = {
    "abs": "abs", "neg": "neg", "negative": "neg", "logical_not": "not", "tanh": "tanh", "exp": "exp",
    "exp2": "exp2", "log": "log", "log2": "log2", "sqrt": "sqrt", "sigmoid": "sigmoid", "sin": "sin", "cos": "cos",
    "erf": "erf", "log1p": "log1p", "expm1": "expm1", "floor": "floor", "ceil": "ceil",
}
_COMPOSED_UNARY = {
    "round": _round_node, "trunc": _trunc_node, "fix": _trunc_node, "sign": _sign_node, "sgn": _sign_node,
    "square": lambda x: binary("mul", x, x), "reciprocal": lambda x: binary("truediv", const(1.0), x),
    "rsqrt": lambda x: binary("truediv", const(1.0), unary("sqrt", x)), "relu": _relu_node,
    "log10": lambda x: binary("mul", unary("log", x), const(1.0 / math.log(10.0))),
    "bitwise_not": lambda x: unary("not" if x.kind == "bool" else "invert", x),
    "positive": lambda x: x,
}
_BINARY_OPS = {
    "add": "add", "sub": "sub", "subtract": "sub", "mul": "mul", "multiply": "mul", "div": "truediv",
    "divide": "truediv", "true_divide": "truediv", "floor_divide": "floordiv", "remainder": "mod", "pow": "pow",
    "minimum": "min", "maximum": "max", "fmin": "min", "fmax": "max", "logical_and": "and", "logical_or": "or",
    "logical_xor": "xor", "bitwise_and": "and", "bitwise_or": "or", "bitwise_xor": "xor",
    "bitwise_left_shift": "lshift", "bitwise_right_shift": "rshift", "eq": "eq", "ne": "ne", "not_equal": "ne",
    "lt": "lt", "less": "lt", "le": "le", "less_equal": "le", "gt": "gt", "greater": "gt", "ge": "ge",
    "greater_equal": "ge",
}
_DUNDER_OPS = {
    "add": "add", "sub": "sub", "mul": "mul", "truediv": "truediv", "floordiv": "floordiv", "mod": "mod",
    "pow": "pow", "and": "and", "or": "or", "xor": "xor", "lshift": "lshift", "rshift": "rshift",
}


def _build_handlers() -> Dict[object, Callable]:
    handlers: Dict[object, Callable] = {}

    def register(name: str, handler, namespaces=(torch, torch.Tensor)):
        for namespace in namespaces:
            func = getattr(namespace, name, None)
            if func is not None:
                handlers[func] = handler

    for name, op in _UNARY_OPS.items():
        register(name, _unary_handler(lambda x, op=op: unary(op, x)))
    for name, make in _COMPOSED_UNARY.items():
        register(name, _unary_handler(make))
    for name in ("erf", "expit", "log1p", "expm1", "round"):
        func = getattr(torch.special, name, None)
        if func is not None:
            handlers[func] = handlers[getattr(torch, {"expit": "sigmoid"}.get(name, name))]
    for name, op in _BINARY_OPS.items():
        register(name, _binary_handler(op))
    register("fmod", lambda tracer, a, b, **kw: elementwise(tracer, _fmod_node, a, b))
    for name, op in _DUNDER_OPS.items():
        register(f"__{name}__", _binary_handler(op), (torch.Tensor,))
        register(f"__r{name}__", _binary_handler(op, reflected=True), (torch.Tensor,))
    for name in ("eq", "ne", "lt", "le", "gt", "ge"):
        register(f"__{name}__", _binary_handler(name), (torch.Tensor,))
    for name, op in (("__neg__", "neg"), ("__abs__", "abs")):
        register(name, _unary_handler(lambda x, op=op: unary(op, x)), (torch.Tensor,))
    register("__invert__", handlers[torch.bitwise_not], (torch.Tensor,))
    register("__pos__", _identity, (torch.Tensor,))
    register("max", _min_max("max"))
    register("min", _min_max("min"))
    register("where", _where, (torch,))
    register("where", _tensor_where, (torch.Tensor,))
    for name in ("clamp", "clip"):
        register(name, _clamp)
    register("clamp_min", lambda tracer, x, min: _clamp(tracer, x, min=min))
    register("clamp_max", lambda tracer, x, max: _clamp(tracer, x, max=max))
    register("sum", _reduction(_op("add"), 0, _as_number))
    register("prod", _reduction(_op("mul"), 1, _as_number))
    register("mean", _reduction(_op("add"), None, lambda n: unary("to_float", n),
                                lambda total, count: binary("truediv", total, const(float(count)))))
    register("any", _reduction(_op("or"), False, _as_bool))
    register("all", _reduction(_op("and"), True, _as_bool))
    register("amax", _reduction(_op("max"), None))
    register("amin", _reduction(_op("min"), None))
    for name in ("dot", "matmul", "inner", "vdot", "__matmul__"):
        register(name, _dot)
    register("__rmatmul__", lambda tracer, a, b: _dot(tracer, b, a), (torch.Tensor,))
    register("isin", _isin, (torch,))
    register("new_ones", _new_filled(1), (torch.Tensor,))
    register("new_zeros", _new_filled(0), (torch.Tensor,))
    register("new_full", _new_filled(None), (torch.Tensor,))
    register("new_tensor", _new_tensor, (torch.Tensor,))
    register("ones_like", _like(1), (torch,))
    register("zeros_like", _like(0), (torch,))
    register("full_like", _like(None), (torch,))
    register("to", _to, (torch.Tensor,))
    register("type", _to, (torch.Tensor,))
    for name, dtype in (("float", torch.float32), ("double", torch.float64), ("half", torch.float16),
                        ("bfloat16", torch.bfloat16), ("long", torch.int64), ("int", torch.int32),
                        ("short", torch.int16), ("char", torch.int8), ("byte", torch.uint8), ("bool", torch.bool)):
        register(name, _cast(dtype), (torch.Tensor,))
    for name in ("reshape", "view"):
        register(name, _reshape)
    register("flatten", lambda tracer, x, *a, **k: _reshape(tracer, x, -1) if tracer.lift(x).shape else x)
    register("unsqueeze", _unsqueeze)
    register("squeeze", _squeeze)
    for name in ("clone", "detach", "contiguous", "cpu", "cuda"):
        register(name, _identity)
    register("__getitem__", _getitem, (torch.Tensor,))
    register("item", _item, (torch.Tensor,))
    handlers[F.gelu] = lambda tracer, x, approximate="none": elementwise(
        tracer, lambda n: _gelu_node(n, approximate), x)
    handlers[F.silu] = lambda tracer, x, inplace=False: elementwise(
        tracer, lambda n: binary("mul", n, unary("sigmoid", n)), x)
    handlers[F.softplus] = lambda tracer, x, beta=1.0, threshold=20.0: elementwise(
        tracer, lambda n: _softplus_node(n, beta, threshold), x)
    handlers[F.relu] = lambda tracer, x, inplace=False: elementwise(tracer, _relu_node, x)
    handlers[F.sigmoid] = handlers[torch.sigmoid]
    handlers[F.leaky_relu] = lambda tracer, x, negative_slope=0.01, inplace=False: elementwise(
        tracer, lambda n: where(binary("lt", n, const(0)), binary("mul", n, const(float(negative_slope))), n), x)
    return handlers


_HANDLERS = _build_handlers()


def _install_operators() -> None:
    """Python operators on Symbols, the same handlers as the tensor dunder methods."""
    for name in list(_DUNDER_OPS) + ["eq", "ne", "lt", "le", "gt", "ge"]:
        for dunder in (f"__{name}__", f"__r{name}__"):
            func = getattr(torch.Tensor, dunder, None)
            if func in _HANDLERS:
                handler = _HANDLERS[func]
                setattr(Symbol, dunder, lambda self, other, handler=handler: handler(self.tracer, self, other))
    for dunder in ("__neg__", "__abs__", "__invert__", "__pos__", "__matmul__", "__rmatmul__"):
        handler = _HANDLERS[getattr(torch.Tensor, dunder)]
        if dunder in ("__matmul__", "__rmatmul__"):
            setattr(Symbol, dunder, lambda self, other, handler=handler: handler(self.tracer, self, other))
        else:
            setattr(Symbol, dunder, lambda self, handler=handler: handler(self.tracer, self))
    Symbol.__round__ = lambda self, ndigits=None: elementwise(self.tracer, _round_node, self)
    Symbol.__floor__ = lambda self: elementwise(self.tracer, lambda n: unary("floor", n), self)
    Symbol.__ceil__ = lambda self: elementwise(self.tracer, lambda n: unary("ceil", n), self)
    Symbol.__trunc__ = lambda self: elementwise(self.tracer, _trunc_node, self)


_install_operators()


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


def _trace(fn: Callable, kind: str) -> TracedMod:
    tracer = Tracer()
    symbols = [Symbol(tracer, (Node("arg", (name,), "int"),), ()) for name in INDEX_ARGS]
    name = getattr(fn, "__name__", type(fn).__name__)
    if kind == "score":
        symbols.insert(0, Symbol(tracer, (Node("arg", ("score",), "float"),), ()))
    try:
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
