"""Float functions Triton's core has no instruction for, lowered to ones it has.

``tl`` offers exp, exp2, log, log2, sqrt, sin, cos, erf and the arithmetic; its libdevice functions
(atan, asinh, ...) do not run under the interpreter, and the kernels keep no interpreter-only paths.
So ``tan``, ``atan``, ``asin``, ``acos``, ``sinh``, ``cosh``, ``asinh``, ``acosh``, ``atanh``,
``erfc`` and ``atan2`` nodes are emitted by building their value from the graph's basic nodes
(``LOWERINGS[op](*operands) -> Node``), which the emitter then emits like any other graph. Only the
*value* is lowered: the derivative (``derivative.py``) uses each function's exact rule, and the tensor
interpreter (``masks/graph.evaluate_graph``) calls torch's own function.

Accuracy (float32, the kernels' score arithmetic): each lowering is within a few ulp of the correctly
rounded value over the whole line, including the signs of zeros, the infinities and NaN as torch gives
them (``tests/masks/test_pointwise_ops.py`` compares them against torch in float64):

- atan: argument reduction to ``|t| <= tan(pi/8)`` (``pi/2 - atan(1/x)``, ``pi/4 + atan((x-1)/(x+1))``)
  and the classic odd minimax polynomial of degree 9 (relative error ~1e-7).
- asin ``atan(x / sqrt((1 - x)(1 + x)))``, acos ``2 atan(sqrt((1 - x) / (1 + x)))``: no cancellation
  near +-1. atan2 from ``atan(min / max)`` of the magnitudes and the quadrant (by sign bits).
- sinh from ``expm1`` (``(u + u / (u + 1)) / 2``, no cancellation near 0), cosh from ``exp``; both
  ``exp(|x| - ln 2)`` past 20, so they overflow where the true value does, not earlier.
- asinh ``log1p(a + a^2 / (1 + sqrt(1 + a^2)))``, acosh ``log1p(t + sqrt(t (t + 2)))`` (``t = x - 1``),
  both ``log(a) + ln 2`` past 4096; atanh ``log1p(2a / (1 - a)) / 2``.
- erfc: ``t exp(-z^2 + P(t))``, ``t = 1 / (1 + z / 2)``, a Chebyshev fit with fractional error below
  1.2e-7 everywhere (so the tail keeps its relative accuracy, unlike ``1 - erf``).
"""

from __future__ import annotations

import math
from typing import Callable, Dict

from ...masks.graph import Node, binary, const, unary, where

LN2 = math.log(2.0)
# Past these magnitudes the leading term is the function to float32 precision (and x*x would overflow).
_EXP_TAIL = 20.0
_LOG_TAIL = 4096.0
_ATAN_POLY = (8.05374449538e-2, -1.38776856032e-1, 1.99777106478e-1, -3.33329491539e-1)
_ERFC_POLY = (0.17087277, -0.82215223, 1.48851587, -1.13520398, 0.27886807, -0.18628806, 0.09678418, 0.37409196,
              1.00002368, -1.26551223)


def _c(value: float) -> Node:
    return const(float(value))


def _float(x: Node) -> Node:
    return x if x.kind == "float" else unary("to_float", x)


def _add(a, b):
    return binary("add", a, b)


def _sub(a, b):
    return binary("sub", a, b)


def _mul(a, b):
    return binary("mul", a, b)


def _div(a, b):
    return binary("truediv", a, b)


def _signed_like(magnitude: Node, x: Node) -> Node:
    """``magnitude`` with the sign (bit) of ``x``: odd functions computed on ``|x|``."""
    return where(unary("signbit", x), unary("neg", magnitude), magnitude)


def _horner(coefficients, t: Node) -> Node:
    result = _c(coefficients[0])
    for coefficient in coefficients[1:]:
        result = _add(_mul(result, t), _c(coefficient))
    return result


def atan_of_magnitude(a: Node) -> Node:
    """atan(a) for a >= 0 (or +inf, NaN)."""
    big = binary("gt", a, _c(2.414213562373095))      # tan(3 pi / 8)
    middle = binary("gt", a, _c(0.41421356237309503))  # tan(pi / 8)
    reduced = where(big, _div(_c(-1.0), a), where(middle, _div(_sub(a, _c(1.0)), _add(a, _c(1.0))), a))
    base = where(big, _c(math.pi / 2), where(middle, _c(math.pi / 4), _c(0.0)))
    square = _mul(reduced, reduced)
    series = _add(_mul(_mul(_horner(_ATAN_POLY, square), square), reduced), reduced)
    return _add(base, series)


def lower_atan(x: Node) -> Node:
    x = _float(x)
    return _signed_like(atan_of_magnitude(unary("abs", x)), x)


def lower_asin(x: Node) -> Node:
    x = _float(x)
    a = unary("abs", x)
    ratio = _div(a, unary("sqrt", _mul(_sub(_c(1.0), a), _add(_c(1.0), a))))
    return _signed_like(atan_of_magnitude(ratio), x)


def lower_acos(x: Node) -> Node:
    x = _float(x)
    return _mul(_c(2.0), atan_of_magnitude(unary("sqrt", _div(_sub(_c(1.0), x), _add(_c(1.0), x)))))


def lower_atan2(y: Node, x: Node) -> Node:
    y, x = _float(y), _float(x)
    ay, ax = unary("abs", y), unary("abs", x)
    larger, smaller = binary("max", ax, ay), binary("min", ax, ay)
    ratio = where(binary("eq", larger, _c(0.0)), _c(0.0),
                  where(binary("eq", smaller, _c(math.inf)), _c(1.0), _div(smaller, larger)))  # inf/inf: pi/4
    angle = atan_of_magnitude(ratio)
    angle = where(binary("gt", ay, ax), _sub(_c(math.pi / 2), angle), angle)
    angle = where(unary("signbit", x), _sub(_c(math.pi), angle), angle)
    signed = _signed_like(angle, y)
    either_nan = binary("or", binary("ne", x, x), binary("ne", y, y))
    return where(either_nan, _c(math.nan), signed)


def lower_tan(x: Node) -> Node:
    x = _float(x)
    return _div(unary("sin", x), unary("cos", x))


def lower_sinh(x: Node) -> Node:
    x = _float(x)
    a = unary("abs", x)
    u = unary("expm1", a)
    near = _mul(_c(0.5), _add(u, _div(u, _add(u, _c(1.0)))))
    far = unary("exp", _sub(a, _c(LN2)))
    return _signed_like(where(binary("gt", a, _c(_EXP_TAIL)), far, near), x)


def lower_cosh(x: Node) -> Node:
    a = unary("abs", _float(x))
    e = unary("exp", a)
    near = _mul(_c(0.5), _add(e, _div(_c(1.0), e)))
    return where(binary("gt", a, _c(_EXP_TAIL)), unary("exp", _sub(a, _c(LN2))), near)


def lower_asinh(x: Node) -> Node:
    x = _float(x)
    a = unary("abs", x)
    square = _mul(a, a)
    near = unary("log1p", _add(a, _div(square, _add(_c(1.0), unary("sqrt", _add(_c(1.0), square))))))
    far = _add(unary("log", a), _c(LN2))
    return _signed_like(where(binary("gt", a, _c(_LOG_TAIL)), far, near), x)


def lower_acosh(x: Node) -> Node:
    x = _float(x)
    t = _sub(x, _c(1.0))
    near = unary("log1p", _add(t, unary("sqrt", _mul(t, _add(t, _c(2.0))))))
    near = where(binary("lt", x, _c(1.0)), _c(math.nan), near)  # (t (t + 2) overflows to +inf past -2**64)
    return where(binary("gt", x, _c(_LOG_TAIL)), _add(unary("log", x), _c(LN2)), near)


def lower_atanh(x: Node) -> Node:
    x = _float(x)
    a = unary("abs", x)
    value = _mul(_c(0.5), unary("log1p", _div(_mul(_c(2.0), a), _sub(_c(1.0), a))))
    return _signed_like(where(binary("eq", a, _c(1.0)), _c(math.inf), value), x)


def lower_erfc(x: Node) -> Node:
    x = _float(x)
    z = unary("abs", x)
    t = _div(_c(1.0), _add(_c(1.0), _mul(_c(0.5), z)))
    tail = _mul(t, unary("exp", _add(unary("neg", _mul(z, z)), _horner(_ERFC_POLY, t))))
    return where(binary("lt", x, _c(0.0)), _sub(_c(2.0), tail), tail)


LOWERINGS: Dict[str, Callable[..., Node]] = {
    "tan": lower_tan, "atan": lower_atan, "asin": lower_asin, "acos": lower_acos, "sinh": lower_sinh,
    "cosh": lower_cosh, "asinh": lower_asinh, "acosh": lower_acosh, "atanh": lower_atanh, "erfc": lower_erfc,
    "atan2": lower_atan2,
}
