"""Tracing a mask_mod / score_mod into a small expression graph.

The mod is called once with symbolic values (``Symbol``) in place of its index arguments. Python
operators and the torch functions it uses (``torch.where``, ``torch.abs``, ``torch.tanh``, ...)
record ``Node``s instead of computing. Indexing a captured tensor with symbols (``ids[b, q_idx]``)
records a ``load`` and makes that tensor a numbered *captured input*; its values never enter the
graph, so other values of the same shape reuse the same compiled kernel.

The graph feeds three consumers: Triton code generation (the inlined predicate), interval
analysis (tile classification) and ``evaluate`` below (a reference interpreter used by tests).

Node ops (``Node.op`` and ``Node.args``):

- leaves: ``("arg", name)`` with name in b, h, q_idx, kv_idx, score; ``("const", value)`` with a
  Python bool/int/float; ``("load", slot, *index_nodes)``: captured input ``slot`` indexed by one
  node per dimension (0-d tensors take none).
- unary: neg, abs, not (logical), invert (bitwise on ints), tanh, exp, exp2, log, log2, sqrt,
  sigmoid, floor, ceil, to_float, to_int
- binary: add, sub, mul, truediv, floordiv, mod, pow, min, max, and, or, xor, eq, ne, lt, le, gt, ge
- ternary: where(cond, if_true, if_false)

Every node has a ``kind``: "bool", "int" or "float". Integer floordiv/mod follow Python (floor)
semantics, as torch does.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

INDEX_ARGS = ("b", "h", "q_idx", "kv_idx")


class UntraceableModError(TypeError):
    """The mod did something tracing cannot record (names the operation in ``operation``)."""

    def __init__(self, operation: str, detail: str = ""):
        self.operation = operation
        super().__init__(f"cannot trace {operation}" + (f": {detail}" if detail else ""))


@dataclass(frozen=True, eq=False)
class Node:
    op: str
    args: tuple
    kind: str  # "bool" | "int" | "float"

    def key(self) -> str:
        """Structural description: equal for equal graphs, independent of captured values."""
        parts = [a.key() if isinstance(a, Node) else repr(a) for a in self.args]
        return f"{self.op}:{self.kind}(" + ",".join(parts) + ")"


def _kind_of_dtype(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    return "float" if dtype.is_floating_point else "int"


def _const(value) -> Node:
    if isinstance(value, bool):
        return Node("const", (value,), "bool")
    if isinstance(value, int):
        return Node("const", (value,), "int")
    if isinstance(value, float):
        return Node("const", (value,), "float")
    raise UntraceableModError(f"a constant of type {type(value).__name__}", repr(value))


def _promote(*kinds: str) -> str:
    if "float" in kinds:
        return "float"
    if "int" in kinds:
        return "int"
    return "bool"


_COMPARE = {"eq", "ne", "lt", "le", "gt", "ge"}
_LOGIC = {"and", "or", "xor"}
_FLOAT_UNARY = {"tanh", "exp", "exp2", "log", "log2", "sqrt", "sigmoid"}


def _binary(op: str, left: Node, right: Node) -> Node:
    if op in _COMPARE:
        kind = "bool"
    elif op in _LOGIC:
        kind = _promote(left.kind, right.kind)
        if kind == "float":
            raise UntraceableModError(f"bitwise {op} on floating-point values")
    elif op == "truediv" or op == "pow" and (left.kind == "float" or right.kind == "float"):
        kind = "float"
    else:
        kind = _promote(left.kind, right.kind)
        if kind == "bool" and op in {"add", "sub", "mul", "floordiv", "mod", "pow"}:
            kind = "int"
    return Node(op, (left, right), kind)


def _unary(op: str, operand: Node) -> Node:
    if op in _FLOAT_UNARY:
        return Node(op, (operand,), "float")
    if op == "not":
        return Node(op, (operand,), "bool")
    if op == "to_float":
        return Node(op, (operand,), "float")
    if op == "to_int":
        return Node(op, (operand,), "int")
    if op in ("floor", "ceil"):
        return Node(op, (operand,), operand.kind if operand.kind != "bool" else "int")
    if op == "neg" and operand.kind == "bool":
        raise UntraceableModError("negation of a bool value")
    return Node(op, (operand,), operand.kind)


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

    def lift(self, value) -> Node:
        """A Python value, a Symbol or a captured 0-d tensor as a Node."""
        if isinstance(value, Symbol):
            return value.node
        if isinstance(value, torch.Tensor):
            if value.dim() != 0:
                raise UntraceableModError(
                    "arithmetic between a traced index and a whole captured tensor",
                    f"tensor of shape {tuple(value.shape)} (index it with the traced arguments instead)")
            return Node("load", (self.slot(value),), _kind_of_dtype(value.dtype))
        return _const(value)


_TORCH_UNARY = {
    torch.abs: "abs", torch.neg: "neg", torch.negative: "neg", torch.logical_not: "not", torch.bitwise_not: "invert",
    torch.tanh: "tanh", torch.exp: "exp", torch.exp2: "exp2", torch.log: "log", torch.log2: "log2",
    torch.sqrt: "sqrt", torch.sigmoid: "sigmoid", torch.floor: "floor", torch.ceil: "ceil",
    torch.Tensor.abs: "abs", torch.Tensor.neg: "neg", torch.Tensor.logical_not: "not", torch.Tensor.tanh: "tanh",
    torch.Tensor.exp: "exp", torch.Tensor.exp2: "exp2", torch.Tensor.log: "log", torch.Tensor.log2: "log2",
    torch.Tensor.sqrt: "sqrt", torch.Tensor.sigmoid: "sigmoid", torch.Tensor.floor: "floor", torch.Tensor.ceil: "ceil",
    torch.Tensor.__abs__: "abs", torch.Tensor.__neg__: "neg", torch.Tensor.__invert__: "invert",
}
_TORCH_BINARY = {
    torch.add: "add", torch.sub: "sub", torch.mul: "mul", torch.div: "truediv", torch.true_divide: "truediv",
    torch.floor_divide: "floordiv", torch.remainder: "mod", torch.pow: "pow",
    torch.minimum: "min", torch.maximum: "max", torch.min: "min", torch.max: "max",
    torch.logical_and: "and", torch.logical_or: "or", torch.logical_xor: "xor",
    torch.bitwise_and: "and", torch.bitwise_or: "or", torch.bitwise_xor: "xor",
    torch.eq: "eq", torch.ne: "ne", torch.lt: "lt", torch.le: "le", torch.gt: "gt", torch.ge: "ge",
    torch.Tensor.add: "add", torch.Tensor.sub: "sub", torch.Tensor.mul: "mul", torch.Tensor.div: "truediv",
    torch.Tensor.eq: "eq", torch.Tensor.ne: "ne", torch.Tensor.lt: "lt", torch.Tensor.le: "le",
    torch.Tensor.gt: "gt", torch.Tensor.ge: "ge", torch.Tensor.logical_and: "and", torch.Tensor.logical_or: "or",
    torch.Tensor.__and__: "and", torch.Tensor.__or__: "or", torch.Tensor.__xor__: "xor",
    torch.Tensor.__add__: "add", torch.Tensor.__radd__: "add", torch.Tensor.__sub__: "sub",
    torch.Tensor.__mul__: "mul", torch.Tensor.__rmul__: "mul", torch.Tensor.__truediv__: "truediv",
    torch.Tensor.__floordiv__: "floordiv", torch.Tensor.__mod__: "mod", torch.Tensor.remainder: "mod",
    torch.Tensor.minimum: "min", torch.Tensor.maximum: "max", torch.Tensor.__pow__: "pow",
}
# Tensor methods reached with the tensor on the left and a Symbol on the right: (op, swap).
_TORCH_REFLECTED = {
    torch.Tensor.__rsub__: "sub", torch.Tensor.__rtruediv__: "truediv", torch.Tensor.__rfloordiv__: "floordiv",
    torch.Tensor.__rmod__: "mod" if hasattr(torch.Tensor, "__rmod__") else None, torch.Tensor.__rpow__: "pow",
}


class Symbol:
    """A traced value. Supports the operators and torch functions listed in the module docstring."""

    __slots__ = ("node", "tracer")

    def __init__(self, node: Node, tracer: Tracer):
        self.node = node
        self.tracer = tracer

    def _wrap(self, node: Node) -> "Symbol":
        return Symbol(node, self.tracer)

    def _bin(self, op: str, other, swap: bool = False) -> "Symbol":
        other_node = self.tracer.lift(other)
        left, right = (other_node, self.node) if swap else (self.node, other_node)
        return self._wrap(_binary(op, left, right))

    # arithmetic
    def __add__(self, o): return self._bin("add", o)
    def __radd__(self, o): return self._bin("add", o, True)
    def __sub__(self, o): return self._bin("sub", o)
    def __rsub__(self, o): return self._bin("sub", o, True)
    def __mul__(self, o): return self._bin("mul", o)
    def __rmul__(self, o): return self._bin("mul", o, True)
    def __truediv__(self, o): return self._bin("truediv", o)
    def __rtruediv__(self, o): return self._bin("truediv", o, True)
    def __floordiv__(self, o): return self._bin("floordiv", o)
    def __rfloordiv__(self, o): return self._bin("floordiv", o, True)
    def __mod__(self, o): return self._bin("mod", o)
    def __rmod__(self, o): return self._bin("mod", o, True)
    def __pow__(self, o): return self._bin("pow", o)
    def __rpow__(self, o): return self._bin("pow", o, True)
    def __neg__(self): return self._wrap(_unary("neg", self.node))
    def __pos__(self): return self
    def __abs__(self): return self._wrap(_unary("abs", self.node))

    # logic and comparison
    def __and__(self, o): return self._bin("and", o)
    def __rand__(self, o): return self._bin("and", o, True)
    def __or__(self, o): return self._bin("or", o)
    def __ror__(self, o): return self._bin("or", o, True)
    def __xor__(self, o): return self._bin("xor", o)
    def __rxor__(self, o): return self._bin("xor", o, True)
    def __invert__(self):
        return self._wrap(_unary("not" if self.node.kind == "bool" else "invert", self.node))
    def __eq__(self, o): return self._bin("eq", o)  # type: ignore[override]
    def __ne__(self, o): return self._bin("ne", o)  # type: ignore[override]
    def __lt__(self, o): return self._bin("lt", o)
    def __le__(self, o): return self._bin("le", o)
    def __gt__(self, o): return self._bin("gt", o)
    def __ge__(self, o): return self._bin("ge", o)
    __hash__ = None  # type: ignore[assignment]

    def __bool__(self):
        raise UntraceableModError("Python control flow on a traced value (if / and / or / bool())",
                                  "use &, |, ~ and torch.where instead")

    def __index__(self):
        raise UntraceableModError("using a traced value as a Python int (indexing a list, range(), ...)")

    __int__ = __float__ = __index__

    # tensor-method spellings
    def abs(self): return self.__abs__()
    def logical_not(self): return self._wrap(_unary("not", self.node))
    def logical_and(self, o): return self._bin("and", o)
    def logical_or(self, o): return self._bin("or", o)
    def float(self): return self._wrap(_unary("to_float", self.node))
    def long(self): return self._wrap(_unary("to_int", self.node))
    int = long
    def bool(self): return self._bin("ne", 0)
    def exp(self): return self._wrap(_unary("exp", self.node))
    def exp2(self): return self._wrap(_unary("exp2", self.node))
    def tanh(self): return self._wrap(_unary("tanh", self.node))
    def log(self): return self._wrap(_unary("log", self.node))
    def sqrt(self): return self._wrap(_unary("sqrt", self.node))
    def sigmoid(self): return self._wrap(_unary("sigmoid", self.node))
    def floor(self): return self._wrap(_unary("floor", self.node))
    def ceil(self): return self._wrap(_unary("ceil", self.node))
    def clamp(self, min=None, max=None): return _clamp(self, min, max)
    def minimum(self, o): return self._bin("min", o)
    def maximum(self, o): return self._bin("max", o)

    @property
    def dtype(self) -> torch.dtype:
        # What the kernel computes in: float32 for scores, int64 for indices.
        return {"bool": torch.bool, "int": torch.int64}.get(self.node.kind, torch.float32)

    def to(self, dtype=None, *args, **kwargs):
        if isinstance(dtype, torch.dtype):
            kind = _kind_of_dtype(dtype)
            if kind == "bool":
                return self.bool()
            return self._wrap(_unary("to_float" if kind == "float" else "to_int", self.node))
        return self

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tracer = next(a.tracer for a in _flatten(args) if isinstance(a, Symbol))
        if func is torch.Tensor.__getitem__:
            return _load(tracer, args[0], args[1])
        if func in (torch.where, torch.Tensor.where):
            if func is torch.Tensor.where:  # tensor.where(cond, other)
                values, cond, other = args[0], args[1], args[2] if len(args) > 2 else kwargs["other"]
            else:
                if len(args) != 3:
                    raise UntraceableModError("torch.where with one argument")
                cond, values, other = args
            return _where(tracer, cond, values, other)
        if func in (torch.clamp, torch.clip, torch.Tensor.clamp):
            low = args[1] if len(args) > 1 else kwargs.get("min")
            high = args[2] if len(args) > 2 else kwargs.get("max")
            return _clamp(Symbol(tracer.lift(args[0]), tracer), low, high)
        if func in _TORCH_UNARY and len(args) == 1:
            return Symbol(_unary(_TORCH_UNARY[func], tracer.lift(args[0])), tracer)
        if func in _TORCH_BINARY and len(args) == 2:
            if func in (torch.div, torch.Tensor.div) and kwargs.get("rounding_mode") == "floor":
                return Symbol(_binary("floordiv", tracer.lift(args[0]), tracer.lift(args[1])), tracer)
            if kwargs.get("rounding_mode") is not None:
                raise UntraceableModError(f"division with rounding_mode={kwargs['rounding_mode']!r}")
            return Symbol(_binary(_TORCH_BINARY[func], tracer.lift(args[0]), tracer.lift(args[1])), tracer)
        if func in _TORCH_REFLECTED and _TORCH_REFLECTED[func] and len(args) == 2:
            return Symbol(_binary(_TORCH_REFLECTED[func], tracer.lift(args[1]), tracer.lift(args[0])), tracer)
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
        raise UntraceableModError(f"torch function {name}")


def _flatten(values):
    for value in values:
        if isinstance(value, (tuple, list)):
            yield from _flatten(value)
        else:
            yield value


def _load(tracer: Tracer, tensor, index) -> Symbol:
    if not isinstance(tensor, torch.Tensor):
        raise UntraceableModError(f"indexing a {type(tensor).__name__}")
    index = index if isinstance(index, tuple) else (index,)
    if len(index) != tensor.dim():
        raise UntraceableModError(
            "partial indexing of a captured tensor",
            f"tensor of shape {tuple(tensor.shape)} indexed with {len(index)} index(es); index every dimension")
    nodes = []
    for position in index:
        if isinstance(position, (slice, type(None), type(Ellipsis))):
            raise UntraceableModError("slicing a captured tensor", "index every dimension with a traced or int value")
        node = tracer.lift(position)
        if node.kind == "float":
            raise UntraceableModError("indexing a captured tensor with a float value")
        nodes.append(node)
    return Symbol(Node("load", (tracer.slot(tensor), *nodes), _kind_of_dtype(tensor.dtype)), tracer)


def _where(tracer: Tracer, cond, values, other) -> Symbol:
    cond_node, true_node, false_node = tracer.lift(cond), tracer.lift(values), tracer.lift(other)
    if cond_node.kind != "bool":
        cond_node = _binary("ne", cond_node, _const(0))
    kind = _promote(true_node.kind, false_node.kind)
    return Symbol(Node("where", (cond_node, true_node, false_node), kind), tracer)


def _clamp(symbol: Symbol, low, high) -> Symbol:
    result = symbol
    if low is not None:
        result = result._bin("max", low)
    if high is not None:
        result = result._bin("min", high)
    return result


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


# (kind, mod) -> (what its closure held, TracedMod): a mod is traced once per identity, not per call.
_TRACED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _closure_identity(fn: Callable) -> tuple:
    """Identities of the values ``fn`` closes over and its defaults: a rebound cell means a new trace."""
    cells = []
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            cells.append(id(cell.cell_contents))
        except ValueError:  # an empty cell
            cells.append(None)
    return tuple(cells) + tuple(id(d) for d in getattr(fn, "__defaults__", None) or ())


def _trace(fn: Callable, kind: str) -> TracedMod:
    prebuilt = getattr(fn, "traced_mod", None)  # a graph bound to new tensors (triton_attn.ops.BoundMod)
    if isinstance(prebuilt, TracedMod) and prebuilt.kind == kind:
        return prebuilt
    try:
        entry = _TRACED.get(fn)
    except TypeError:  # not weak-referenceable or not hashable: trace every time
        return _trace_now(fn, kind)
    identity = _closure_identity(fn)
    if entry is not None and kind in entry and entry[kind][0] == identity:
        return entry[kind][1]
    traced = _trace_now(fn, kind)
    _TRACED.setdefault(fn, {})[kind] = (identity, traced)
    return traced


def _trace_now(fn: Callable, kind: str) -> TracedMod:
    tracer = Tracer()
    symbols = [Symbol(Node("arg", (name,), "int"), tracer) for name in INDEX_ARGS]
    name = getattr(fn, "__name__", type(fn).__name__)
    if kind == "score":
        symbols.insert(0, Symbol(Node("arg", ("score",), "float"), tracer))
    try:
        result = fn(*symbols)
    except UntraceableModError:
        raise
    except Exception as error:  # anything else the mod tried that symbols cannot do
        raise UntraceableModError(f"{type(error).__name__} while tracing {name!r}", str(error)) from error
    if isinstance(result, (bool, int, float)):
        result = Symbol(_const(result), tracer)
    if not isinstance(result, Symbol):
        raise UntraceableModError(f"a {kind}_mod result of type {type(result).__name__}",
                                  "the result must be computed from the arguments")
    graph = result.node
    if kind == "mask" and graph.kind != "bool":
        raise TypeError(f"mask_mod {name!r} must return a bool, got a traced {graph.kind} value")
    if kind == "score" and graph.kind != "float":
        graph = _unary("to_float", graph)
    return TracedMod(kind, graph, tracer.captured, name)


def trace_mask_mod(mask_mod: Callable) -> TracedMod:
    """Trace ``mask_mod(b, h, q_idx, kv_idx) -> bool``; raises ``UntraceableModError``."""
    return _trace(mask_mod, "mask")


def trace_score_mod(score_mod: Callable) -> TracedMod:
    """Trace ``score_mod(score, b, h, q_idx, kv_idx) -> score``; raises ``UntraceableModError``."""
    return _trace(score_mod, "score")


_EVAL_BINARY = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "truediv": torch.true_divide,
    "floordiv": torch.floor_divide, "mod": torch.remainder, "pow": torch.pow,
    "min": torch.minimum, "max": torch.maximum, "and": torch.bitwise_and, "or": torch.bitwise_or,
    "xor": torch.bitwise_xor, "eq": torch.eq, "ne": torch.ne, "lt": torch.lt, "le": torch.le, "gt": torch.gt,
    "ge": torch.ge,
}
_EVAL_UNARY = {
    "neg": torch.neg, "abs": torch.abs, "not": torch.logical_not, "invert": torch.bitwise_not, "tanh": torch.tanh,
    "exp": torch.exp, "exp2": torch.exp2, "log": torch.log, "log2": torch.log2, "sqrt": torch.sqrt,
    "sigmoid": torch.sigmoid, "floor": torch.floor, "ceil": torch.ceil,
    "to_float": lambda t: t.float(), "to_int": lambda t: t.long(),
}


def evaluate(traced: TracedMod, args: Dict[str, torch.Tensor], captured: Optional[List[torch.Tensor]] = None):
    """Interpret the graph on tensors: ``args`` maps b/h/q_idx/kv_idx(/score) to broadcastable tensors.

    ``captured`` replaces the traced inputs (same order), as a kernel launch would.
    """
    inputs = traced.captured if captured is None else captured
    device = next(iter(args.values())).device
    memo: Dict[int, torch.Tensor] = {}

    def run(node: Node):
        if id(node) in memo:
            return memo[id(node)]
        if node.op == "arg":
            value = args[node.args[0]]
        elif node.op == "const":
            value = torch.tensor(node.args[0], device=device)
        elif node.op == "load":
            tensor = inputs[node.args[0]].to(device)
            value = tensor[tuple(run(i).long() for i in node.args[1:])] if len(node.args) > 1 else tensor
        elif node.op == "where":
            value = torch.where(run(node.args[0]), run(node.args[1]), run(node.args[2]))
        elif node.op in _EVAL_UNARY:
            value = _EVAL_UNARY[node.op](run(node.args[0]))
        else:
            left, right = run(node.args[0]), run(node.args[1])
            if node.op in ("and", "or", "xor") and (left.dtype == torch.bool) != (right.dtype == torch.bool):
                left, right = left.long(), right.long()
            value = _EVAL_BINARY[node.op](left, right)
        memo[id(node)] = value
        return value

    return run(traced.graph)
