"""Which path a call takes, decided in one place: ``plan_call(...) -> Route``.

Every entry point (``attention``, ``flex_attention``, ``paged_attention``, the model attention functions
through them) validates its arguments, asks ``plan_call`` / ``plan_paged_call`` once, and hands the
``Route`` to whoever runs it (``backends/run.py`` directly, or the custom ops, which carry the route as a
string). Nothing downstream decides again: a launcher runs the kernel family it is given.

A route names four things:

- ``backend``: ``triton`` (CUDA), ``interpret`` (the same kernels on CPU tensors), ``torch`` (PyTorch).
- ``family``: the algorithm. Triton backends: ``prefill`` (the flash forward/backward kernels),
  ``decode`` (the split-KV kernel, Lq <= 16 and no gradient), ``paged``. Torch backend: ``sdpa``
  (PyTorch's own fused attention, where it computes the call exactly), ``cpu_flash`` (PyTorch's fused CPU
  kernel over the mask's tiles, float32 inference), ``blockwise`` (the tile-by-tile loop), ``dense``
  (calls with dropout whose mask ``sdpa`` would take: chunks of query rows against all their keys),
  ``paged`` (pages read a chunk at a time; gathered, then blockwise, with gradients).
- ``call``: ``op`` (the ``torch.library`` ops: ``torch.compile`` and ``opcheck`` see them) or ``direct``.
- ``backward``: ``none`` (no gradient needed), ``kernels`` (the Triton backward kernels, P from the
  forward's softmax statistics), ``blockwise`` (PyTorch recomputes one query-block row at a time: the
  torch backend, and score_mods whose captured tensors need gradients), ``sdpa`` (PyTorch's), ``dense``
  (the dense route's explicit backward).

A call with dropout (``dropout_p > 0``) runs where the keep decisions are ours, so that the backward and
``return_dropout_mask`` regenerate them from the seed: the ``prefill`` kernels (never ``decode``) and the
torch backend's ``dense`` route (eager CPU, no score_mod, a mask ``sdpa`` would take) or ``blockwise`` loop
(never ``sdpa`` / ``cpu_flash``: PyTorch's kernels cannot give the mask).

``TRITON_ATTN_LOG=route`` prints each distinct route (with the reasons) the first time a call takes it;
``triton-attn explain`` prints the route of a described call without running it.
"""

from __future__ import annotations

import functools
import sys
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from . import settings
from .kernels.decode.configs import MAX_DECODE_Q_LEN  # query rows up to which the decode kernel runs (no Triton)
from .masks.block_mask import BlockMask
from .masks.closure import StructuredMod, captured_tensors
from .masks.compact import CompactBlockMask
from .masks.evaluate import mod_name
from .masks.recognize import is_causal

__all__ = ["Route", "plan_call", "call_backend", "plan_paged_call", "grad_needed", "choose_backend", "BACKENDS",
           "MAX_DECODE_Q_LEN", "DROPOUT_FAMILIES",
           "ScoreModFallbackWarning", "score_mod_fallback_reason", "structured_fallback_reason"]

BACKENDS = ("torch", "triton", "interpret")
FAMILIES = ("prefill", "decode", "paged", "sdpa", "cpu_flash", "blockwise", "dense")
BACKWARDS = ("none", "kernels", "blockwise", "sdpa", "dense")
# The families that apply a call's dropout (their keep decisions come from its seed).
DROPOUT_FAMILIES = ("prefill", "blockwise", "dense")

_SHORT_QUERY = f"no gradient; Lq <= {MAX_DECODE_Q_LEN}: split-KV decode kernel"
_DROPOUT_PREFILL = f"no gradient; dropout (Lq <= {MAX_DECODE_Q_LEN}): prefill kernel, the decode kernel has none"
_DROPOUT_TORCH = "dropout: PyTorch's fused kernels cannot give the keep mask"
_DENSE_REASONS = {mask: f"dropout over whole rows of keys (mask: {mask})" for mask in ("none", "causal", "dense")}

# PyTorch's fused CPU attention computes these exactly (within the numerics rule): backends/torch/sdpa.py's
# SDPA_DTYPES (tests/test_dispatch.py checks that they agree).
SDPA_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Mask elements (Bm * Lq * Lkv) up to which a mask is materialized as a dense tensor for PyTorch's fused kernel.
DENSE_MASK_ELEMENTS = 1 << 22
# Larger masks (up to DENSE_MASK_MAX_ELEMENTS) go dense in training when at least this fraction of their tiles is
# computed: PyTorch's dense kernel then beats skipping the rest (prefix-LM, 4k tokens: bench/results/attention_*).
DENSE_MASK_MAX_ELEMENTS = 1 << 26
DENSE_MASK_MIN_DENSITY = 0.35
# Scores of 16 query rows against all keys ([B, Hq, 16, Lkv]) up to which a call with dropout may take the dense
# route (it holds a few buffers of that size); longer rows of keys take the blockwise loop.
DENSE_DROPOUT_ROW_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class Route:
    """The path of one call (see the module docstring). ``sdpa_mask``: for the ``sdpa`` and ``dense`` families,
    how the mask reaches PyTorch's kernel or the dense route (``none``, ``causal``, ``dense``); ``reasons``:
    why, in words."""

    backend: str
    family: str
    call: str
    backward: str
    sdpa_mask: str = ""
    reasons: Tuple[str, ...] = ()
    tiles: bool = False  # the forward runs the caller's fixed tiles (Flex's kernel_options)

    @property
    def token(self) -> str:
        """The route as the custom ops carry it (a string argument): ``backend/family/backward``."""
        return f"{self.backend}/{self.family}/{self.backward}"

    @classmethod
    def from_token(cls, token: str) -> "Route":
        backend, family, backward = token.split("/")
        if backend not in BACKENDS or family not in FAMILIES or backward not in BACKWARDS:
            raise ValueError(f"not a route: {token}")
        return _interned(backend, family, "op", backward, "", [])

    @property
    def interpret(self) -> bool:
        return self.backend == "interpret"

    @property
    def saves_stats(self) -> bool:
        """Whether the forward keeps the softmax statistics the Triton backward recomputes P from."""
        return self.backward == "kernels"

    def __str__(self) -> str:
        mask = f" sdpa_mask={self.sdpa_mask}" if self.sdpa_mask else ""
        why = f" -- {'; '.join(self.reasons)}" if self.reasons else ""
        return (f"route: backend={self.backend} family={self.family} call={self.call} "
                f"backward={self.backward}{mask}{why}")


_ROUTES: dict = {}
MAX_INTERNED_ROUTES = 4096


def _interned(backend: str, family: str, call: str, backward: str, sdpa_mask: str, reasons: list,
              tiles: bool = False) -> Route:
    """The ``Route`` of these fields, one object per distinct route: a decode loop builds none."""
    fields = (backend, family, call, backward, sdpa_mask, tuple(reasons), tiles)
    route = _ROUTES.get(fields)
    if route is None:
        if len(_ROUTES) >= MAX_INTERNED_ROUTES:  # reasons naming many different score_mods
            _ROUTES.clear()
        route = _ROUTES[fields] = Route(*fields)
    return route


def choose_backend(backend: Optional[str], device: torch.device) -> str:
    """``backend`` if given, else ``TRITON_ATTN_BACKEND``, else triton on CUDA and torch elsewhere."""
    chosen = backend or settings.backend() or ("triton" if device.type == "cuda" else "torch")
    if chosen not in BACKENDS:
        source = "backend" if backend else settings.BACKEND
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}, got {chosen!r}")
    if chosen == "triton" and device.type != "cuda":
        raise ValueError(f"backend 'triton' needs CUDA tensors, got tensors on {device}; "
                         "use backend='interpret' (Triton interpreter) or 'torch' on CPU")
    if chosen == "interpret" and device.type != "cpu":
        raise ValueError(f"backend 'interpret' runs the Triton interpreter on CPU tensors, got tensors on {device}")
    return chosen


def call_backend(query: torch.Tensor, score_mod: Optional[Callable],
                 backend: Optional[str]) -> Tuple[str, Tuple[str, ...]]:
    """The first decision of ``plan_call``, which entry points take before checking the BlockMask (so a
    call's errors come in a fixed order): ``(backend, reasons)``. A score_mod the Triton kernels cannot
    compile moves the call to the torch backend (one warning); float64 on a Triton backend is a TypeError."""
    chosen = choose_backend(backend, query.device)
    reasons: Tuple[str, ...] = ()
    if chosen != "torch" and score_mod is not None:
        fallback = score_mod_fallback(score_mod, grad_needed(query))
        if fallback is not None:
            chosen, reasons = "torch", (f"score_mod {mod_name(score_mod)!r} cannot be compiled ({fallback})",)
    if chosen != "torch" and query.dtype == torch.float64:
        raise TypeError(f"query/key/value must be float16, bfloat16 or float32 on backend {chosen!r}, got float64")
    return chosen, reasons


def grad_needed(*tensors: torch.Tensor) -> bool:
    """Whether a call's result needs a gradient: autograd on and an input requiring one."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def plan_call(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask,
              score_mod: Optional[Callable], *, backend: Optional[str], fixed_config: bool = False,
              chosen: Optional[Tuple[str, Tuple[str, ...]]] = None, dropout: bool = False) -> Route:
    """The route of an ``attention()`` call (inputs validated; ``block_mask`` the call's, or the default
    all-full mask). ``fixed_config``: the caller fixes the forward kernel's tiles (Flex's
    ``kernel_options``), which only a forward without gradients on a Triton backend takes
    (``Route.tiles``). ``chosen``: ``call_backend``'s answer when the caller asked it first.
    ``dropout``: the call drops probabilities (a family of ``DROPOUT_FAMILIES``). Raises TypeError for
    float64 inputs on a Triton backend."""
    compiling = torch.compiler.is_compiling()
    if chosen is None:
        chosen = call_backend(query, score_mod, backend)
    backend_name, first_reasons = chosen
    reasons = list(first_reasons)
    needs_grad = grad_needed(query, key, value)
    learnable = bool(score_mod is not None and torch.is_grad_enabled() and not compiling
                     and any(t.requires_grad for t in captured_tensors(score_mod)))
    needs_grad = needs_grad or learnable
    if backend_name == "torch":
        return _torch_route(query, key, value, block_mask, score_mod, needs_grad, learnable, compiling, reasons,
                            dropout)
    compact = isinstance(block_mask, CompactBlockMask)
    fixed_config = fixed_config and not needs_grad
    if not needs_grad:
        short = query.shape[2] <= MAX_DECODE_Q_LEN
        family = "decode" if short and not fixed_config and not dropout else "prefill"
        reasons.append("no gradient; kernel_options fix the prefill tiles" if fixed_config
                       else _SHORT_QUERY if family == "decode" else _DROPOUT_PREFILL if short
                       else "no gradient; Lq > 16: prefill kernel")
        backward = "none"
    else:
        family, backward = "prefill", "blockwise" if learnable else "kernels"
        reasons.append("score_mod tensors need gradients: PyTorch recomputes the backward" if learnable
                       else "gradients: Triton backward kernels")
    direct = compact or learnable or fixed_config
    if direct:
        reasons.append("direct: " + ("a compact BlockMask (the ops take dense index lists)" if compact
                                     else "kernel_options tiles" if fixed_config else "learnable score_mod tensors"))
    return _logged(_interned(backend_name, family, "direct" if direct else "op", backward, "", reasons, fixed_config),
                   compiling)


_SDPA_REASONS = {mask: f"PyTorch's fused attention computes it exactly (mask: {mask})"
                 for mask in ("none", "causal", "dense")}
_CPU_FLASH_REASON = "float32 CPU inference: PyTorch's fused CPU kernel over the mask's tiles"
_BLOCKWISE_REASONS = {False: "blockwise PyTorch", True: "blockwise PyTorch: learnable score_mod tensors"}


def _torch_route(query, key, value, block_mask: BlockMask, score_mod, needs_grad: bool, learnable: bool,
                 compiling: bool, reasons: list, dropout: bool) -> Route:
    """The torch backend's route: PyTorch's fused kernels where they compute the call exactly (without
    dropout), else blockwise."""
    cpu = query.device.type == "cpu"
    cpu_eager = cpu and not compiling
    mask_batch, mask_heads = block_mask.shape[:2]
    if dropout:
        reasons.append(_DROPOUT_TORCH)
        rows_fit = query.shape[0] * query.shape[1] * 16 * key.shape[2] <= DENSE_DROPOUT_ROW_ELEMENTS
        dense_mask = (_dense_dropout_mask(block_mask, mask_batch, mask_heads)
                      if cpu_eager and score_mod is None and rows_fit else "")
        if dense_mask:
            reasons.append(_DENSE_REASONS[dense_mask])
            return _logged(_interned("torch", "dense", "direct", "dense" if needs_grad else "none", dense_mask,
                                     reasons), compiling)
    fused_ok = not dropout and score_mod is None and key.shape[-1] == value.shape[-1] and _fused_cpu_ops()
    sdpa_mask = _sdpa_mask(query, block_mask, mask_batch, mask_heads, needs_grad) if cpu_eager and fused_ok else ""
    if sdpa_mask:
        reasons.append(_SDPA_REASONS[sdpa_mask])
        return _logged(_interned("torch", "sdpa", "direct", "sdpa" if needs_grad else "none", sdpa_mask, reasons),
                       compiling)
    # Eager CPU calls without gradients skip the op (its dispatcher and mod table are host time on every
    # decode step); compact masks and learnable score tensors keep the direct autograd through PyTorch.
    direct = (cpu_eager and not needs_grad) or isinstance(block_mask, CompactBlockMask) or learnable
    call = "direct" if direct else "op"
    if not needs_grad and cpu and fused_ok and query.dtype == torch.float32 and mask_heads == 1:
        # float32 inference, no score_mod, a mask shared by all heads, D == Dv: backends/torch/cpu_flash.py
        reasons.append(_CPU_FLASH_REASON)
        return _logged(_interned("torch", "cpu_flash", call, "none", "", reasons), compiling)
    reasons.append(_BLOCKWISE_REASONS[learnable])
    return _logged(_interned("torch", "blockwise", call, "blockwise" if needs_grad else "none", "", reasons),
                   compiling)


def _sdpa_mask(query, block_mask: BlockMask, mask_batch: int, mask_heads: int, needs_grad: bool) -> str:
    """How PyTorch's fused CPU attention takes this call exactly ("none" / "causal" / "dense"), or "".

    Exact means (the caller checked no score_mod and D == Dv): a dtype it computes within the numerics
    rule, and a mask it represents -- every tile full (no mask), the causal family recognized from the
    traced mask_mod with a layout built from it, or a mask small enough to materialize, or dense enough
    that skipping tiles gains less than PyTorch's kernel (training only: inference has the cached dense
    route of ``cpu_flash``, shared by a model's layers)."""
    if query.dtype not in SDPA_DTYPES:
        return ""
    if getattr(block_mask, "visits_every_tile", False):
        return "none"
    if not block_mask.exact_layout:
        return ""
    q_len, kv_len = block_mask.seq_lengths
    elements = mask_batch * q_len * kv_len
    dense_small = elements <= DENSE_MASK_ELEMENTS
    if not needs_grad and dense_small and query.dtype == torch.float32:
        return ""  # cpu_flash's dense route: one fused call with a bias cached on the mask
    if mask_heads == 1 and is_causal(block_mask.mask_mod):
        return "causal"
    if not needs_grad or mask_heads != 1:
        return ""
    if dense_small:
        return "dense"
    dense_enough = 100.0 - block_mask.sparsity() >= 100.0 * DENSE_MASK_MIN_DENSITY
    return "dense" if elements <= DENSE_MASK_MAX_ELEMENTS and dense_enough else ""


def _dense_dropout_mask(block_mask: BlockMask, mask_batch: int, mask_heads: int) -> str:
    """How the dense dropout route (``backends/torch/dense.py``) takes this mask (``none`` / ``causal`` /
    ``dense``), or "": the masks ``_sdpa_mask`` gives PyTorch's kernel with gradients (any dtype: the route
    computes in float32 or float64). Sparser masks keep the blockwise loop, which skips empty tiles."""
    if getattr(block_mask, "visits_every_tile", False):
        return "none"
    if not block_mask.exact_layout or mask_heads != 1:
        return ""
    if is_causal(block_mask.mask_mod):
        return "causal"
    q_len, kv_len = block_mask.seq_lengths
    elements = mask_batch * q_len * kv_len
    if elements <= DENSE_MASK_ELEMENTS:
        return "dense"
    dense_enough = 100.0 - block_mask.sparsity() >= 100.0 * DENSE_MASK_MIN_DENSITY
    return "dense" if elements <= DENSE_MASK_MAX_ELEMENTS and dense_enough else ""


@functools.lru_cache(maxsize=None)
def _fused_cpu_ops() -> bool:
    """Whether this torch build has PyTorch's fused CPU attention ops (forward and backward)."""
    return (hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
            and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward"))


def plan_paged_call(dtype: torch.dtype, device: torch.device, *, needs_grad: bool, backend: Optional[str]) -> Route:
    """The route of a ``paged_attention`` call or ``plan_paged`` plan (inputs of ``dtype`` on ``device``; a
    plan has no query yet, so ``needs_grad`` is False there and its ``run`` refuses gradients on a Triton
    route): the paged decode kernel, or pages attended on the torch backend. Raises for float64 on a Triton
    backend and for gradients there (inference only)."""
    chosen = choose_backend(backend, device)
    if chosen != "torch" and dtype == torch.float64:
        raise TypeError(f"query/key_cache/value_cache must be float16, bfloat16 or float32 on backend {chosen!r}, "
                        "got float64")
    if chosen != "torch" and needs_grad:
        raise NotImplementedError(f"paged_attention has no backward pass on backend {chosen!r} (it serves inference); "
                                  "call it under torch.no_grad(), detach the inputs, or use backend='torch'")
    reason = "pages attended on PyTorch" if chosen == "torch" else "paged split-KV kernel"
    return _logged(Route(chosen, "paged", "direct", "blockwise" if needs_grad else "none", "", (reason,)),
                   torch.compiler.is_compiling())


_LOGGED: set = set()


def _logged(route: Route, compiling: bool) -> Route:
    """``route``, printed to stderr the first time a call takes it when ``TRITON_ATTN_LOG`` names ``route``
    (never while torch.compile traces: printing there would break the graph)."""
    if not compiling and settings.log_routes() and route not in _LOGGED:
        _LOGGED.add(route)
        print(f"triton_attn {route}", file=sys.stderr)
    return route


# -- score_mods the Triton kernels cannot compile ------------------------------------------------------

class ScoreModFallbackWarning(UserWarning):
    """A score_mod the Triton kernels cannot compile runs on the PyTorch blockwise backend instead."""


_FALLBACK_WARNED: set = set()

# score_mod -> {needs_grad: reason or None}: the verdict depends on the traced graph's structure, which a
# score_mod keeps across calls, so a decode loop does not re-trace it for this check on every step.
_FALLBACK_VERDICTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def score_mod_fallback_reason(score_mod: Callable, needs_grad: bool) -> Optional[str]:
    """Why the Triton kernels cannot run ``score_mod`` (its value, and its derivative when
    ``needs_grad``); None when they can."""
    try:
        verdicts = _FALLBACK_VERDICTS.setdefault(score_mod, {})
    except TypeError:  # not weakly referenceable: decide every time
        verdicts = {}
    if needs_grad not in verdicts:
        verdicts[needs_grad] = _fallback_reason(score_mod, needs_grad)
    return verdicts[needs_grad]


def _fallback_reason(score_mod: Callable, needs_grad: bool) -> Optional[str]:
    from .kernels.jit import derivative
    from .kernels.jit.expressions import CodegenError, Emitter
    from .masks.tracing import UntraceableModError, trace_score_mod

    try:
        graph = trace_score_mod(score_mod).graph
        Emitter("v", "cap").value(graph)
        if needs_grad:
            Emitter("d", "cap").value(derivative.score_derivative(graph))
    except (UntraceableModError, CodegenError, derivative.NotDifferentiableError) as error:
        return str(error)
    return None


# Inside torch.compile the verdict is a constant of the graph: dynamo runs the check once while tracing (the
# tracer's symbols cannot be traced by dynamo). See mod_table.mod_key for why the mark is set by hand.
score_mod_fallback_reason._dynamo_marked_constant = True


def structured_fallback_reason(mod_type: type, structure: tuple, tensor_specs: tuple,
                               needs_grad: bool) -> Optional[str]:
    """``score_mod_fallback_reason`` of a ``StructuredMod`` from constants only: its stand-in over
    placeholder tensors of the given ``(dtype, rank)`` (a mod built inside a compiled graph cannot be
    passed to a constant function; its structure can)."""
    return _fallback_reason(mod_type.stand_in(structure, tensor_specs), needs_grad)


structured_fallback_reason._dynamo_marked_constant = True


def score_mod_fallback(score_mod: Callable, needs_grad: bool) -> Optional[str]:
    """Why ``score_mod`` runs on the torch backend (warning once per score_mod name), or None: the
    blockwise backend is plain PyTorch, so it runs on the same (CUDA or CPU) tensors, exactly."""
    if torch.compiler.is_compiling() and isinstance(score_mod, StructuredMod):
        specs = tuple((t.dtype, t.dim()) for t in score_mod.tensors())
        reason = structured_fallback_reason(type(score_mod), score_mod.structure(), specs, needs_grad)
    else:
        reason = score_mod_fallback_reason(score_mod, needs_grad)
    if reason is None:
        return None
    name = mod_name(score_mod)
    if name not in _FALLBACK_WARNED:
        _FALLBACK_WARNED.add(name)
        warnings.warn(f"score_mod {name!r} cannot be compiled into the Triton kernel ({reason}); running it on "
                      "the PyTorch blockwise backend instead (exact, slower).", ScoreModFallbackWarning, stacklevel=4)
    return reason
