"""Symbolic derivative of a traced score_mod graph with respect to its ``score`` argument.

The backward kernels need ``d score_mod(score, b, h, q_idx, kv_idx) / d score`` elementwise on
every score tile, to apply the chain rule ``dS = dZ * g'(S)`` (``Z = g(S)`` the modified score).
``score_derivative`` builds it as a new graph of the same ``Node`` vocabulary
(``masks/tracing.py``), so the expression emitter (``expressions.py``) turns it into Triton code exactly like
the score_mod itself, and shares common subexpressions with it when both go through one emitter
(softcap's ``tanh(score / c)`` is then computed once for the value and its derivative).

Rules (``d`` = derivative with respect to ``score``; ``None`` stands for a structural zero so
that the many index-only subgraphs, ALiBi slopes, bias-table loads, vanish without emitting code):

- ``score`` -> 1; other args, constants, captured-tensor loads -> 0 (a float cannot index, so a
  load never depends on ``score``); bool- and int-kind nodes, ``floor``/``ceil``/``to_int``,
  comparisons and float ``floordiv`` -> 0 (piecewise constant: derivative 0 almost everywhere).
- add/sub/neg/mul/truediv: the usual rules. ``abs``: ``where(x < 0, -dx, dx)``.
- tanh ``(1 - t^2) dx``, exp ``e^x dx``, exp2 ``2^x ln2 dx``, log ``dx / x``, log2 ``dx / (x ln2)``,
  sqrt ``dx / (2 sqrt x)``, sigmoid ``s (1 - s) dx``, sin ``cos x dx``, cos ``-sin x dx``,
  erf ``2 / sqrt(pi) exp(-x^2) dx``, log1p ``dx / (1 + x)``, expm1 ``(expm1 x + 1) dx``, tan
  ``(1 + t^2) dx``, atan ``dx / (1 + x^2)``, asin ``dx / sqrt((1 - x)(1 + x))``, acos the negative,
  sinh ``cosh x dx``, cosh ``sinh x dx``, asinh ``dx / sqrt(1 + x^2)``, acosh ``dx / sqrt((x - 1)(x + 1))``,
  atanh ``dx / ((1 - x)(1 + x))``, erfc ``-2 / sqrt(pi) exp(-x^2) dx``, atan2(y, x)
  ``(x dy - y dx) / (x^2 + y^2)``: each function's exact rule, whatever ``lowering.py`` computes its value
  with. (gelu, silu, softplus and the other composites are traced into these, so their derivatives follow.)
- pow: constant exponent ``n x^(n-1) dx``; positive constant base ``c^x ln(c) dx``; otherwise
  ``x^y (dy ln x + y dx / x)``.
- where(c, a, b) -> where(c, da, db); min/max pick the derivative of the chosen operand
  (ties go to the first operand, as torch.minimum/maximum's autograd splits them evenly -- a
  measure-zero set for real scores).
- float ``mod``: ``a - b floor(a / b)`` -> ``da - db floor(a / b)``.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

from ...masks.tracing import Node

LN2 = math.log(2.0)


class NotDifferentiableError(TypeError):
    """The score_mod uses an operation whose derivative is not implemented (names it)."""

    def __init__(self, operation: str):
        self.operation = operation
        super().__init__(f"cannot differentiate the score_mod through {operation}")


# -- small constructors with constant folding --------------------------------------------------

def _const(value: float) -> Node:
    return Node("const", (float(value),), "float")


def _is_const(node: Optional[Node], value: float) -> bool:
    return node is not None and node.op == "const" and float(node.args[0]) == value


def _add(a: Optional[Node], b: Optional[Node]) -> Optional[Node]:
    if a is None:
        return b
    if b is None:
        return a
    if a.op == "const" and b.op == "const":
        return _const(float(a.args[0]) + float(b.args[0]))
    return Node("add", (a, b), "float")


def _neg(a: Optional[Node]) -> Optional[Node]:
    if a is None:
        return None
    if a.op == "const":
        return _const(-float(a.args[0]))
    return Node("neg", (a,), "float")


def _sub(a: Optional[Node], b: Optional[Node]) -> Optional[Node]:
    if a is None or b is None or (a.op == "const" and b.op == "const"):
        return _add(a, _neg(b))
    return Node("sub", (a, b), "float")


def _mul(a: Optional[Node], b: Optional[Node]) -> Optional[Node]:
    """Product where either factor may be a structural zero (None)."""
    if a is None or b is None or _is_const(a, 0.0) or _is_const(b, 0.0):
        return None
    if _is_const(a, 1.0):
        return b if b.kind == "float" else Node("to_float", (b,), "float")
    if _is_const(b, 1.0):
        return a if a.kind == "float" else Node("to_float", (a,), "float")
    if a.op == "const" and b.op == "const":
        return _const(float(a.args[0]) * float(b.args[0]))
    return Node("mul", (a, b), "float")


def _div(a: Optional[Node], b: Node) -> Optional[Node]:
    if a is None:
        return None
    return Node("truediv", (a, b), "float")


def _unary(op: str, a: Node) -> Node:
    return Node(op, (a,), "float")


# -- the derivative ----------------------------------------------------------------------------

def _derive(node: Node, memo: Dict[int, Optional[Node]]) -> Optional[Node]:
    if id(node) in memo:
        return memo[id(node)]
    result = _derive_uncached(node, memo)
    memo[id(node)] = result
    return result


def _derive_uncached(node: Node, memo: Dict[int, Optional[Node]]) -> Optional[Node]:
    op, args = node.op, node.args
    if op == "arg":
        return _const(1.0) if args[0] == "score" else None
    if node.kind != "float" or op in ("const", "load", "floor", "ceil"):
        return None  # integer/bool values and piecewise-constant ops do not vary with the score
    if op == "to_float":
        return _derive(args[0], memo) if args[0].kind == "float" else None
    if op == "where":
        true_grad, false_grad = _derive(args[1], memo), _derive(args[2], memo)
        if true_grad is None and false_grad is None:
            return None
        return Node("where", (args[0], true_grad or _const(0.0), false_grad or _const(0.0)), "float")

    d = [_derive(a, memo) for a in args]
    if op == "add":
        return _add(d[0], d[1])
    if op == "sub":
        return _sub(d[0], d[1])
    if op == "neg":
        return _neg(d[0])
    if all(g is None for g in d):
        return None
    x = args[0]
    if op == "mul":
        return _add(_mul(d[0], args[1]), _mul(x, d[1]))
    if op == "truediv":
        # d(a / b) = da / b - a db / b^2
        quotient_grad = _div(d[0], args[1])
        if d[1] is None:
            return quotient_grad
        return _sub(quotient_grad, _div(_mul(node, d[1]), args[1]))
    if op == "abs":
        return Node("where", (Node("lt", (x, _const(0.0)), "bool"), _neg(d[0]), d[0]), "float")
    if op == "tanh":
        return _mul(_sub(_const(1.0), _mul(node, node)), d[0])
    if op == "exp":
        return _mul(node, d[0])
    if op == "exp2":
        return _mul(_mul(node, _const(LN2)), d[0])
    if op == "log":
        return _div(d[0], x)
    if op == "log2":
        return _div(d[0], _mul(x, _const(LN2)))
    if op == "sqrt":
        return _div(d[0], _mul(_const(2.0), node))
    if op == "sigmoid":
        return _mul(_mul(node, _sub(_const(1.0), node)), d[0])
    if op == "sin":
        return _mul(_unary("cos", x), d[0])
    if op == "cos":
        return _mul(_neg(_unary("sin", x)), d[0])
    if op == "erf":
        gaussian = _unary("exp", _neg(_mul(x, x)))
        return _mul(_mul(_const(2.0 / math.sqrt(math.pi)), gaussian), d[0])
    if op == "log1p":
        return _div(d[0], _add(_const(1.0), x))
    if op == "expm1":
        return _mul(_add(node, _const(1.0)), d[0])
    if op in _INVERSE_AND_HYPERBOLIC:
        return _mul(_INVERSE_AND_HYPERBOLIC[op](node, x), d[0])
    if op == "atan2":
        y, x = args  # d atan2(y, x) = (x dy - y dx) / (x^2 + y^2)
        numerator = _sub(_mul(x, d[0]), _mul(y, d[1]))
        return _div(numerator, _add(_mul(x, x), _mul(y, y))) if numerator is not None else None
    if op in ("min", "max"):
        comparison = "le" if op == "min" else "ge"
        pick_first = Node(comparison, (args[0], args[1]), "bool")
        return Node("where", (pick_first, d[0] or _const(0.0), d[1] or _const(0.0)), "float")
    if op == "pow":
        return _pow_grad(node, d[0], d[1])
    if op == "mod":
        # float a % b = a - b * floor(a / b); floor(a / b) is piecewise constant.
        quotient = Node("floor", (Node("truediv", (args[0], args[1]), "float"),), "float")
        return _sub(d[0], _mul(d[1], quotient))
    if op == "floordiv":
        return None
    raise NotDifferentiableError(f"the operation {op!r}")


def _one_minus_square(x: Node) -> Node:
    """(1 - x)(1 + x): 1 - x^2 without cancellation near |x| = 1."""
    return Node("mul", (_sub(_const(1.0), x), _add(_const(1.0), x)), "float")


# op -> (node, operand) -> d node / d operand, for the unary functions of ``lowering.py``.
_INVERSE_AND_HYPERBOLIC = {
    "tan": lambda node, x: _add(_const(1.0), _mul(node, node)),
    "atan": lambda node, x: _div(_const(1.0), _add(_const(1.0), _mul(x, x))),
    "asin": lambda node, x: _div(_const(1.0), _unary("sqrt", _one_minus_square(x))),
    "acos": lambda node, x: _div(_const(-1.0), _unary("sqrt", _one_minus_square(x))),
    "sinh": lambda node, x: _unary("cosh", x),
    "cosh": lambda node, x: _unary("sinh", x),
    "asinh": lambda node, x: _div(_const(1.0), _unary("sqrt", _add(_const(1.0), _mul(x, x)))),
    "acosh": lambda node, x: _div(_const(1.0), _unary("sqrt", _mul(_sub(x, _const(1.0)), _add(x, _const(1.0))))),
    "atanh": lambda node, x: _div(_const(1.0), _one_minus_square(x)),
    "erfc": lambda node, x: _mul(_const(-2.0 / math.sqrt(math.pi)), _unary("exp", _neg(_mul(x, x)))),
}


def _pow_grad(node: Node, base_grad: Optional[Node], exponent_grad: Optional[Node]) -> Optional[Node]:
    base, exponent = node.args
    if exponent_grad is None:
        if exponent.op == "const":
            n = float(exponent.args[0])
            if n == 0.0:
                return None
            power = _const(1.0) if n == 1.0 else Node("pow", (base, _const(n - 1.0)), "float")
            return _mul(_mul(_const(n), power), base_grad)
        # x ** y with y independent of the score: y * x ** (y - 1) * dx
        power = Node("pow", (base, _sub(exponent, _const(1.0))), "float")
        return _mul(_mul(exponent, power), base_grad)
    if base_grad is None and base.op == "const" and float(base.args[0]) > 0:
        return _mul(_mul(node, _const(math.log(float(base.args[0])))), exponent_grad)
    # General case: d(x^y) = x^y (dy ln x + y dx / x).
    log_term = _mul(exponent_grad, _unary("log", base))
    base_term = _div(_mul(exponent, base_grad), base) if base_grad is not None else None
    return _mul(node, _add(log_term, base_term))


def score_derivative(graph: Node) -> Node:
    """``d graph / d score`` as a float graph (a ``const`` node when it does not vary).

    ``graph``: a traced score_mod's ``TracedMod.graph``. The result reuses ``graph``'s nodes
    (same captured-tensor slots), so it is emitted with the same kernel arguments. Raises
    ``NotDifferentiableError`` for an operation without a rule.
    """
    result = _derive(graph, {})
    return _const(0.0) if result is None else result


def is_constant(node: Node) -> bool:
    """Whether ``node`` is a float constant (then the kernel multiplies by a literal, or skips it)."""
    return node.op == "const"
