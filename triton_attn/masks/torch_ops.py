"""The torch functions and tensor methods a traced mod may call, as handlers on traced values.

``HANDLERS`` maps a torch function or ``torch.Tensor`` method to ``handler(tracer, *args, **kwargs)``,
which returns the traced value (``tracing.Symbol``) the call computes. ``tracing.Symbol`` reads it for
torch functions (``__torch_function__``), method spellings (``x.sum(-1)``, ``x.new_ones(())``) and its
Python operators (``a + b`` is the handler of ``torch.Tensor.__add__``). Elementwise functions apply per
element of an array value; reductions (sum, any, all, amax, dot, ...) unroll into the graph.
``pointwise.py`` adds the rest of torch's elementwise functions and holds the table of which are traced.

Handlers never name ``Symbol``: they make values through the ``tracing.Tracer`` they are given
(``lift``, ``elementwise``, ``array``, ``is_traced``), so this module does not import ``tracing``;
``tracing`` imports it, and the imports of the tracer point one way.
"""

from __future__ import annotations

import math
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from .composites import (
    as_bool,
    as_number,
    fmod_node,
    gelu_node,
    relu_node,
    round_node,
    sign_node,
    softplus_node,
    to_dtype_node,
    tree_reduce,
    trunc_div_node,
    trunc_node,
)
from .graph import (
    DTYPE_OF_KIND,
    MAX_ELEMENTS,
    Node,
    UntraceableModError,
    binary,
    const,
    flat_positions,
    kind_of_dtype,
    unary,
    where,
)
from .pointwise import pointwise_handlers


def _op(name: str) -> Callable[..., Node]:
    return lambda a, b: binary(name, a, b)


def _reduce(tracer, value, combine, empty, prepare=None, dim=None, keepdim=False):
    value = tracer.lift(value)
    shape = value.shape
    dims = tuple(range(len(shape))) if dim is None else ((dim,) if isinstance(dim, int) else tuple(dim))
    dims = tuple(sorted(d % max(len(shape), 1) for d in dims)) if shape else ()
    kept = [d for d in range(len(shape)) if d not in dims]
    grid = flat_positions(shape).permute(*kept, *dims).reshape(math.prod(shape[d] for d in kept), -1)
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
            out.append(tree_reduce(combine, nodes))
    out_shape = tuple(1 if d in dims else s for d, s in enumerate(shape)) if keepdim else tuple(shape[d] for d in kept)
    return tracer.array(tuple(out), out_shape)


# ---------------------------------------------------------------------------------------------
# Handlers: torch functions and tensor methods on traced values
# ---------------------------------------------------------------------------------------------

def _unary_handler(make: Callable[[Node], Node]):
    def handler(tracer, x, *args, **kwargs):
        if args or any(v not in (None, 0) for k, v in kwargs.items() if k in ("out", "decimals")) or (
                set(kwargs) - {"out", "decimals"}):
            raise UntraceableModError("extra arguments to an elementwise function", f"{args} {kwargs}")
        return tracer.elementwise(make, x)
    return handler


def _binary_handler(name: str, reflected: bool = False):
    def handler(tracer, a, b=None, *, other=None, alpha=None, rounding_mode=None, out=None):
        b = other if b is None else b
        if reflected:
            a, b = b, a
        if alpha is not None:
            b = tracer.elementwise(_op("mul"), b, alpha)
        if rounding_mode == "floor":
            return tracer.elementwise(_op("floordiv"), a, b)
        if rounding_mode == "trunc":
            return tracer.elementwise(trunc_div_node, a, b)
        if rounding_mode is not None:
            raise UntraceableModError(f"division with rounding_mode={rounding_mode!r}")
        return tracer.elementwise(_op(name), a, b)
    return handler


def _min_max(name: str):
    def handler(tracer, x, other=None, dim=None, keepdim=False, **kwargs):
        other = kwargs.pop("other", other)
        if isinstance(other, int) and not isinstance(other, bool):
            dim, other = other, None  # torch.max(x, 1) reduces over dim 1
        if dim is not None:
            raise UntraceableModError(f"torch.{name} over a dim (values and indices)", "use amax/amin")
        if other is not None:
            return tracer.elementwise(_op(name), x, other)
        return _reduce(tracer, x, _op(name), None)
    return handler


def _reduction(combine, empty, prepare=None, finish=None):
    def handler(tracer, x, dim=None, keepdim=False, *, dtype=None, out=None):
        result = _reduce(tracer, x, combine, empty, prepare, dim, keepdim)
        if finish is not None:
            count = math.prod(tracer.lift(x).shape) // max(1, math.prod(result.shape))
            result = tracer.elementwise(lambda n: finish(n, count), result)
        if dtype is not None:
            result = tracer.elementwise(lambda n: to_dtype_node(n, dtype), result)
        return result
    return handler


def _dot(tracer, a, b, **kwargs):
    a, b = tracer.lift(a), tracer.lift(b)
    if len(a.shape) == 1 and len(b.shape) == 1:
        return _reduce(tracer, tracer.elementwise(_op("mul"), a, b), _op("add"), 0, as_number)
    if len(a.shape) == 2 and len(b.shape) == 1:  # matrix @ vector
        return _reduce(tracer, tracer.elementwise(_op("mul"), a, b), _op("add"), 0, as_number, dim=-1)
    if len(a.shape) == 1 and len(b.shape) == 2:  # vector @ matrix
        column = tracer.array(a.nodes, (a.shape[0], 1))
        return _reduce(tracer, tracer.elementwise(_op("mul"), column, b), _op("add"), 0, as_number, dim=0)
    raise UntraceableModError("matmul of shapes other than vector/matrix", f"{a.shape} @ {b.shape}")


def _where(tracer, cond, values=None, other=None, **kwargs):
    if values is None or other is None:
        raise UntraceableModError("torch.where with one argument")
    return tracer.elementwise(where, cond, values, other)


def _tensor_where(tracer, values, cond, other=None, **kwargs):
    return tracer.elementwise(where, cond, values, kwargs.get("y", other))


def _clamp(tracer, x, min=None, max=None, **kwargs):
    result = tracer.lift(x)
    if min is not None:
        result = tracer.elementwise(_op("max"), result, min)
    if max is not None:
        result = tracer.elementwise(_op("min"), result, max)
    return result


def _isin(tracer, elements, test_elements, *, assume_unique=False, invert=False):
    tests = tracer.lift(test_elements).nodes

    def member(x: Node) -> Node:
        hit = tree_reduce(_op("or"), [binary("eq", x, t) for t in tests]) if tests else const(False)
        return unary("not", hit) if invert else hit
    return tracer.elementwise(member, elements)


def _constant_array(tracer, shape, value, kind: str):
    shape = tuple(shape)
    if math.prod(shape) > MAX_ELEMENTS:
        raise UntraceableModError(f"a constant array of shape {shape}")
    cast = {"bool": bool, "int": int, "float": float}[kind]
    return tracer.array((const(cast(value)),) * math.prod(shape), shape)


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
    return tracer.elementwise(lambda n: to_dtype_node(n, DTYPE_OF_KIND[kind]) if n.kind != kind else n, value)


def _to(tracer, x, *args, dtype=None, **kwargs):
    for arg in args:
        if isinstance(arg, torch.dtype):
            dtype = arg
        elif isinstance(arg, torch.Tensor) or tracer.is_traced(arg):
            dtype = arg.dtype
    if dtype is None:
        return tracer.lift(x)
    return tracer.elementwise(lambda n: to_dtype_node(n, dtype), x)


def _cast(dtype):
    return lambda tracer, x, *args, **kwargs: tracer.elementwise(lambda n: to_dtype_node(n, dtype), x)


def _reshape(tracer, x, *shape, **kwargs):
    x = tracer.lift(x)
    shape = _size_arg(shape, dict(kwargs, **({"size": kwargs["shape"]} if "shape" in kwargs else {})))
    target = tuple(torch.empty(x.shape, device="meta").reshape(shape).shape)
    return tracer.array(x.nodes, target)


def _unsqueeze(tracer, x, dim):
    x = tracer.lift(x)
    shape = list(x.shape)
    shape.insert(dim % (len(shape) + 1), 1)
    return tracer.array(x.nodes, tuple(shape))


def _squeeze(tracer, x, dim=None):
    x = tracer.lift(x)
    target = tuple(torch.empty(x.shape, device="meta").squeeze(*(() if dim is None else (dim,))).shape)
    return tracer.array(x.nodes, target)


def _identity(tracer, x, *args, **kwargs):
    return tracer.lift(x)


def _getitem(tracer, tensor, index):
    if tracer.is_traced(tensor):
        return tensor[index]
    if not isinstance(tensor, torch.Tensor):
        raise UntraceableModError(f"indexing a {type(tensor).__name__}")
    return tracer.symbol_of(tensor)[index]  # a lazy view: nothing is loaded until every dim is fixed


def _item(tracer, x, *args, **kwargs):
    raise UntraceableModError("Tensor.item() (a traced value as a Python number)")


_UNARY_OPS = {
    "abs": "abs", "neg": "neg", "negative": "neg", "logical_not": "not", "tanh": "tanh", "exp": "exp",
    "exp2": "exp2", "log": "log", "log2": "log2", "sqrt": "sqrt", "sigmoid": "sigmoid", "sin": "sin", "cos": "cos",
    "erf": "erf", "log1p": "log1p", "expm1": "expm1", "floor": "floor", "ceil": "ceil",
}
_COMPOSED_UNARY = {
    "round": round_node, "trunc": trunc_node, "fix": trunc_node, "sign": sign_node, "sgn": sign_node,
    "square": lambda x: binary("mul", x, x), "reciprocal": lambda x: binary("truediv", const(1.0), x),
    "rsqrt": lambda x: binary("truediv", const(1.0), unary("sqrt", x)), "relu": relu_node,
    "log10": lambda x: binary("mul", unary("log", x), const(1.0 / math.log(10.0))),
    "bitwise_not": lambda x: unary("not" if x.kind == "bool" else "invert", x),
    "positive": lambda x: x,
}
_BINARY_OPS = {
    "add": "add", "sub": "sub", "subtract": "sub", "mul": "mul", "multiply": "mul", "div": "truediv",
    "divide": "truediv", "true_divide": "truediv", "floor_divide": "floordiv", "remainder": "mod", "pow": "pow",
    "minimum": "min", "maximum": "max", "logical_and": "and", "logical_or": "or",
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
    register("fmod", lambda tracer, a, b, **kw: tracer.elementwise(fmod_node, a, b))
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
    register("sum", _reduction(_op("add"), 0, as_number))
    register("prod", _reduction(_op("mul"), 1, as_number))
    register("mean", _reduction(_op("add"), None, lambda n: unary("to_float", n),
                                lambda total, count: binary("truediv", total, const(float(count)))))
    register("any", _reduction(_op("or"), False, as_bool))
    register("all", _reduction(_op("and"), True, as_bool))
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
    handlers[F.gelu] = lambda tracer, x, approximate="none": tracer.elementwise(
        lambda n: gelu_node(n, approximate), x)
    handlers[F.silu] = lambda tracer, x, inplace=False: tracer.elementwise(
        lambda n: binary("mul", n, unary("sigmoid", n)), x)
    handlers[F.softplus] = lambda tracer, x, beta=1.0, threshold=20.0: tracer.elementwise(
        lambda n: softplus_node(n, beta, threshold), x)
    handlers[F.relu] = lambda tracer, x, inplace=False: tracer.elementwise(relu_node, x)
    handlers[F.sigmoid] = handlers[torch.sigmoid]
    handlers[F.leaky_relu] = lambda tracer, x, negative_slope=0.01, inplace=False: tracer.elementwise(
        lambda n: where(binary("lt", n, const(0)), binary("mul", n, const(float(negative_slope))), n), x)
    handlers.update(pointwise_handlers())  # the rest of torch's elementwise functions (see pointwise.py)
    return handlers


# torch function / Tensor method -> handler(tracer, *args, **kwargs) -> traced value.
HANDLERS: Dict[object, Callable] = _build_handlers()
