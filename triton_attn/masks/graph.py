"""The expression graph a traced mod becomes: ``Node``, its constructors, and a tensor interpreter.

Node ops (``Node.op`` and ``Node.args``):

- leaves: ``("arg", name)`` with name in b, h, q_idx, kv_idx, score; ``("const", value)`` with a
  Python bool/int/float; ``("load", slot, *index_nodes)``: captured input ``slot`` indexed by one
  node per dimension (0-d tensors take none).
- unary: neg, abs, not (logical), invert (bitwise on ints), tanh, exp, exp2, log, log2, sqrt,
  sigmoid, sin, cos, erf, log1p, expm1, floor, ceil, to_float, to_int; tan, atan, asin, acos, sinh,
  cosh, asinh, acosh, atanh, erfc (float); signbit (bool: the sign bit, so -0.0 counts as negative)
- binary: add, sub, mul, truediv, floordiv, mod, pow, min, max, and, or, xor, lshift, rshift,
  eq, ne, lt, le, gt, ge, atan2 (float)
- ternary: where(cond, if_true, if_false)

Every node has a ``kind``: "bool", "int" or "float". Integer floordiv/mod follow Python (floor)
semantics, as torch does; and/or/xor are logical on bools and bitwise on ints. Everything else a
mod may use (round, trunc, fmod, sign, gelu, softplus, isin, sums over a captured dim, ...) is
built from these by the tracer, so each consumer (Triton emitter, interval analysis, derivative,
``evaluate`` below) handles a small fixed vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Dict, List

import torch


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


def kind_of_dtype(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    return "float" if dtype.is_floating_point else "int"


# What the kernel computes each kind in: float32 for scores, int64 for indices.
DTYPE_OF_KIND = {"bool": torch.bool, "int": torch.int64, "float": torch.float32}

# A traced value of shape S is a row-major array of prod(S) nodes (``tracing.Symbol``); reductions over it
# unroll into the graph, so arrays are kept small: this is the largest one (a whole small captured tensor, a
# partly indexed one, a constant array) a mod may compute with.
MAX_ELEMENTS = 256


def flat_positions(shape: Sequence[int]) -> torch.Tensor:
    """The position of each element in a row-major array of ``shape`` (int64 tensor of that shape), so that
    torch's own indexing, broadcasting and permuting tell which node of an array goes where."""
    return torch.arange(math.prod(shape), dtype=torch.int64).reshape(tuple(shape))


def const(value) -> Node:
    if isinstance(value, bool):
        return Node("const", (value,), "bool")
    if isinstance(value, int):
        return Node("const", (value,), "int")
    if isinstance(value, float):
        return Node("const", (value,), "float")
    raise UntraceableModError(f"a constant of type {type(value).__name__}", repr(value))


def promote(*kinds: str) -> str:
    if "float" in kinds:
        return "float"
    if "int" in kinds:
        return "int"
    return "bool"


COMPARE = {"eq", "ne", "lt", "le", "gt", "ge"}
LOGIC = {"and", "or", "xor"}
SHIFTS = {"lshift", "rshift"}
FLOAT_UNARY = {"tanh", "exp", "exp2", "log", "log2", "sqrt", "sigmoid", "sin", "cos", "erf", "log1p", "expm1",
               "tan", "atan", "asin", "acos", "sinh", "cosh", "asinh", "acosh", "atanh", "erfc"}
FLOAT_BINARY = {"atan2"}


def _identity_of(op: str, node: Node) -> bool:
    """``node`` is the bool constant that ``op`` ignores (True for and, False for or)."""
    return node.op == "const" and node.kind == "bool" and node.args[0] == (op == "and")


def binary(op: str, left: Node, right: Node) -> Node:
    if op in ("and", "or"):
        # The start value of torch's and_masks / or_masks (b.new_ones(()) & ...) adds no node, so
        # combinators cost the interval compiler what the same predicate written with & / | costs.
        if _identity_of(op, left) and right.kind == "bool":
            return right
        if _identity_of(op, right) and left.kind == "bool":
            return left
    if op in COMPARE:
        kind = "bool"
    elif op in LOGIC or op in SHIFTS:
        kind = promote(left.kind, right.kind)
        if kind == "float":
            raise UntraceableModError(f"bitwise {op} on floating-point values")
        if op in SHIFTS:
            kind = "int"
    elif op == "truediv" or op in FLOAT_BINARY or op == "pow" and (left.kind == "float" or right.kind == "float"):
        kind = "float"
    else:
        kind = promote(left.kind, right.kind)
        if kind == "bool" and op in {"add", "sub", "mul", "floordiv", "mod", "pow"}:
            kind = "int"
    return Node(op, (left, right), kind)


def unary(op: str, operand: Node) -> Node:
    if op in FLOAT_UNARY or op == "to_float":
        return Node(op, (operand,), "float")
    if op == "signbit" and operand.op == "const":
        return const(math.copysign(1.0, float(operand.args[0])) < 0)
    if op in ("not", "signbit"):
        return Node(op, (operand,), "bool")
    if op == "to_int":
        return Node(op, (operand,), "int")
    if op in ("floor", "ceil"):
        return Node(op, (operand,), operand.kind if operand.kind != "bool" else "int")
    if op == "neg" and operand.kind == "bool":
        raise UntraceableModError("negation of a bool value")
    return Node(op, (operand,), operand.kind)


def where(cond: Node, if_true: Node, if_false: Node) -> Node:
    if cond.kind != "bool":
        cond = binary("ne", cond, const(0))
    return Node("where", (cond, if_true, if_false), promote(if_true.kind, if_false.kind))


_EVAL_BINARY = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "truediv": torch.true_divide,
    "floordiv": torch.floor_divide, "mod": torch.remainder, "pow": torch.pow,
    "min": torch.minimum, "max": torch.maximum, "and": torch.bitwise_and, "or": torch.bitwise_or,
    "xor": torch.bitwise_xor, "lshift": torch.bitwise_left_shift, "rshift": torch.bitwise_right_shift,
    "eq": torch.eq, "ne": torch.ne, "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge,
    "atan2": lambda a, b: torch.atan2(a.float() if not a.is_floating_point() else a,
                                      b.float() if not b.is_floating_point() else b),
}
_EVAL_UNARY = {
    "neg": torch.neg, "abs": torch.abs, "not": torch.logical_not, "invert": torch.bitwise_not, "tanh": torch.tanh,
    "exp": torch.exp, "exp2": torch.exp2, "log": torch.log, "log2": torch.log2, "sqrt": torch.sqrt,
    "sigmoid": torch.sigmoid, "sin": torch.sin, "cos": torch.cos, "erf": torch.erf, "log1p": torch.log1p,
    "expm1": torch.expm1, "floor": torch.floor, "ceil": torch.ceil, "tan": torch.tan, "atan": torch.atan,
    "asin": torch.asin, "acos": torch.acos, "sinh": torch.sinh, "cosh": torch.cosh, "asinh": torch.asinh,
    "acosh": torch.acosh, "atanh": torch.atanh, "erfc": torch.erfc,
    "signbit": lambda t: torch.signbit(t) if t.dtype != torch.bool else torch.zeros_like(t),
    "to_float": lambda t: t.float(), "to_int": lambda t: t.long(),
}


def evaluate_graph(graph: Node, inputs: List[torch.Tensor], args: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Interpret ``graph`` on tensors: ``args`` maps b/h/q_idx/kv_idx(/score) to broadcastable tensors,
    ``inputs`` are the captured tensors by slot."""
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

    return run(graph)


def graph_nodes(graph: Node) -> List[Node]:
    """Every node once, children before parents."""
    order, seen = [], set()
    stack = [(graph, False)]
    while stack:
        node, expanded = stack.pop()
        if id(node) in seen:
            continue
        if expanded:
            seen.add(id(node))
            order.append(node)
            continue
        stack.append((node, True))
        stack.extend((a, False) for a in node.args if isinstance(a, Node) and id(a) not in seen)
    return order

