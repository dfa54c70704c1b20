"""Generated ``@triton.jit`` functions for a (mask_mod, score_mod) pair: the only generated source.

The kernels (``kernels/attention/``, ``kernels/refine.py``, and any new kernel family) are ordinary
``@triton.jit`` code. What varies per user mod is emitted here from the traced graphs, by the
``Emitter`` of ``expressions.py``, as small ``@triton.jit`` functions in a module file in the cache
directory (Triton reads source through ``inspect``), imported, and handed to a kernel as
``tl.constexpr`` arguments. The interface, for any kernel that wants a user's mods:

Get them: ``mod_functions(mask, score, mask_mode=..., derivative=False) -> ModFunctions``, with
``mask`` / ``score`` the ``TracedMod`` of ``masks.tracing.trace_mask_mod`` / ``trace_score_mod``
(or None). Memoized per graph structure (``TracedMod.key``), never per Python callable.
``ModFunctions`` holds:

- ``mask_fn``: ``MASK_FN(batch, head, q_idx, kv_idx, *mask_captured) -> keep`` (bool; a tile
  broadcast from the index shapes, or a scalar/literal when the mask ignores them). ``mask_mode``:
  ``MASK_TRACED`` -- the mask_mod's graph; ``MASK_NONE`` -- ``predicates.keep_all`` (no partial
  block, the predicate is never needed); ``MASK_BITMASK`` -- ``predicates.bitmask_keep`` for
  mask_mods that cannot be traced (its captured tuple is built by the launcher from the
  per-block bits, see ``kernels/attention/fallback.py``).
- ``score_fn``: ``SCORE_FN(score, batch, head, q_idx, kv_idx, *score_captured) -> modified score``
  in natural units (float32, shaped like ``score``): the score_mod itself, applied to
  ``qk * scale``; the kernel multiplies by ``log2(e)`` for its base-2 softmax. None without a
  score_mod (then a kernel uses ``qk * scale * log2(e)`` directly).
- with ``derivative=True``: ``score_grad_fn``: ``SCORE_GRAD_FN(score, ...same...) -> (modified
  score, d modified / d score)``, both float32 tiles, sharing subexpressions; it is None when the
  derivative does not vary, and then ``score_grad_constant`` is that constant (1.0 without a
  score_mod). Raises ``derivative.NotDifferentiableError``.

Index arguments: ``batch`` and ``head`` are scalars, ``q_idx`` / ``kv_idx`` int32 tiles that
broadcast against each other (``[BLOCK_M, 1]`` and ``[1, BLOCK_N]``, or transposed, or ``[1, N]``
for a single query row); the emitted code only broadcasts. Integer ``//``, ``%`` follow Python
(floor) semantics; loads from captured tensors are bounds-masked.

Captured tensors: each captured tensor of a mod becomes ``1 + 2 * rank`` arguments -- its
pointer, then its sizes, then its strides (elements). A launcher passes them as ONE tuple per mod,
``captured_tuple(traced.captured, device)`` (bool tensors travel as int8 views), and a kernel
takes that tuple as an ordinary argument and unpacks it at the call:
``keep = MASK_FN(batch, head, q_idx, kv_idx, *mask_captured)``. An empty tuple is fine. The
ahead-of-time signature of the tuple is the tuple of its element types (``("*i64", "i32", "i32")``;
``tuning.aot.build_signature`` derives it from the values).
Triton specializes the ints inside a tuple like any int argument (value 1, divisibility by 16);
``do_not_specialize`` does not reach into tuples, so a few compiled variants per shape class exist.

Generated module source (the ``<key>.py`` file in ``jit.modules.cache_dir()``) holds only these
functions -- ``mask_mod``, ``score_mod``, ``score_mod_and_grad`` -- never a kernel body.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from ...masks.tracing import TracedMod
from . import derivative
from .expressions import CodegenError, Emitter
from .modules import KernelMemo, load_module

# Bump when the emitted functions change: part of every generated module's cache key.
CODEGEN_VERSION = 4  # 4: log1p(inf) is inf; new float functions (lowering.py)

MASK_NONE = "none"        # every visited block is full: the predicate never runs
MASK_TRACED = "traced"    # the mask_mod's graph, emitted as ``mask_mod``
MASK_BITMASK = "bitmask"  # untraceable mask_mod: per-partial-block bits (``predicates.bitmask_keep``)
MASK_MODES = (MASK_NONE, MASK_TRACED, MASK_BITMASK)

INDEX_PARAMS = ("batch", "head", "q_idx", "kv_idx")
CAPTURED_PREFIX = "cap"

# torch dtype -> Triton's type name (for ahead-of-time signatures of captured tensors).
TRITON_DTYPES = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
    torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8",
    torch.bool: "i8",  # bool tensors travel as int8 views (0/1)
}


def captured_params(captured: Sequence[torch.Tensor]) -> List[str]:
    """Parameter names of the captured tensors, in tuple order: ``cap0, cap0_size0.., cap0_stride0..``."""
    names = []
    for slot, tensor in enumerate(captured):
        pointer = f"{CAPTURED_PREFIX}{slot}"
        names.append(pointer)
        names.extend(f"{pointer}_size{d}" for d in range(tensor.dim()))
        names.extend(f"{pointer}_stride{d}" for d in range(tensor.dim()))
    return names


def captured_tuple(captured: Sequence[torch.Tensor], device: torch.device) -> tuple:
    """The kernel argument for one mod's captured tensors: (pointer, sizes.., strides..) per tensor."""
    values = []
    for tensor in captured:
        if tensor.device != device:
            tensor = tensor.to(device)
        if tensor.dtype == torch.bool:
            # The emitted code compares against 0. int8, not uint8: Triton 3.4's compiler rejects a
            # uint8 pointer inside a tuple argument.
            tensor = tensor.view(torch.int8)
        values.append(tensor)
        values.extend(int(s) for s in tensor.shape)
        values.extend(int(s) for s in tensor.stride())
    return tuple(values)


def check_graph(traced: TracedMod) -> None:
    """Raise ``CodegenError`` if ``traced`` cannot be emitted as Triton code."""
    Emitter("v", CAPTURED_PREFIX).value(traced.graph)


# ---------------------------------------------------------------------------------------------
# Source
# ---------------------------------------------------------------------------------------------

def _function(name: str, params: Sequence[str], body: Sequence[str], returns: str) -> str:
    lines = ["@triton.jit", f"def {name}({', '.join(params)}):"]
    lines += [f"    {line}" for line in body]
    lines.append(f"    return {returns}")
    return "\n".join(lines) + "\n"


def mask_source(mask: TracedMod) -> str:
    """``mask_mod(batch, head, q_idx, kv_idx, *captured) -> keep``; raises ``CodegenError``."""
    emitter = Emitter("v", CAPTURED_PREFIX)
    result = emitter.value(mask.graph)
    return _function("mask_mod", list(INDEX_PARAMS) + captured_params(mask.captured), emitter.lines, result.text)


def _score_value(emitter: Emitter, score: TracedMod) -> str:
    value = emitter.value(score.graph)
    if value.is_const:
        return f"tl.full(score.shape, {emitter.as_float(value)}, tl.float32)"
    # A score_mod that ignores ``score`` may give a scalar or a row: widen it to the score tile.
    return f"tl.broadcast_to({emitter.as_float(value)}, score.shape)"


def score_source(score: TracedMod, fast_tanh: bool = False) -> str:
    """``score_mod(score, batch, head, q_idx, kv_idx, *captured) -> score`` (natural units)."""
    emitter = Emitter("v", CAPTURED_PREFIX, fast_tanh=fast_tanh)
    returns = _score_value(emitter, score)
    params = ["score"] + list(INDEX_PARAMS) + captured_params(score.captured)
    return _function("score_mod", params, emitter.lines, returns)


def score_grad_source(score: TracedMod, fast_tanh: bool = False) -> Optional[str]:
    """``score_mod_and_grad(...) -> (score, d score / d input score)``; None for a constant derivative."""
    grad_graph = derivative.score_derivative(score.graph)
    if derivative.is_constant(grad_graph):
        return None
    # One emitter: value and derivative share subexpressions. The value's statements come first and
    # are those of ``score_source``: forward and backward compute the same scores.
    emitter = Emitter("v", CAPTURED_PREFIX, fast_tanh=fast_tanh)
    value = _score_value(emitter, score)
    grad = emitter.value(grad_graph)
    params = ["score"] + list(INDEX_PARAMS) + captured_params(score.captured)
    return _function("score_mod_and_grad", params, emitter.lines, f"{value}, {emitter.as_float(grad)}")


@dataclass(frozen=True)
class ModFunctions:
    """The ``@triton.jit`` functions of one (mask_mod, score_mod) pair; see the module docstring."""

    key: str
    mask_mode: str
    mask_fn: object
    score_fn: Optional[object]
    score_grad_fn: Optional[object]
    score_grad_constant: float
    path: Optional[Path]

    @property
    def name(self) -> str:
        """A short label for kernel names and reports."""
        return f"{self.mask_mode}_{self.key[:8]}"


def functions_key(mask_mode: str, mask: Optional[TracedMod], score: Optional[TracedMod], derivative_too: bool,
                  fast_tanh: bool = False) -> str:
    parts = [f"fn{CODEGEN_VERSION}", mask_mode, mask.key if mask is not None and mask_mode == MASK_TRACED else "-",
             score.key if score is not None else "-", "d" if derivative_too else ""]
    if fast_tanh:
        parts.append("fast_tanh")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def module_source(mask_mode: str, mask: Optional[TracedMod], score: Optional[TracedMod], derivative_too: bool,
                  fast_tanh: bool = False) -> Tuple[str, float]:
    """(module source, constant score derivative) for these mods; raises ``CodegenError`` /
    ``derivative.NotDifferentiableError``. The source holds only the generated functions."""
    key = functions_key(mask_mode, mask, score, derivative_too, fast_tanh)
    mask_name = mask.name if mask is not None else mask_mode
    score_name = score.name if score is not None else "none"
    parts = [f'"""Generated by triton_attn.kernels.jit.functions; do not edit.\n\n'
             f"mask_mod: {mask_name!r} ({mask_mode}); score_mod: {score_name!r}; key {key}\n"
             f'"""\n\nimport triton\nimport triton.language as tl\n']
    if mask_mode == MASK_TRACED:
        parts.append(mask_source(mask))
    grad_constant = 1.0
    if score is not None:
        parts.append(score_source(score, fast_tanh))
        if derivative_too:
            grad = score_grad_source(score, fast_tanh)
            if grad is None:
                grad_constant = float(derivative.score_derivative(score.graph).args[0])
            else:
                parts.append(grad)
    return "\n\n".join(parts), grad_constant


_FUNCTIONS = KernelMemo()


def mod_functions(mask: Optional[TracedMod], score: Optional[TracedMod], *, mask_mode: Optional[str] = None,
                  derivative: bool = False, fast_tanh: bool = False) -> ModFunctions:
    """The generated functions for (``mask``, ``score``), from memory, the cache directory, or fresh.

    ``mask_mode`` defaults to ``MASK_TRACED`` when ``mask`` is given, else ``MASK_NONE``.
    ``derivative=True`` also builds ``score_grad_fn`` (the backward kernels need it).
    ``fast_tanh=True``: score functions use the hardware ``tanh.approx.f32`` (CUDA, 16-bit inputs).
    """
    from . import predicates

    mode = mask_mode or (MASK_TRACED if mask is not None else MASK_NONE)
    if mode not in MASK_MODES:
        raise ValueError(f"mask_mode must be one of {', '.join(MASK_MODES)}, got {mode!r}")
    if mode == MASK_TRACED and mask is None:
        raise ValueError("mask_mode 'traced' needs the traced mask_mod")
    key = functions_key(mode, mask, score, derivative, fast_tanh)

    def make() -> ModFunctions:
        fixed_mask = {MASK_NONE: predicates.keep_all, MASK_BITMASK: predicates.bitmask_keep}.get(mode)
        if fixed_mask is not None and score is None:
            return ModFunctions(key, mode, fixed_mask, None, None, 1.0, None)
        source, grad_constant = module_source(mode, mask, score, derivative, fast_tanh)
        module, path = load_module(f"mods_{key}", source)
        return ModFunctions(key, mode, fixed_mask or module.mask_mod, getattr(module, "score_mod", None),
                            getattr(module, "score_mod_and_grad", None), grad_constant, path)

    return _FUNCTIONS.get(key, make)


def generated_count() -> int:
    """How many distinct function modules this process has built (for recompilation tests)."""
    return _FUNCTIONS.generated


__all__ = ["CodegenError", "ModFunctions", "mod_functions", "captured_tuple", "captured_params", "check_graph",
           "MASK_NONE", "MASK_TRACED", "MASK_BITMASK"]
