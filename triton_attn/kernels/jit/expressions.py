"""Triton expressions from a traced graph: the emitter shared by the forward and backward kernels.

``Emitter.value(node)`` turns a ``masks.tracing`` graph into Triton statements (``emitter.lines``)
and a final expression, with common subexpressions reused and constants folded. Integer ``//``
and ``%`` keep Python's floor semantics for negative operands, and loads from captured tensors
are bounds-masked, with negative indices counting from the end as in torch.

Index values in the kernel: ``batch`` and ``head`` are scalars, ``q_idx`` is ``[BLOCK_M, 1]``
and ``kv_idx`` ``[1, BLOCK_N]`` (int32), so an expression that only depends on ``q_idx`` (say
``doc_ids[b, q_idx]``) is loaded once per tile row, not once per element.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

from ...masks.tracing import Node
from .lowering import LOWERINGS

# Names of the traced arguments inside the generated functions (their parameters).
ARG_NAMES = {"b": "batch", "h": "head", "q_idx": "q_idx", "kv_idx": "kv_idx", "score": "score"}
_NONNEGATIVE_ARGS = {"b", "h", "q_idx", "kv_idx"}


class CodegenError(TypeError):
    """The graph uses something the Triton code generator cannot express (names the operation)."""

    def __init__(self, operation: str):
        self.operation = operation
        super().__init__(f"cannot generate Triton code for {operation}")


# ---------------------------------------------------------------------------------------------
# Expressions
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Expr:
    """An emitted value: Triton source text, its kind, and its Python value when constant."""

    text: str
    kind: str  # "bool" | "int" | "float"
    const: object = None
    is_const: bool = False


def _literal(value) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, float):
        if math.isnan(value):
            return 'float("nan")'
        if math.isinf(value):
            return 'float("inf")' if value > 0 else 'float("-inf")'
        return repr(value)
    return repr(int(value))


def _const_expr(value, kind: str) -> _Expr:
    if kind == "float":
        value = float(value)
    elif kind == "int":
        value = int(value)
    else:
        value = bool(value)
    return _Expr(_literal(value), kind, value, True)


def _nan_outside_domain(fn: Callable) -> Callable:
    """``fn`` folded like torch computes it: NaN outside the domain (math raises ValueError), inf at a pole."""
    def folded(*values):
        try:
            return fn(*values)
        except ValueError:
            return math.nan
        except OverflowError:
            return math.inf
    return folded


def _atanh(a):
    return math.copysign(math.inf, a) if abs(a) == 1 else math.atanh(a)


def _py_floordiv(a, b):
    return math.floor(a / b) if isinstance(a, float) or isinstance(b, float) else a // b


# Python implementations for constant folding; integer floordiv/mod follow Python (floor)
# semantics, as torch and the traced graph do.
_FOLD_BINARY: Dict[str, Callable] = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "truediv": lambda a, b: a / b, "floordiv": _py_floordiv, "mod": lambda a, b: a % b,
    "pow": lambda a, b: a ** b, "min": min, "max": max,
    "and": lambda a, b: a & b, "or": lambda a, b: a | b, "xor": lambda a, b: a ^ b,
    "lshift": lambda a, b: a << b, "rshift": lambda a, b: a >> b,
    "eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b, "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b,
}
_FOLD_UNARY: Dict[str, Callable] = {
    "neg": lambda a: -a, "abs": abs, "not": lambda a: not a, "invert": lambda a: ~a,
    "tanh": math.tanh, "exp": math.exp, "exp2": lambda a: 2.0 ** a, "log": math.log, "log2": math.log2,
    "sqrt": math.sqrt, "sigmoid": lambda a: 1.0 / (1.0 + math.exp(-a)), "floor": math.floor,
    "ceil": math.ceil, "to_float": float, "to_int": int, "sin": math.sin, "cos": math.cos, "erf": math.erf,
    "log1p": math.log1p, "expm1": math.expm1,
    "tan": math.tan, "atan": math.atan, "asin": _nan_outside_domain(math.asin),
    "acos": _nan_outside_domain(math.acos), "sinh": _nan_outside_domain(math.sinh),
    "cosh": _nan_outside_domain(math.cosh), "asinh": math.asinh, "acosh": _nan_outside_domain(math.acosh),
    "atanh": _nan_outside_domain(_atanh), "erfc": math.erfc, "signbit": lambda a: math.copysign(1.0, a) < 0,
}
_FOLD_BINARY["atan2"] = lambda a, b: math.atan2(float(a), float(b))
_COMPARE_OPS = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_FLOAT_MATH = {"exp": "tl.exp", "exp2": "tl.exp2", "log": "tl.log", "log2": "tl.log2", "sqrt": "tl.sqrt",
               "sigmoid": "tl.sigmoid", "sin": "tl.sin", "cos": "tl.cos", "erf": "tl.erf"}
# Integer exponents up to this size are computed by repeated multiplication (exact for ints).
_MAX_UNROLLED_POWER = 8


def is_nonnegative(node: Node) -> bool:
    """Whether ``node`` is provably >= 0 (then C-style ``//`` and ``%`` equal Python's)."""
    if node.op == "arg":
        return node.args[0] in _NONNEGATIVE_ARGS
    if node.op == "const":
        return not isinstance(node.args[0], bool) and node.args[0] >= 0
    if node.kind == "bool":
        return True
    children = [a for a in node.args if isinstance(a, Node)]
    if node.op in ("add", "mul", "floordiv", "mod", "min", "to_int", "floor", "ceil", "rshift"):
        return all(is_nonnegative(c) for c in children)
    if node.op in ("max", "and"):
        return any(is_nonnegative(c) for c in children)
    if node.op == "abs":
        return True
    if node.op == "where":
        return is_nonnegative(node.args[1]) and is_nonnegative(node.args[2])
    return False


class Emitter:
    """Emits statements for a graph, one variable per distinct subexpression.

    ``prefix`` names the variables (``mask_v3``); ``captured_prefix`` names the captured-tensor
    arguments (``mask_cap0``, ``mask_cap0_size1``, ``mask_cap0_stride1``).
    """

    def __init__(self, prefix: str, captured_prefix: str, *, fast_tanh: bool = False):
        self.prefix = prefix
        self.captured_prefix = captured_prefix
        # Score functions built for CUDA with 16-bit inputs use the hardware tanh; mask code never
        # does (a predicate must match its dense evaluation exactly).
        self.fast_tanh = fast_tanh
        self.lines: List[str] = []
        self._by_key: Dict[str, _Expr] = {}
        self._key_of: Dict[int, str] = {}
        self._lowered: List[Node] = []

    # -- helpers ------------------------------------------------------------------------------
    def _bind(self, text: str, kind: str) -> _Expr:
        name = f"{self.prefix}{len(self.lines)}"
        self.lines.append(f"{name} = {text}")
        return _Expr(name, kind)

    @staticmethod
    def as_float(e: _Expr) -> str:
        if e.is_const:
            return _literal(float(e.const))
        return e.text if e.kind == "float" else f"{e.text}.to(tl.float32)"

    @staticmethod
    def as_int(e: _Expr) -> str:
        if e.is_const:
            return _literal(int(e.const))
        return f"{e.text}.to(tl.int32)" if e.kind == "bool" else e.text

    def _operands(self, kind: str, *exprs: _Expr) -> List[str]:
        if kind == "float":
            return [self.as_float(e) for e in exprs]
        if kind == "int":
            return [self.as_int(e) for e in exprs]
        return [e.text for e in exprs]

    def _node_key(self, node: Node) -> str:
        key = self._key_of.get(id(node))
        if key is None:
            parts = [self._node_key(a) if isinstance(a, Node) else repr(a) for a in node.args]
            key = f"{node.op}:{node.kind}(" + ",".join(parts) + ")"
            self._key_of[id(node)] = key
        return key

    # -- the walk -----------------------------------------------------------------------------
    def value(self, node: Node) -> _Expr:
        key = self._node_key(node)
        if key not in self._by_key:
            self._by_key[key] = self._emit(node)
        return self._by_key[key]

    def _emit(self, node: Node) -> _Expr:
        op = node.op
        if op == "arg":
            return _Expr(ARG_NAMES[node.args[0]], node.kind)
        if op == "const":
            return _const_expr(node.args[0], node.kind)
        if op == "load":
            return self._load(node)
        if op == "where":
            cond = self.value(node.args[0])
            if cond.is_const:  # a constant condition selects a branch at generation time
                chosen = self.value(node.args[1] if cond.const else node.args[2])
                return self._convert(chosen, node.kind)
            true_val, false_val = self.value(node.args[1]), self.value(node.args[2])
            a, b = self._operands(node.kind if node.kind != "bool" else "bool", true_val, false_val)
            return self._bind(f"tl.where({cond.text}, {a}, {b})", node.kind)
        args = [self.value(a) for a in node.args]
        if all(a.is_const for a in args):
            return self._fold(node, args)
        if op in LOWERINGS:  # no Triton instruction: built from the basic nodes (lowering.py)
            lowered = LOWERINGS[op](*node.args)
            self._lowered.append(lowered)  # alive while the emitter is: keys are memoized by id(node)
            return self._convert(self.value(lowered), node.kind)
        if len(args) == 1:
            return self._unary(node, args[0])
        return self._binary(node, args[0], args[1])

    def _convert(self, e: _Expr, kind: str) -> _Expr:
        if e.kind == kind:
            return e
        if e.is_const:
            return _const_expr(e.const, kind)
        text = self.as_float(e) if kind == "float" else self.as_int(e) if kind == "int" else f"({e.text} != 0)"
        return self._bind(text, kind)

    def _fold(self, node: Node, args: Sequence[_Expr]) -> _Expr:
        values = [a.const for a in args]
        try:
            if len(values) == 1:
                result = _FOLD_UNARY[node.op](values[0])
            else:
                left, right = values
                if node.op in ("and", "or", "xor") and isinstance(left, bool) != isinstance(right, bool):
                    left, right = int(left), int(right)
                result = _FOLD_BINARY[node.op](left, right)
        except (ZeroDivisionError, ValueError, OverflowError, KeyError) as error:
            raise CodegenError(f"constant {node.op} of {values!r} ({error})") from error
        return _const_expr(result, node.kind)

    def _unary(self, node: Node, x: _Expr) -> _Expr:
        op = node.op
        if op == "neg":
            return self._bind(f"-{x.text}", node.kind)
        if op == "abs":
            return x if x.kind == "bool" else self._bind(f"tl.abs({x.text})", node.kind)
        if op == "not":
            return self._bind(f"({x.text} == 0)", "bool")
        if op == "invert":
            return self._bind(f"~{x.text}", node.kind)
        if op == "signbit":
            if x.kind == "bool":
                return _const_expr(False, "bool")
            if x.kind == "int":
                return self._bind(f"({x.text} < 0)", "bool")
            return self._bind(f"({x.text}.to(tl.int32, bitcast=True) < 0)", "bool")  # -0.0 and -nan too
        if op in ("floor", "ceil"):
            if x.kind != "float":
                return self._convert(x, node.kind)
            return self._bind(f"tl.{op}({x.text})", node.kind)
        if op == "to_float":
            return self._convert(x, "float")
        if op == "to_int":
            return self._bind(f"{x.text}.to(tl.int32)", "int") if x.kind != "int" else x
        if op == "tanh":
            value = self.as_float(x)
            if self.fast_tanh:
                # CUDA with 16-bit inputs: the hardware's tanh.approx.f32, one instruction (relative
                # error ~2**-11, below the inputs' own rounding) instead of an exp and a division.
                return self._bind(f"tl.inline_asm_elementwise('tanh.approx.f32 $0, $1;', '=f,f', [{value}], "
                                  "dtype=tl.float32, is_pure=True, pack=1)", "float")
            # Elsewhere (interpreter, float32, ROCm): 1 - 2 / (exp(2x) + 1), which saturates
            # correctly at both ends and is within ~1e-7 absolute.
            return self._bind(f"1.0 - 2.0 / (tl.exp(2.0 * {value}) + 1.0)", "float")
        if op in _FLOAT_MATH:
            return self._bind(f"{_FLOAT_MATH[op]}({self.as_float(x)})", "float")
        if op == "log1p":
            # tl has no portable log1p: log(u) * x / (u - 1) with u = 1 + x cancels the rounding of u
            # (accurate to a few ulp even where x is tiny); u == 1 means log1p(x) == x to float precision,
            # and u == inf that log1p(x) == inf (the correction would be inf / inf).
            u = self._bind(f"(1.0 + {self.as_float(x)})", "float")
            corrected = (f"tl.log({u.text}) * ({self.as_float(x)} / "
                         f"tl.where(({u.text} == 1.0) | ({u.text} == float(\"inf\")), 1.0, {u.text} - 1.0))")
            return self._bind(f"tl.where({u.text} == 1.0, {self.as_float(x)}, tl.where({u.text} == float(\"inf\"), "
                              f"{u.text}, {corrected}))", "float")
        if op == "expm1":
            # The same correction: (u - 1) * x / log(u) with u = exp(x); exp(x) - 1 where u - 1 is exact
            # enough (|x| large) or would divide 0 / 0.
            value = self.as_float(x)
            u = self._bind(f"tl.exp({value})", "float")
            log_u = self._bind(f"tl.log({u.text})", "float")
            corrected = f"({u.text} - 1.0) * ({value} / tl.where({log_u.text} == 0.0, 1.0, {log_u.text}))"
            return self._bind(f"tl.where(({u.text} == 1.0) | (tl.abs({value}) > 0.5), "
                              f"tl.where({u.text} == 1.0, {value}, {u.text} - 1.0), {corrected})", "float")
        raise CodegenError(f"the unary operation {op!r}")

    def _binary(self, node: Node, left: _Expr, right: _Expr) -> _Expr:
        op, kind = node.op, node.kind
        if op in _COMPARE_OPS:
            operand_kind = "float" if "float" in (left.kind, right.kind) else (
                "int" if "int" in (left.kind, right.kind) else "bool")
            a, b = self._operands(operand_kind, left, right)
            return self._bind(f"({a} {_COMPARE_OPS[op]} {b})", "bool")
        if op in ("and", "or", "xor", "lshift", "rshift"):
            symbol = {"and": "&", "or": "|", "xor": "^", "lshift": "<<", "rshift": ">>"}[op]
            a, b = self._operands(kind, left, right)
            return self._bind(f"({a} {symbol} {b})", kind)
        if op in ("add", "sub", "mul"):
            symbol = {"add": "+", "sub": "-", "mul": "*"}[op]
            a, b = self._operands(kind, left, right)
            return self._bind(f"({a} {symbol} {b})", kind)
        if op == "truediv":
            a, b = self._operands("float", left, right)
            return self._bind(f"({a} / {b})", "float")
        if op in ("min", "max"):
            a, b = self._operands(kind, left, right)
            return self._bind(f"tl.{'minimum' if op == 'min' else 'maximum'}({a}, {b})", kind)
        if op in ("floordiv", "mod"):
            return self._floordiv_mod(node, left, right)
        if op == "pow":
            return self._pow(node, left, right)
        raise CodegenError(f"the binary operation {op!r}")

    def _floordiv_mod(self, node: Node, left: _Expr, right: _Expr) -> _Expr:
        if node.kind == "float":
            a, b = self._operands("float", left, right)
            quotient = self._bind(f"tl.floor({a} / {b})", "float")
            if node.op == "floordiv":
                return quotient
            return self._bind(f"({a} - {b} * {quotient.text})", "float")
        a, b = self._operands("int", left, right)
        symbol = "//" if node.op == "floordiv" else "%"
        if is_nonnegative(node.args[0]) and is_nonnegative(node.args[1]):
            return self._bind(f"({a} {symbol} {b})", "int")
        # Triton's integer // and % truncate toward zero (C semantics); the graph means floor
        # semantics (Python, torch). Correct where the signs differ and the division is inexact.
        remainder = self._bind(f"({a} % {b})", "int")
        adjust = self._bind(f"(({remainder.text} != 0) & (({remainder.text} < 0) != ({b} < 0)))", "bool")
        if node.op == "mod":
            return self._bind(f"tl.where({adjust.text}, {remainder.text} + {b}, {remainder.text})", "int")
        return self._bind(f"({a} // {b}) - {adjust.text}.to(tl.int32)", "int")

    def _pow(self, node: Node, base: _Expr, exponent: _Expr) -> _Expr:
        if exponent.is_const and float(exponent.const).is_integer() and abs(exponent.const) <= _MAX_UNROLLED_POWER:
            count = int(exponent.const)
            if count == 0:
                return _const_expr(1, node.kind)
            if count < 0 and node.kind != "float":
                raise CodegenError("an integer raised to a negative power")
            (a,) = self._operands(node.kind, base)
            product = "(" + " * ".join([a] * abs(count)) + ")"
            return self._bind(product if count > 0 else f"(1.0 / {product})", node.kind)
        if base.is_const and float(base.const) > 0:
            # c ** x = exp2(x * log2(c)) for a positive constant base (ALiBi-style slopes).
            return self._bind(f"tl.exp2({self.as_float(exponent)} * {_literal(math.log2(float(base.const)))})",
                              "float")
        if exponent.is_const and node.kind == "float":
            # x ** c = exp2(c * log2(|x|)), negative x: NaN for a fractional c, the sign of an odd c.
            power = float(exponent.const)
            x = self.as_float(base)
            magnitude = self._bind(f"tl.exp2({_literal(power)} * tl.log2(tl.abs({x})))", "float")
            if not power.is_integer():
                return self._bind(f"tl.where({x} < 0.0, float(\"nan\"), {magnitude.text})", "float")
            if power % 2 == 0:
                return magnitude
            return self._bind(f"tl.where({x} < 0.0, -{magnitude.text}, {magnitude.text})", "float")
        raise CodegenError("pow with a non-constant exponent and a base that may be negative")

    def _load(self, node: Node) -> _Expr:
        slot, index_nodes = node.args[0], node.args[1:]
        pointer = f"{self.captured_prefix}{slot}"
        if not index_nodes:
            text = f"tl.load({pointer})"
        else:
            offsets, checks = [], []
            for dim, index_node in enumerate(index_nodes):
                size, stride = f"{pointer}_size{dim}", f"{pointer}_stride{dim}"
                index = self.value(index_node)
                index_text = self.as_int(index)
                if not is_nonnegative(index_node):
                    # A negative index counts from the end, as in torch indexing.
                    wrapped = self._bind(f"tl.where({index_text} < 0, {index_text} + {size}, {index_text})", "int")
                    index_text = wrapped.text
                    checks.append(f"({index_text} >= 0)")
                # Out-of-range positions (the padded tail of a tile) read 0 instead of faulting;
                # the kernel masks those positions out anyway.
                checks.append(f"({index_text} < {size})")
                # 64-bit products: index x stride reaches 2**31 in a [H, L, L] bias table past L ~ 8k.
                # Pointer math is 64-bit anyway, so this costs a widening, not a second multiply.
                literal = index_text.lstrip("-").isdigit()
                offsets.append(f"{index_text} * {stride}" if literal else f"{index_text}.to(tl.int64) * {stride}")
            # "!= 0": the interpreter rejects a load mask made of a scalar & a block bool otherwise.
            text = f"tl.load({pointer} + {' + '.join(offsets)}, mask=({' & '.join(checks)}) != 0, other=0)"
        if node.kind == "bool":
            text = f"({text} != 0)"  # bool tensors are passed as uint8
        elif node.kind == "float":
            text = f"{text}.to(tl.float32)"
        return self._bind(text, node.kind)
