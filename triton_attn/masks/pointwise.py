"""torch's elementwise functions in traced mods: which are traced, how, and which are refused.

A score_mod (or mask_mod) may call any of torch's pointwise functions a FlexAttention user writes. Each
one either traces into the graph -- as a node of its own (``graph.py``), or built from other nodes here,
so that the Triton emitter, the derivative, interval analysis and the tensor interpreter follow -- or is
refused: the tracer raises ``UntraceableModError`` naming it (``attention`` then runs the score_mod on the
PyTorch backend, exact, with a warning; a mask_mod becomes a per-block bitmask). Nothing is traced
approximately or silently wrong. The decisions (``torch.x`` also means ``Tensor.x`` and ``torch.special.x``
where those exist; F = ``torch.nn.functional``):

=====================================================  =========  ================================================
function                                               decision   how (value; the derivative follows the nodes)
=====================================================  =========  ================================================
abs, neg/negative, positive, square, reciprocal,       traced     basic nodes (``torch_ops``)
rsqrt, sqrt, exp, exp2, expm1, log, log2, log10,
log1p, sigmoid/expit, sin, cos, tanh, erf
tan, atan/arctan, asin/arcsin, acos/arccos, sinh,      traced     nodes of their own, values lowered to basic
cosh, asinh/arcsinh, acosh/arccosh, atanh/arctanh,                nodes for Triton (``kernels/jit/lowering.py``),
erfc, atan2/arctan2                                               exact derivatives (``derivative.py``)
floor, ceil, round (half to even), trunc/fix, frac,    traced     floor/ceil nodes and composites; derivative 0
sign/sgn, signbit, heaviside                                      (frac: 1) almost everywhere
round(decimals != 0)                                   refused    (a power-of-ten rescale torch rounds twice)
clamp/clip, clamp_min/max, minimum/maximum, max/min    traced     min/max nodes (NaN propagates as in torch)
of two values, fmin/fmax                                          fmin/fmax: the other operand where one is NaN
fmod, remainder, floor_divide, div(rounding_mode)      traced     C / Python remainder composites
pow, float_power                                       traced     pow node (constant exponent or positive base
                                                                  in the kernels; others fall back)
hypot, logaddexp, logaddexp2, copysign, lerp, xlogy,   traced     composites below (overflow-safe forms)
sinc, deg2rad, rad2deg, logit, ndtr, nan_to_num
isnan, isinf, isposinf, isneginf, isfinite             traced     comparisons (bool)
where, relu, relu6, gelu (both), silu, softplus,       traced     composites (``composites.py`` / below)
mish, elu, selu, celu, leaky_relu, hardtanh,
hardsigmoid, hardswish, softsign, logsigmoid,
tanhshrink, softshrink, hardshrink, threshold
erfinv, lgamma, digamma, polygamma, mvlgamma, i0,      refused    no accurate form from the basic nodes (by
i0e, i1, i1e, log_ndtr, erfcx, bessel/gamma families,             default: any function not traced is refused
igamma(c), zeta, frexp, ldexp, nextafter, logcumsumexp            with its name)
=====================================================  =========  ================================================
"""

from __future__ import annotations

import math
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from .composites import relu_node, round_node, softplus_node, trunc_node
from .graph import Node, UntraceableModError, binary, const, promote, unary, where

LN2 = math.log(2.0)
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _f(x: Node) -> Node:
    return x if x.kind == "float" else unary("to_float", x)


def _c(value) -> Node:
    return const(float(value))


def isnan_node(x: Node) -> Node:
    return binary("ne", x, x) if x.kind == "float" else const(False)


def isinf_node(x: Node) -> Node:
    return binary("eq", unary("abs", x), _c(math.inf)) if x.kind == "float" else const(False)


def isfinite_node(x: Node) -> Node:
    if x.kind != "float":
        return const(True)
    return binary("and", binary("eq", x, x), binary("ne", unary("abs", x), _c(math.inf)))


def nan_aware_min_max(op: str) -> Callable[[Node, Node], Node]:
    """fmin / fmax: the other operand where one is NaN (NaN only where both are)."""
    def build(a: Node, b: Node) -> Node:
        chosen = binary(op, a, b)
        if promote(a.kind, b.kind) != "float":
            return chosen
        return where(isnan_node(a), b, where(isnan_node(b), a, chosen))
    return build


def copysign_node(a: Node, b: Node) -> Node:
    magnitude = unary("abs", _f(a))
    return where(unary("signbit", b), unary("neg", magnitude), magnitude)


def hypot_node(a: Node, b: Node) -> Node:
    """sqrt(a^2 + b^2) as ``larger * sqrt(1 + (smaller / larger)^2)``: no overflow or underflow of the squares."""
    a, b = unary("abs", _f(a)), unary("abs", _f(b))
    larger, smaller = binary("max", a, b), binary("min", a, b)
    ratio = binary("truediv", smaller, where(binary("eq", larger, _c(0.0)), _c(1.0), larger))
    value = binary("mul", larger, unary("sqrt", binary("add", _c(1.0), binary("mul", ratio, ratio))))
    return where(binary("eq", larger, _c(math.inf)), _c(math.inf), value)  # hypot(inf, nan) is inf


def logaddexp_node(a: Node, b: Node, base2: bool = False) -> Node:
    """log(e^a + e^b) = max + log1p(e^-|a - b|) (base 2 for logaddexp2); equal operands (infinities
    included) give ``a + log 2`` (``a + 1``) without computing ``inf - inf``."""
    a, b = _f(a), _f(b)
    larger, gap = binary("max", a, b), unary("neg", unary("abs", binary("sub", a, b)))
    if base2:
        tail = binary("truediv", unary("log1p", unary("exp2", gap)), _c(LN2))
        same = binary("add", a, _c(1.0))
    else:
        tail, same = unary("log1p", unary("exp", gap)), binary("add", a, _c(LN2))
    return where(binary("eq", a, b), same, binary("add", larger, tail))


def lerp_node(start: Node, end: Node, weight: Node) -> Node:
    """torch's lerp: ``start + w (end - start)`` below w = 0.5, ``end - (end - start)(1 - w)`` from there."""
    difference = binary("sub", end, start)
    low = binary("add", start, binary("mul", weight, difference))
    high = binary("sub", end, binary("mul", difference, binary("sub", _c(1.0), weight)))
    return where(binary("lt", unary("abs", _f(weight)), _c(0.5)), low, high)


def xlogy_node(x: Node, y: Node) -> Node:
    product = binary("mul", _f(x), unary("log", _f(y)))
    return where(binary("and", binary("eq", x, const(0)), unary("not", isnan_node(y))), _c(0.0), product)


def sinc_node(x: Node) -> Node:
    """sin(pi x) / (pi x); 0 past 2**24 (every float32 there is an integer, and pi x may overflow), NaN at inf."""
    scaled = binary("mul", _f(x), _c(math.pi))
    ratio = binary("truediv", unary("sin", scaled), scaled)
    magnitude = unary("abs", _f(x))
    ratio = where(binary("gt", magnitude, _c(2.0 ** 24)), where(binary("eq", magnitude, _c(math.inf)), _c(math.nan),
                                                                _c(0.0)), ratio)
    return where(binary("eq", x, const(0)), _c(1.0), ratio)


def heaviside_node(x: Node, values: Node) -> Node:
    zero, one = (_c(0.0), _c(1.0)) if promote(x.kind, values.kind) == "float" else (const(0), const(1))
    return where(binary("eq", x, const(0)), values, where(binary("gt", x, const(0)), one, zero))


def nan_to_num_node(x: Node, nan, posinf, neginf) -> Node:
    if x.kind != "float":
        return x
    posinf = FLOAT32_MAX if posinf is None else posinf  # the kernels compute scores in float32
    neginf = -FLOAT32_MAX if neginf is None else neginf
    replaced = where(binary("eq", x, _c(math.inf)), _c(posinf), where(binary("eq", x, _c(-math.inf)), _c(neginf), x))
    return where(isnan_node(x), _c(0.0 if nan is None else nan), replaced)


def elu_node(x: Node, alpha: float, scale: float = 1.0, input_scale: float = 1.0) -> Node:
    x = _f(x)
    negative = binary("mul", _c(alpha), unary("expm1", binary("mul", x, _c(input_scale))))
    return binary("mul", _c(scale), where(binary("gt", x, _c(0.0)), x, negative))


def clamp_node(x: Node, low: float, high: float) -> Node:
    return binary("min", binary("max", x, _c(low)), _c(high))


def hardsigmoid_node(x: Node) -> Node:
    x = _f(x)
    middle = binary("add", binary("truediv", x, _c(6.0)), _c(0.5))
    return where(binary("le", x, _c(-3.0)), _c(0.0), where(binary("ge", x, _c(3.0)), _c(1.0), middle))


def shrink_node(x: Node, lambd: float, soft: bool) -> Node:
    x = _f(x)
    above, below = binary("gt", x, _c(lambd)), binary("lt", x, _c(-lambd))
    if soft:
        return where(above, binary("sub", x, _c(lambd)), where(below, binary("add", x, _c(lambd)), _c(0.0)))
    return where(binary("or", above, below), x, _c(0.0))


def _no_extra(name: str, args, kwargs, allowed=("out",)):
    extra = dict(kwargs)
    if extra.pop("out", None) is not None:
        raise UntraceableModError(f"{name} with out=")
    for key in allowed:
        extra.pop(key, None)
    if args or extra:
        raise UntraceableModError(f"extra arguments to {name}", f"{args} {extra}")


def _unary(name: str, build: Callable[[Node], Node]):
    def handler(tracer, x, *args, **kwargs):
        _no_extra(name, args, kwargs)
        return tracer.elementwise(build, x)
    return handler


def _binary(name: str, build: Callable[[Node, Node], Node]):
    def handler(tracer, a, b=None, *args, other=None, **kwargs):
        _no_extra(name, args, kwargs)
        return tracer.elementwise(build, a, other if b is None else b)
    return handler


def _round(tracer, x, *args, decimals=0, **kwargs):
    _no_extra("round", args, kwargs)
    if decimals != 0:
        raise UntraceableModError("round with decimals != 0")
    return tracer.elementwise(round_node, x)


def _nan_to_num(tracer, x, nan=0.0, posinf=None, neginf=None, *, out=None):
    return tracer.elementwise(lambda n: nan_to_num_node(n, nan, posinf, neginf), x)


def _logit(tracer, x, eps=None, *, out=None):
    def build(n: Node) -> Node:
        n = _f(n)
        if eps is not None:
            n = clamp_node(n, eps, 1.0 - eps)
        return unary("log", binary("truediv", n, binary("sub", _c(1.0), n)))
    return tracer.elementwise(build, x)


def _lerp(tracer, start, end, weight, *, out=None):
    return tracer.elementwise(lerp_node, start, end, weight)


def _heaviside(tracer, x, values, *, out=None):
    return tracer.elementwise(heaviside_node, x, values)


def _activation(build: Callable[..., Node], *names_and_defaults):
    """An F.* activation with keyword parameters (``inplace`` ignored: a traced value has no storage)."""
    def handler(tracer, x, *args, **kwargs):
        kwargs.pop("inplace", None)
        values = [kwargs.pop(name, args[i] if i < len(args) else default)
                  for i, (name, default) in enumerate(names_and_defaults)]
        if kwargs or len(args) > len(names_and_defaults):
            raise UntraceableModError("extra arguments to an activation", f"{args} {kwargs}")
        return tracer.elementwise(lambda n: build(n, *values), x)
    return handler


_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946

UNARY_NODES = {  # torch name -> node op
    "tan": "tan", "atan": "atan", "arctan": "atan", "asin": "asin", "arcsin": "asin", "acos": "acos",
    "arccos": "acos", "sinh": "sinh", "cosh": "cosh", "asinh": "asinh", "arcsinh": "asinh", "acosh": "acosh",
    "arccosh": "acosh", "atanh": "atanh", "arctanh": "atanh", "erfc": "erfc", "signbit": "signbit",
}
UNARY_COMPOSITES: Dict[str, Callable[[Node], Node]] = {
    "frac": lambda x: binary("sub", x, trunc_node(x)),
    "isnan": isnan_node, "isinf": isinf_node, "isfinite": isfinite_node,
    "isposinf": lambda x: binary("eq", x, _c(math.inf)) if x.kind == "float" else const(False),
    "isneginf": lambda x: binary("eq", x, _c(-math.inf)) if x.kind == "float" else const(False),
    "sinc": sinc_node,
    "deg2rad": lambda x: binary("mul", _f(x), _c(math.pi / 180.0)),
    "rad2deg": lambda x: binary("mul", _f(x), _c(180.0 / math.pi)),
    "ndtr": lambda x: binary("mul", _c(0.5), unary("erfc", binary("mul", _f(x), _c(-math.sqrt(0.5))))),
}
BINARY_COMPOSITES: Dict[str, Callable[[Node, Node], Node]] = {
    "atan2": lambda y, x: binary("atan2", y, x), "arctan2": lambda y, x: binary("atan2", y, x),
    "fmin": nan_aware_min_max("min"), "fmax": nan_aware_min_max("max"),
    "copysign": copysign_node, "hypot": hypot_node, "logaddexp": logaddexp_node,
    "logaddexp2": lambda a, b: logaddexp_node(a, b, base2=True), "xlogy": xlogy_node,
    "float_power": lambda a, b: binary("pow", _f(a), _f(b)),
}


def pointwise_handlers() -> Dict[object, Callable]:
    """Handlers of the functions above, keyed by the torch / Tensor / special / F objects."""
    handlers: Dict[object, Callable] = {}

    def register(name: str, handler, namespaces=(torch, torch.Tensor, torch.special)):
        for namespace in namespaces:
            func = getattr(namespace, name, None)
            if func is not None:
                handlers[func] = handler

    for name, op in UNARY_NODES.items():
        register(name, _unary(name, lambda x, op=op: unary(op, x)))
    for name, build in UNARY_COMPOSITES.items():
        register(name, _unary(name, build))
    for name, build in BINARY_COMPOSITES.items():
        register(name, _binary(name, build))
    register("round", _round)
    register("nan_to_num", _nan_to_num)
    register("logit", _logit)
    register("lerp", _lerp)
    register("heaviside", _heaviside)
    activations = {
        "softsign": _activation(lambda x: binary("truediv", _f(x), binary("add", _c(1.0), unary("abs", _f(x))))),
        "tanh": _activation(lambda x: unary("tanh", x)),
        "elu": _activation(lambda x, alpha: elu_node(x, alpha), ("alpha", 1.0)),
        "celu": _activation(lambda x, alpha: elu_node(x, alpha, input_scale=1.0 / alpha), ("alpha", 1.0)),
        "selu": _activation(lambda x: elu_node(x, _SELU_ALPHA, _SELU_SCALE)),
        "mish": _activation(lambda x: binary("mul", _f(x), unary("tanh", softplus_node(_f(x))))),
        "logsigmoid": _activation(lambda x: unary("neg", softplus_node(unary("neg", _f(x))))),
        "hardtanh": _activation(lambda x, low, high: clamp_node(_f(x), low, high), ("min_val", -1.0),
                                ("max_val", 1.0)),
        "relu6": _activation(lambda x: clamp_node(_f(x), 0.0, 6.0)),
        "hardsigmoid": _activation(hardsigmoid_node),
        "hardswish": _activation(lambda x: binary("mul", _f(x), hardsigmoid_node(x))),
        "tanhshrink": _activation(lambda x: binary("sub", _f(x), unary("tanh", x))),
        "softshrink": _activation(lambda x, lambd: shrink_node(x, lambd, True), ("lambd", 0.5)),
        "hardshrink": _activation(lambda x, lambd: shrink_node(x, lambd, False), ("lambd", 0.5)),
        "threshold": _activation(lambda x, threshold, value: where(binary("gt", x, _c(threshold)), x, _c(value)),
                                 ("threshold", None), ("value", None)),
        "relu": _activation(relu_node),
    }
    for name, handler in activations.items():
        func = getattr(F, name, None)
        if func is not None:
            handlers[func] = handler
    return handlers
