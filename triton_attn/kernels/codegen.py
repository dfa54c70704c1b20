"""Code generation: a traced mask_mod / score_mod graph -> Triton source -> a loaded kernel.

``forward.KERNEL_TEMPLATE`` is specialized with

- the mask predicate (``mask_keep = ...``) emitted from the mask_mod's graph, or a lookup into
  per-block bitmasks (the fallback for mask_mods that cannot be traced), or nothing;
- the score computation (``logits = ...``) with the score_mod's graph inlined;
- one kernel argument per captured tensor: its pointer, then its sizes and strides, so new
  values (or new shapes) of the same dtype and rank reuse the compiled kernel.

Triton's JIT reads a kernel's source through ``inspect``, so the specialized source is written
to a module file in the cache directory (``$TRITON_ATTN_CACHE_DIR``, default
``~/.cache/triton_attn``), atomically, and imported from there. Files and the in-memory cache
are keyed by the graphs' structure hashes (``TracedMod.key``), never by the ``id()`` of the
Python callables, so the same mask_mod rebuilt in a loop is generated and compiled once.

Index values in the kernel: ``batch`` and ``head`` are scalars, ``q_idx`` is ``[BLOCK_M, 1]``
and ``kv_idx`` ``[1, BLOCK_N]`` (int32), so an expression that only depends on ``q_idx`` (say
``doc_ids[b, q_idx]``) is loaded once per tile row, not once per element.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import math
import os
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..masks.tracing import Node, TracedMod
from . import forward

CODEGEN_VERSION = 2
LOG2_E = 1.4426950408889634

# Names of the traced arguments inside the kernel template.
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


def _py_floordiv(a, b):
    return math.floor(a / b) if isinstance(a, float) or isinstance(b, float) else a // b


# Python implementations for constant folding; integer floordiv/mod follow Python (floor)
# semantics, as torch and the traced graph do.
_FOLD_BINARY: Dict[str, Callable] = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "truediv": lambda a, b: a / b, "floordiv": _py_floordiv, "mod": lambda a, b: a % b,
    "pow": lambda a, b: a ** b, "min": min, "max": max,
    "and": lambda a, b: a & b, "or": lambda a, b: a | b, "xor": lambda a, b: a ^ b,
    "eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b, "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b,
}
_FOLD_UNARY: Dict[str, Callable] = {
    "neg": lambda a: -a, "abs": abs, "not": lambda a: not a, "invert": lambda a: ~a,
    "tanh": math.tanh, "exp": math.exp, "exp2": lambda a: 2.0 ** a, "log": math.log, "log2": math.log2,
    "sqrt": math.sqrt, "sigmoid": lambda a: 1.0 / (1.0 + math.exp(-a)), "floor": math.floor,
    "ceil": math.ceil, "to_float": float, "to_int": int,
}
_COMPARE_OPS = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_FLOAT_MATH = {"exp": "tl.exp", "exp2": "tl.exp2", "log": "tl.log", "log2": "tl.log2", "sqrt": "tl.sqrt",
               "sigmoid": "tl.sigmoid"}


def is_nonnegative(node: Node) -> bool:
    """Whether ``node`` is provably >= 0 (then C-style ``//`` and ``%`` equal Python's)."""
    if node.op == "arg":
        return node.args[0] in _NONNEGATIVE_ARGS
    if node.op == "const":
        return not isinstance(node.args[0], bool) and node.args[0] >= 0
    if node.kind == "bool":
        return True
    children = [a for a in node.args if isinstance(a, Node)]
    if node.op in ("add", "mul", "floordiv", "mod", "min", "to_int", "floor", "ceil"):
        return all(is_nonnegative(c) for c in children)
    if node.op == "max":
        return any(is_nonnegative(c) for c in children)
    if node.op == "abs":
        return True
    if node.op == "where":
        return is_nonnegative(node.args[1]) and is_nonnegative(node.args[2])
    return False


class _Emitter:
    """Emits statements for a graph, one variable per distinct subexpression.

    ``prefix`` names the variables (``mask_v3``); ``captured_prefix`` names the captured-tensor
    arguments (``mask_cap0``, ``mask_cap0_size1``, ``mask_cap0_stride1``).
    """

    def __init__(self, prefix: str, captured_prefix: str):
        self.prefix = prefix
        self.captured_prefix = captured_prefix
        self.lines: List[str] = []
        self._by_key: Dict[str, _Expr] = {}
        self._key_of: Dict[int, str] = {}

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
        if op in ("floor", "ceil"):
            if x.kind != "float":
                return self._convert(x, node.kind)
            return self._bind(f"tl.{op}({x.text})", node.kind)
        if op == "to_float":
            return self._convert(x, "float")
        if op == "to_int":
            return self._bind(f"{x.text}.to(tl.int32)", "int") if x.kind != "int" else x
        if op == "tanh":
            # tl has no portable tanh (libdevice is CUDA-only and absent from the interpreter);
            # 1 - 2 / (exp(2x) + 1) saturates correctly at both ends and is within ~1e-7 absolute.
            return self._bind(f"1.0 - 2.0 / (tl.exp(2.0 * {self.as_float(x)}) + 1.0)", "float")
        if op in _FLOAT_MATH:
            return self._bind(f"{_FLOAT_MATH[op]}({self.as_float(x)})", "float")
        raise CodegenError(f"the unary operation {op!r}")

    def _binary(self, node: Node, left: _Expr, right: _Expr) -> _Expr:
        op, kind = node.op, node.kind
        if op in _COMPARE_OPS:
            operand_kind = "float" if "float" in (left.kind, right.kind) else (
                "int" if "int" in (left.kind, right.kind) else "bool")
            a, b = self._operands(operand_kind, left, right)
            return self._bind(f"({a} {_COMPARE_OPS[op]} {b})", "bool")
        if op in ("and", "or", "xor"):
            symbol = {"and": "&", "or": "|", "xor": "^"}[op]
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
        if exponent.is_const and float(exponent.const).is_integer() and 0 <= exponent.const <= 8:
            count = int(exponent.const)
            if count == 0:
                return _const_expr(1, node.kind)
            (a,) = self._operands(node.kind, base)
            return self._bind("(" + " * ".join([a] * count) + ")", node.kind)
        if base.is_const and float(base.const) > 0:
            # c ** x = exp2(x * log2(c)) for a positive constant base (ALiBi-style slopes).
            return self._bind(f"tl.exp2({self.as_float(exponent)} * {_literal(math.log2(float(base.const)))})",
                              "float")
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
                offsets.append(f"{index_text} * {stride}")
            # "!= 0": the interpreter rejects a load mask made of a scalar & a block bool otherwise.
            text = f"tl.load({pointer} + {' + '.join(offsets)}, mask=({' & '.join(checks)}) != 0, other=0)"
        if node.kind == "bool":
            text = f"({text} != 0)"  # bool tensors are passed as uint8
        elif node.kind == "float":
            text = f"{text}.to(tl.float32)"
        return self._bind(text, node.kind)


# ---------------------------------------------------------------------------------------------
# Kernel specs and source
# ---------------------------------------------------------------------------------------------

MASK_NONE = "none"        # every visited block is full: no predicate
MASK_TRACED = "traced"    # the mask_mod's graph, inlined
MASK_BITMASK = "bitmask"  # untraceable mask_mod: per-partial-block bitmasks (see fallback.py)


@dataclass(frozen=True)
class CapturedParam:
    """A captured tensor argument of a generated kernel: ``{prefix}{slot}`` and its rank.

    The launcher passes the pointer, then ``rank`` sizes, then ``rank`` strides.
    """

    name: str
    rank: int

    def arg_names(self) -> List[str]:
        return ([self.name] + [f"{self.name}_size{d}" for d in range(self.rank)]
                + [f"{self.name}_stride{d}" for d in range(self.rank)])


@dataclass(frozen=True)
class KernelSpec:
    """What a generated forward kernel is specialized on."""

    mask_mode: str
    mask: Optional[TracedMod] = None
    score: Optional[TracedMod] = None

    @property
    def key(self) -> str:
        parts = [f"v{forward.TEMPLATE_VERSION}.{CODEGEN_VERSION}", self.mask_mode,
                 self.mask.key if self.mask is not None and self.mask_mode == MASK_TRACED else "-",
                 self.score.key if self.score is not None else "-"]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def _mask_lines(spec: KernelSpec) -> Tuple[List[str], List[CapturedParam]]:
    if spec.mask_mode == MASK_NONE:
        return ["mask_keep = True"], []
    if spec.mask_mode == MASK_BITMASK:
        lines = [
            "# Untraceable mask_mod: read this block's precomputed bits (see kernels/fallback.py).",
            "fallback_block = tl.load(fallback_offsets + layout_offset) + slot",
            "fallback_ptrs = (fallback_bits + fallback_block.to(tl.int64) * (Q_BLOCK_SIZE * KV_BLOCK_SIZE)",
            "                 + rows_in_block[:, None] * KV_BLOCK_SIZE + cols_in_block[None, :])",
            "mask_keep = tl.load(fallback_ptrs, mask=(rows_in_block[:, None] < Q_BLOCK_SIZE)"
            " & (cols_in_block[None, :] < KV_BLOCK_SIZE), other=0) != 0",
        ]
        return lines, [CapturedParam("fallback_bits", 0), CapturedParam("fallback_offsets", 0)]
    emitter = _Emitter("mask_v", "mask_cap")
    result = emitter.value(spec.mask.graph)
    lines = list(emitter.lines) + [f"mask_keep = {result.text}"]
    params = [CapturedParam(f"mask_cap{i}", t.dim()) for i, t in enumerate(spec.mask.captured)]
    return lines, params


def _score_lines(spec: KernelSpec) -> Tuple[List[str], List[CapturedParam]]:
    if spec.score is None:
        return ["logits = qk * scale_log2  # scale and log2(e) folded into one multiply"], []
    emitter = _Emitter("score_v", "score_cap")
    result = emitter.value(spec.score.graph)
    final = emitter.as_float(result)
    if result.is_const:
        final = f"tl.full(qk.shape, {final}, tl.float32)"
    lines = (["score = qk * score_scale  # the score_mod sees scores in natural units"] + list(emitter.lines)
             + [f"logits = {final} * {LOG2_E!r}"])
    params = [CapturedParam(f"score_cap{i}", t.dim()) for i, t in enumerate(spec.score.captured)]
    return lines, params


def check_graph(traced: TracedMod) -> None:
    """Raise ``CodegenError`` if ``traced`` cannot be emitted as Triton code."""
    _Emitter("v", "cap").value(traced.graph)


def _replace_marker(source: str, marker: str, lines: Sequence[str]) -> str:
    out = []
    for line in source.split("\n"):
        if line.strip() == f"# @@{marker}@@":
            indent = line[: len(line) - len(line.lstrip())]
            out.extend(indent + text for text in lines)
        else:
            out.append(line)
    return "\n".join(out)


@dataclass(frozen=True)
class GeneratedSource:
    kernel_name: str
    source: str
    captured: Tuple[CapturedParam, ...]


def generate_source(spec: KernelSpec) -> GeneratedSource:
    """The module source of the kernel for ``spec``; raises ``CodegenError``."""
    mask_lines, mask_params = _mask_lines(spec)
    score_lines, score_params = _score_lines(spec)
    captured = tuple(mask_params + score_params)
    kernel_name = f"attention_forward_{spec.key}"
    arg_lines = [", ".join(param.arg_names()) + "," for param in captured]
    body = forward.KERNEL_TEMPLATE.replace("@@KERNEL_NAME@@", kernel_name)
    body = _replace_marker(body, "CAPTURED_ARGS", arg_lines)
    body = _replace_marker(body, "MASK_PREDICATE", mask_lines)
    body = _replace_marker(body, "SCORE", score_lines)
    mask_name = spec.mask.name if spec.mask is not None else spec.mask_mode
    score_name = spec.score.name if spec.score is not None else "none"
    header = (f'"""Generated by triton_attn.kernels.codegen; do not edit.\n\n'
              f"mask_mod: {mask_name!r} ({spec.mask_mode}); score_mod: {score_name!r}; key {spec.key}\n"
              f'"""\n\nimport triton\nimport triton.language as tl\n\n')
    return GeneratedSource(kernel_name, header + body.lstrip("\n"), captured)


# ---------------------------------------------------------------------------------------------
# Cache directory, module loading, kernel objects
# ---------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """Where generated kernel modules live: ``$TRITON_ATTN_CACHE_DIR`` or ``~/.cache/triton_attn``."""
    root = os.environ.get("TRITON_ATTN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "triton_attn")
    path = Path(root) / "kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_atomically(path: Path, text: str) -> None:
    """Write via a temporary file and ``os.replace`` so another process never sees half a module."""
    if path.exists() and path.read_text() == text:
        return
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _import_file(module_name: str, path: Path):
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # inspect.getsource finds the file through the module
    spec.loader.exec_module(module)
    return module


@dataclass
class GeneratedKernel:
    """One specialized forward kernel, runnable compiled (CUDA) or under the interpreter.

    ``function`` is the plain Python function from the generated module. ``jit()`` wraps it in a
    ``triton.runtime.jit.JITFunction`` and ``interpreted()`` in an ``InterpretedFunction``; both
    are built explicitly rather than through ``@triton.jit``, which picks one of the two from
    ``TRITON_INTERPRET`` at decoration time. So ``backend="interpret"`` and ``backend="triton"``
    can run in the same process.
    """

    spec: KernelSpec
    kernel_name: str
    path: Path
    function: Callable
    captured: Tuple[CapturedParam, ...]
    _jit: object = field(default=None, repr=False)
    _interpreted: object = field(default=None, repr=False)

    @property
    def arg_names(self) -> List[str]:
        import inspect

        return list(inspect.signature(self.function).parameters)

    def _do_not_specialize(self) -> List[str]:
        # Lengths and captured sizes/strides change from call to call; specializing on them
        # (value 1, divisibility by 16) would only multiply compiled variants.
        names = ["q_len", "kv_len"]
        for param in self.captured:
            names.extend(param.arg_names()[1:])
        return names

    def jit(self):
        if self._jit is None:
            from triton.runtime.jit import JITFunction

            self._jit = JITFunction(self.function, do_not_specialize=self._do_not_specialize())
        return self._jit

    def interpreted(self) -> "InterpretedKernel":
        if self._interpreted is None:
            self._interpreted = InterpretedKernel(self.function)
        return self._interpreted


# ---------------------------------------------------------------------------------------------
# The interpreter inside a process that also compiles
# ---------------------------------------------------------------------------------------------

_INTERPRETER_LOCK = threading.RLock()
_NESTED_INTERPRETED: Dict[int, Tuple[object, object]] = {}


def _interpret_nested_call(jit_function, *args, **kwargs):
    """``JITFunction.__call__`` while an interpreted kernel runs: interpret the callee too.

    Triton's standard library (``tl.zeros``, ``tl.max``, ``tl.sum``, ...) is made of
    ``@triton.jit`` functions. Imported without ``TRITON_INTERPRET=1`` they are ``JITFunction``s,
    whose ``__call__`` refuses to run outside a compiled kernel; the interpreter needs them as
    ``InterpretedFunction``s, which is what they would have been under the environment variable.
    """
    from triton.runtime.interpreter import InterpretedFunction

    entry = _NESTED_INTERPRETED.get(id(jit_function))
    if entry is None or entry[0] is not jit_function:
        entry = (jit_function, InterpretedFunction(jit_function.fn))
        _NESTED_INTERPRETED[id(jit_function)] = entry
    return entry[1](*args, **kwargs)


@contextlib.contextmanager
def interpreter_scope():
    """Run Triton's interpreter in a process whose ``triton.language`` is set up for compiling.

    The interpreter patches ``triton.language`` (and, for nested standard-library calls,
    ``triton.language.core``) while a kernel runs and does not undo every nested patch. This
    scope routes nested ``JITFunction`` calls to the interpreter and afterwards restores the
    namespaces exactly, so later compiled launches in the same process see an untouched Triton.
    """
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    with _INTERPRETER_LOCK:
        owners = [tl, tl.core, tl.math, tl.core.tensor, tl.standard]
        saved = [(owner, dict(vars(owner))) for owner in owners]
        original_call = JITFunction.__call__
        JITFunction.__call__ = _interpret_nested_call
        try:
            yield
        finally:
            JITFunction.__call__ = original_call
            for owner, before in saved:
                if isinstance(owner, type):  # e.g. the tensor class's interpreter-only __index__
                    for name in set(vars(owner)) - set(before):
                        delattr(owner, name)
                # Names the interpreter *added* to a module are its own helpers, injected into
                # the globals of every function it rewrites (and cached with them): they shadow
                # nothing, and rewritten functions still need them, so they stay.
                for name, value in before.items():
                    if vars(owner).get(name, _MISSING) is not value:
                        setattr(owner, name, value)


_MISSING = object()


class InterpretedKernel:
    """``kernel[grid](*args, **constexprs)`` under the Triton interpreter, on CPU tensors."""

    def __init__(self, function: Callable):
        from triton.runtime.interpreter import InterpretedFunction

        self.function = InterpretedFunction(function)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            with interpreter_scope():
                return self.function[grid](*args, **kwargs)
        return launch


_KERNELS: Dict[str, GeneratedKernel] = {}
_LOCK = threading.Lock()
_STATS = {"generated": 0}


def kernel_for(spec: KernelSpec) -> GeneratedKernel:
    """The generated kernel for ``spec``, from memory, the cache directory, or freshly written."""
    key = spec.key
    with _LOCK:
        kernel = _KERNELS.get(key)
        if kernel is not None:
            return kernel
        generated = generate_source(spec)
        path = cache_dir() / f"{generated.kernel_name}.py"
        _write_atomically(path, generated.source)
        module = _import_file(f"triton_attn_generated_{key}", path)
        kernel = GeneratedKernel(spec, generated.kernel_name, path, getattr(module, generated.kernel_name),
                                 generated.captured)
        _KERNELS[key] = kernel
        _STATS["generated"] += 1
        return kernel


def generated_kernel_count() -> int:
    """How many distinct kernels this process has generated and loaded (for recompilation tests)."""
    return _STATS["generated"]
