"""Operations a mod may use that the graph spells with its basic nodes (``graph.py``).

torch's rounding (half to even), truncation, C remainder, sign, narrowing integer casts, gelu (exact
and tanh), softplus and relu, as ``Node`` builders. Building them from the small vocabulary keeps
every consumer (Triton emitter, interval analysis, derivative, tensor interpreter) unchanged, and
gives their derivatives and interval bounds for free.
"""

from __future__ import annotations

import math
from typing import Callable, List

import torch

from .graph import Node, UntraceableModError, binary, const, kind_of_dtype, promote, unary, where


def tree_reduce(combine: Callable[[Node, Node], Node], nodes: List[Node]) -> Node:
    while len(nodes) > 1:
        nodes = [combine(nodes[i], nodes[i + 1]) if i + 1 < len(nodes) else nodes[i] for i in range(0, len(nodes), 2)]
    return nodes[0]


def as_bool(node: Node) -> Node:
    return node if node.kind == "bool" else binary("ne", node, const(0))


def as_number(node: Node) -> Node:
    return unary("to_int", node) if node.kind == "bool" else node


def trunc_node(x: Node) -> Node:
    if x.kind != "float":
        return as_number(x)
    return where(binary("lt", x, const(0.0)), unary("ceil", x), unary("floor", x))


def round_node(x: Node) -> Node:
    """Round half to even, as torch.round."""
    if x.kind != "float":
        return as_number(x)
    nearest = unary("floor", binary("add", x, const(0.5)))
    tie_to_odd = binary("and", binary("eq", binary("sub", nearest, x), const(0.5)),
                        binary("ne", binary("mod", nearest, const(2.0)), const(0.0)))
    return where(tie_to_odd, binary("sub", nearest, const(1.0)), nearest)


def sign_node(x: Node) -> Node:
    if x.kind == "bool":
        return x
    one, zero = (const(1.0), const(0.0)) if x.kind == "float" else (const(1), const(0))
    minus = const(-1.0) if x.kind == "float" else const(-1)
    return where(binary("gt", x, zero), one, where(binary("lt", x, zero), minus, zero))


def _signs_differ_inexact(a: Node, b: Node) -> Node:
    return binary("and", binary("ne", binary("mod", a, b), const(0)),
                  binary("ne", binary("lt", a, const(0)), binary("lt", b, const(0))))


def fmod_node(a: Node, b: Node) -> Node:
    """C remainder (sign of the dividend), as torch.fmod."""
    if promote(a.kind, b.kind) == "float":
        return binary("sub", a, binary("mul", b, trunc_node(binary("truediv", a, b))))
    remainder = binary("mod", a, b)
    return where(_signs_differ_inexact(a, b), binary("sub", remainder, b), remainder)


def trunc_div_node(a: Node, b: Node) -> Node:
    if promote(a.kind, b.kind) == "float":
        return trunc_node(binary("truediv", a, b))
    quotient = binary("floordiv", a, b)
    return where(_signs_differ_inexact(a, b), binary("add", quotient, const(1)), quotient)


def to_dtype_node(x: Node, dtype: torch.dtype) -> Node:
    kind = kind_of_dtype(dtype)
    if kind == "bool":
        return as_bool(x)
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


def gelu_node(x: Node, approximate: str = "none") -> Node:
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


def softplus_node(x: Node, beta=1.0, threshold=20.0) -> Node:
    scaled = binary("mul", x, const(float(beta)))
    smooth = binary("truediv", unary("log1p", unary("exp", scaled)), const(float(beta)))
    return where(binary("gt", scaled, const(float(threshold))), unary("to_float", x), smooth)


def relu_node(x: Node) -> Node:
    return where(binary("lt", x, const(0)), const(0.0) if x.kind == "float" else const(0), x)
