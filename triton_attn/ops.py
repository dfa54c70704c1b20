"""``attention()`` as a pair of ``torch.library`` custom ops: ``triton_attn::attention_forward`` and
``triton_attn::attention_backward``.

Custom ops are what ``torch.compile`` (fake tensors, ``fullgraph=True``) and ``torch.library.opcheck``
understand. Their arguments can only be tensors, numbers and strings, so a call is flattened:

- a mod (mask_mod or score_mod) travels as a string key into ``MOD_TABLE`` plus the list of tensors
  it captured. A traceable mod's key is its structure hash (``TracedMod.key``: the graph and the
  dtype/rank of each captured tensor), so every mod of one structure shares one entry and one
  kernel, and new captured data (another batch's document ids) is just another tensor list. A mod
  that cannot be traced (the torch backend evaluates it eagerly) is keyed by identity and keeps
  its tensors in its closure.
- the BlockMask travels as its eight index tensors plus ints: BLOCK_SIZE, seq_lengths and its
  ``LaunchPlan`` (so the launch never reads the device to plan itself).

The implementation dispatches on the ``backend`` string: ``torch`` runs ``reference.blockwise_attention``
(whose float32 inference goes to PyTorch's fused CPU flash kernel, ``cpu_flash.py``), ``interpret`` and
``triton`` run the Triton kernels (``kernels.attention.forward_launch.attention_forward`` /
``kernels.attention.backward_launch.attention_backward``). The fake implementations give shapes only,
which is also what makes meta tensors work.
"""

from __future__ import annotations

import collections
import contextlib
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .masks.block_mask import BlockMask, LaunchPlan
from .masks.closure import StructuredMod, positions_by_identity
from .masks.evaluate import mod_name
from .masks.tracing import TracedMod, UntraceableModError, evaluate, trace_mask_mod, trace_score_mod

__all__ = ["MOD_TABLE", "register_mod", "resolve_mod", "rebind_mod", "flatten_block_mask", "unflatten_block_mask", "attention_op", "BoundMod"]

KINDS = ("mask", "score")
# Mods that cannot be traced are kept by identity; at most this many (the oldest are dropped).
EAGER_MOD_LIMIT = 1024


@dataclass
class ModEntry:
    """A mod in the table: its trace (None for an eagerly evaluated mod) and the last callable seen."""

    traced: Optional[TracedMod]
    function: Callable


MOD_TABLE: "collections.OrderedDict[str, ModEntry]" = collections.OrderedDict()


class BoundMod:
    """A traced mod's graph bound to new captured tensors: callable like the mod it was traced from.

    The torch backend calls it on index tensors (the graph is evaluated by ``tracing.evaluate``);
    the kernels read ``traced_mod`` instead of tracing it again.
    """

    def __init__(self, traced: TracedMod, captured: Sequence[torch.Tensor]):
        self.traced_mod = TracedMod(traced.kind, traced.graph, list(captured), traced.name)
        self.__name__ = traced.name

    def __call__(self, *args):
        names = ("score",) + tuple(("b", "h", "q_idx", "kv_idx")) if self.traced_mod.kind == "score" \
            else ("b", "h", "q_idx", "kv_idx")
        return evaluate(self.traced_mod, dict(zip(names, args)), self.traced_mod.captured)


def _trace(mod: Callable, kind: str) -> TracedMod:
    return trace_mask_mod(mod) if kind == "mask" else trace_score_mod(mod)


def register_mod(mod: Optional[Callable], kind: str) -> Tuple[str, List[torch.Tensor]]:
    """``(key, captured tensors)`` of ``mod`` in ``MOD_TABLE`` (``("", [])`` for None)."""
    if mod is None:
        return "", []
    try:
        traced = _trace(mod, kind)
    except (UntraceableModError, TypeError):
        key = f"{kind}/eager/{id(mod)}"
        MOD_TABLE[key] = ModEntry(None, mod)
        MOD_TABLE.move_to_end(key)
        eager = [k for k, entry in MOD_TABLE.items() if entry.traced is None]
        for stale in eager[:max(0, len(eager) - EAGER_MOD_LIMIT)]:
            del MOD_TABLE[stale]
        # A StructuredMod's tensors travel even when it is evaluated eagerly: resolve_mod rebuilds it over them.
        return key, list(mod.tensors()) if isinstance(mod, StructuredMod) else []
    key = f"{kind}/{traced.key}"
    MOD_TABLE[key] = ModEntry(traced, mod)
    return key, list(traced.captured)


def resolve_mod(key: str, captured: Sequence[torch.Tensor]) -> Optional[Callable]:
    """The callable behind ``key`` with ``captured`` as its tensors: the registered mod itself when they
    are the tensors it captured, else its graph bound to them (``BoundMod``)."""
    if not key:
        return None
    entry = MOD_TABLE.get(key)
    if entry is None:
        raise KeyError(f"triton_attn: mod key {key!r} is not in the mod table (an untraceable mod was dropped "
                       f"after {EAGER_MOD_LIMIT} newer ones, or the key comes from another process)")
    own = entry.function.tensors() if entry.traced is None and isinstance(entry.function, StructuredMod) \
        else () if entry.traced is None else entry.traced.captured
    if len(own) == len(captured) and all(a is b for a, b in zip(own, captured)):
        return entry.function
    if entry.traced is None:  # an untraceable StructuredMod over other tensors
        return type(entry.function).build(entry.function.structure(), tuple(captured))
    return BoundMod(entry.traced, captured)


def rebind_mod(mod: Callable, kind: str, captured: Sequence[torch.Tensor]) -> Callable:
    """``mod`` reading ``captured`` in place of the tensors it captured (``register_mod``'s order): ``mod``
    itself when they are its own tensors, else its traced graph bound to them. For a ``StructuredMod``
    that holds a user mod in its structure and that mod's tensors apart (``build``)."""
    key, _ = register_mod(mod, kind)
    return resolve_mod(key, captured)


# id(kv_num_blocks) -> (weakref to that tensor, weakref to its BlockMask): the op's implementation finds
# the caller's BlockMask again, with what it cached (e.g. the CPU fast path's bias, derived once per mask
# and shared by every layer of a model), instead of a fresh object that would derive it on every call.
_ORIGINALS: Dict[int, Tuple["weakref.ref", "weakref.ref"]] = {}


def _remember(block_mask: BlockMask) -> None:
    anchor = block_mask.kv_num_blocks
    entry = _ORIGINALS.get(id(anchor))
    if entry is not None and entry[0]() is anchor and entry[1]() is block_mask:
        return
    for stale in [k for k, (tensor_ref, mask_ref) in _ORIGINALS.items() if tensor_ref() is None or mask_ref() is None]:
        del _ORIGINALS[stale]
    try:
        _ORIGINALS[id(anchor)] = (weakref.ref(anchor), weakref.ref(block_mask))
    except TypeError:  # not weak-referenceable (e.g. a fake tensor): nothing to reuse
        pass


def _original(layout: Sequence[torch.Tensor], mask_mod) -> Optional[BlockMask]:
    entry = _ORIGINALS.get(id(layout[0]))
    if entry is None or entry[0]() is not layout[0]:
        return None
    block_mask = entry[1]()
    if block_mask is None or block_mask.mask_mod is not mask_mod:
        return None
    same = all(getattr(block_mask, name) is tensor for name, tensor in zip(BlockMask._TENSOR_FIELDS, layout))
    return block_mask if same else None


def flatten_block_mask(block_mask: BlockMask) -> Tuple[List[torch.Tensor], List[int]]:
    """The BlockMask as op arguments: its eight index tensors, and the ints
    ``[Q_BLOCK, KV_BLOCK, Q_LEN, KV_LEN, *launch plan]`` (the plan travels along, so the rebuilt mask
    never reads the device to plan a launch or to classify its sparsity for the tuning key)."""
    plan = block_mask.launch_plan
    if not torch.compiler.is_compiling():
        _remember(block_mask)
    ints = [*block_mask.BLOCK_SIZE, *block_mask.seq_lengths, plan.max_partial_blocks, plan.max_full_blocks,
            plan.max_partial_q_blocks, plan.max_full_q_blocks, int(plan.exact), plan.computed_blocks]
    return [getattr(block_mask, name) for name in BlockMask._TENSOR_FIELDS], ints


def unflatten_block_mask(layout: Sequence[torch.Tensor], ints: Sequence[int], mask_mod) -> BlockMask:
    """Inverse of ``flatten_block_mask``, with ``mask_mod`` as the mask's predicate (no device read): the
    caller's own BlockMask when these are its tensors and its mask_mod, else a new one."""
    original = _original(layout, mask_mod)
    if original is not None:
        return original
    fields = dict(zip(BlockMask._TENSOR_FIELDS, layout))
    plan = LaunchPlan(*ints[4:8], exact=bool(ints[8]), computed_blocks=ints[9])
    return BlockMask(**fields, BLOCK_SIZE=(ints[0], ints[1]), seq_lengths=(ints[2], ints[3]), mask_mod=mask_mod,
                     launch_plan=plan)


def _autotune_flag(value: int) -> Optional[bool]:
    return None if value < 0 else bool(value)


@contextlib.contextmanager
def _autograd_inside_op():
    """Record autograd inside an op's implementation, which the dispatcher runs below autograd.

    The torch backend's backward recomputes each query-block row with autograd (the score_mod is a
    Python callable, differentiated by PyTorch). Below the autograd dispatch keys nothing would be
    recorded, so the autograd keys are taken out of this thread's excluded set for the duration.
    """
    excluded = torch._C._dispatch_tls_local_exclude_set()
    for dispatch_key in (torch._C.DispatchKey.AutogradCPU, torch._C.DispatchKey.AutogradCUDA):
        excluded = excluded.remove(dispatch_key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded), \
            torch.enable_grad():
        yield


# ---------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------

# Defined with torch.library.define/impl rather than the custom_op decorator: the decorator's wrapper
# imports torch._dynamo on the first call (over a second), which an eager call must not pay.
FORWARD = "triton_attn::attention_forward"
BACKWARD = "triton_attn::attention_backward"
_MASK_AND_MODS = ("Tensor[] layout, int[] mask_ints, str mask_key, Tensor[] mask_captured, str score_key, "
                  "Tensor[] score_captured, float scale, str backend, int autotune")
# The forward's third output: the softmax statistics (shift, 1 / sum per row) the Triton backward recomputes P
# from (P from the rounded lse is off by ulp(|lse|), which large position biases make visible); written only when
# ``save_stats`` (a gradient is needed) on a Triton backend, else an empty tensor.
torch.library.define(FORWARD, f"(Tensor query, Tensor key, Tensor value, {_MASK_AND_MODS}, bool save_stats) "
                              "-> (Tensor, Tensor, Tensor)")
torch.library.define(BACKWARD, "(Tensor query, Tensor key, Tensor value, Tensor out, Tensor lse, Tensor? grad_out, "
                               f"Tensor? grad_lse, {_MASK_AND_MODS}, Tensor? softmax_stats=None) "
                               "-> (Tensor, Tensor, Tensor)")


@torch.library.impl(FORWARD, "default")
def attention_forward_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: List[torch.Tensor],
                         mask_ints: List[int], mask_key: str, mask_captured: List[torch.Tensor], score_key: str,
                         score_captured: List[torch.Tensor], scale: float, backend: str,
                         autotune: int, save_stats: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """query [B, Hq, Lq, D], key [B, Hkv, Lkv, D], value [B, Hkv, Lkv, Dv] -> (out [B, Hq, Lq, Dv], lse [B, Hq, Lq],
    softmax_stats: float32 [B, Hq, Lq, 2] with ``save_stats`` on a Triton backend, else empty [0])."""
    block_mask = unflatten_block_mask(layout, mask_ints, resolve_mod(mask_key, mask_captured))
    score_mod = resolve_mod(score_key, score_captured)
    if backend == "torch":
        from .reference import blockwise_attention

        out, lse = blockwise_attention(query, key, value, block_mask, score_mod=score_mod, scale=scale)
        return out.contiguous(), lse.contiguous(), _no_stats(query)
    from .kernels.attention.forward_launch import attention_forward, new_softmax_stats

    stats = new_softmax_stats(query) if save_stats else None
    out, lse = attention_forward(query, key, value, block_mask, score_mod=score_mod, scale=scale,
                                 interpret=backend == "interpret", autotune=_autotune_flag(autotune), stats=stats)
    return out.contiguous(), lse.contiguous(), _no_stats(query) if stats is None else stats


def _no_stats(query: torch.Tensor) -> torch.Tensor:
    return query.new_empty(0, dtype=torch.float32)


@torch.library.register_fake(FORWARD)
def _attention_forward_fake(query, key, value, layout, mask_ints, mask_key, mask_captured, score_key, score_captured,
                            scale, backend, autotune, save_stats):
    batch, q_heads, q_len, _ = query.shape
    out = query.new_empty(batch, q_heads, q_len, value.shape[-1])
    lse_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32  # reference.lse_dtype
    stats_shape = (batch, q_heads, q_len, 2) if save_stats and backend != "torch" else (0,)
    return out, query.new_empty(batch, q_heads, q_len, dtype=lse_dtype), query.new_empty(stats_shape,
                                                                                         dtype=torch.float32)


@torch.library.impl(BACKWARD, "default")
def attention_backward_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor,
                          lse: torch.Tensor, grad_out: Optional[torch.Tensor], grad_lse: Optional[torch.Tensor],
                          layout: List[torch.Tensor], mask_ints: List[int], mask_key: str,
                          mask_captured: List[torch.Tensor], score_key: str, score_captured: List[torch.Tensor],
                          scale: float, backend: str, autotune: int, softmax_stats: Optional[torch.Tensor] = None
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) shaped like (query, key, value); grad_out / grad_lse None count as zero.
    ``softmax_stats``: the forward's [B, Hq, Lq, 2] statistics (Triton backends), None or empty: from ``lse``."""
    block_mask = unflatten_block_mask(layout, mask_ints, resolve_mod(mask_key, mask_captured))
    score_mod = resolve_mod(score_key, score_captured)
    if backend != "torch":
        from .kernels.attention.backward_launch import attention_backward

        stats = softmax_stats if softmax_stats is not None and softmax_stats.numel() else None
        grads = attention_backward(query, key, value, out, lse, grad_out, grad_lse, block_mask, score_mod=score_mod,
                                   scale=scale, interpret=backend == "interpret", autotune=_autotune_flag(autotune),
                                   softmax_stats=stats)
        return tuple(g.contiguous() for g in grads)
    from .reference import blockwise_backward

    with _autograd_inside_op():
        return blockwise_backward(query, key, value, block_mask, score_mod=score_mod, scale=scale,
                                  grad_out=grad_out, grad_lse=grad_lse)


@torch.library.register_fake(BACKWARD)
def _attention_backward_fake(query, key, value, out, lse, grad_out, grad_lse, layout, mask_ints, mask_key,
                             mask_captured, score_key, score_captured, scale, backend, autotune, softmax_stats=None):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _setup_context(ctx, inputs, output):
    query, key, value, layout, mask_ints, mask_key, mask_captured, score_key, score_captured, scale, backend, \
        autotune, _save_stats = inputs
    out, lse, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(query, key, value, out, lse, stats, *layout, *mask_captured, *score_captured)
    ctx.counts = (len(layout), len(mask_captured))
    ctx.args = (mask_ints, mask_key, score_key, scale, backend, autotune)


def _backward(ctx, grad_out, grad_lse, _grad_stats):
    query, key, value, out, lse, stats, *rest = ctx.saved_tensors
    layout_count, mask_count = ctx.counts
    layout, mask_captured = rest[:layout_count], rest[layout_count:layout_count + mask_count]
    score_captured = rest[layout_count + mask_count:]
    mask_ints, mask_key, score_key, scale, backend, autotune = ctx.args
    dq, dk, dv = torch.ops.triton_attn.attention_backward(query, key, value, out, lse, grad_out, grad_lse, list(layout), mask_ints,
                                       mask_key, list(mask_captured), score_key, list(score_captured), scale,
                                       backend, autotune, stats)
    # One entry per input, a list for each tensor-list input (the layout, the captured tensors).
    return (dq, dk, dv, [None] * layout_count, None, None, [None] * mask_count, None, [None] * len(score_captured),
            None, None, None, None)


torch.library.register_autograd(FORWARD, _backward, setup_context=_setup_context)


def attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask,
                 mask: Tuple[str, List[torch.Tensor]], score: Tuple[str, List[torch.Tensor]], *, scale: float,
                 backend: str, autotune: Optional[bool]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Call the forward op (differentiable through the backward op); inputs validated by ``attention()``.

    ``mask`` / ``score``: ``(key, captured tensors)`` from ``register_mod`` (or ``mod_key`` under
    ``torch.compile``). Returns out [B, Hq, Lq, Dv] and lse [B, Hq, Lq] float32.
    """
    layout, ints = flatten_block_mask(block_mask)
    save_stats = backend != "torch" and torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    out, lse, _ = torch.ops.triton_attn.attention_forward(query, key, value, layout, ints, mask[0], list(mask[1]),
                                                         score[0], list(score[1]), float(scale), backend,
                                                         -1 if autotune is None else int(autotune), save_stats)
    return out, lse


# ---------------------------------------------------------------------------------------------
# Mods inside torch.compile: the key is a constant, the tensors are fetched along closure paths
# ---------------------------------------------------------------------------------------------

def _closure_children(value):
    """(step, child) pairs one level below ``value``: closure cells, defaults and container items."""
    code_owner = getattr(value, "__func__", value)
    for index, cell in enumerate(getattr(code_owner, "__closure__", None) or ()):
        try:
            yield ("cell", index), cell.cell_contents
        except ValueError:
            continue
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield ("item", index), item


def _closure_path(mod: Callable, tensor: torch.Tensor, depth: int = 6):
    """Steps from ``mod`` to ``tensor`` through closure cells and tuple/list items, or None."""
    frontier, seen = [(mod, ())], {id(mod)}
    for _ in range(depth):
        following = []
        for value, path in frontier:
            for step, child in _closure_children(value):
                if child is tensor:
                    return path + (step,)
                if id(child) not in seen and not isinstance(child, torch.Tensor):
                    seen.add(id(child))
                    following.append((child, path + (step,)))
        frontier = following
    return None


def mod_key(mod: Callable, kind: str) -> Tuple[str, Tuple]:
    """``(key, paths)`` for ``torch.compile``: the table key (computed once, when the graph is traced) and
    the closure path of each captured tensor, along which ``fetch_captured`` reads them on every call."""
    key, captured = register_mod(mod, kind)
    learnable = [t for t in captured if t.requires_grad] if kind == "score" and torch.is_grad_enabled() else []
    if learnable:  # the ops differentiate q, k and v only: never drop these gradients silently
        shapes = ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in learnable)
        raise ValueError(f"score_mod {mod_name(mod)!r} captures tensor(s) that require grad ({shapes}); under "
                         "torch.compile triton_attn does not compute their gradients. Train them outside "
                         "torch.compile, or detach them (or use torch.no_grad()) if they need no gradient.")
    paths = tuple(_closure_path(mod, tensor) for tensor in captured)
    if any(path is None for path in paths):
        raise ValueError(f"{kind}_mod {mod_name(mod)!r} reads a tensor that is not in its closure (a global?); "
                         "under torch.compile captured tensors must be closure variables of the mod")
    return key, paths


# torch.compiler.assume_constant_result(mod_key): dynamo runs it once while tracing and keeps the result as a
# constant. The decorator only sets this attribute, but importing it imports torch._dynamo (over a second),
# which `import triton_attn` must not pay; tests/test_compile.py checks that the mark is honoured.
mod_key._dynamo_marked_constant = True


def fetch_captured(mod: Callable, paths: Tuple) -> List[torch.Tensor]:
    """The tensors at ``paths`` (from ``mod_key``) in ``mod``'s closure; traceable by dynamo."""
    tensors = []
    for path in paths:
        value = mod
        for kind, index in path:
            value = value.__closure__[index].cell_contents if kind == "cell" else value[index]
        tensors.append(value)
    return tensors


def structured_mod_key(mod_type: type, structure: tuple, tensor_specs: Tuple, kind: str) -> Tuple[str, Tuple[int, ...]]:
    """``(key, order)`` of a ``StructuredMod`` from constants only: a mod of ``structure`` over stand-in
    tensors of the given ``(dtype, rank)`` (``StructuredMod.stand_in``) is registered (the key ignores
    tensor values), and ``order`` says which of the mod's ``tensors()`` is each captured input of the
    traced graph."""
    stand_in = mod_type.stand_in(structure, tensor_specs)
    key, captured = register_mod(stand_in, kind)
    return key, positions_by_identity(captured, stand_in.tensors())


structured_mod_key._dynamo_marked_constant = True  # see mod_key


def compiled_mod(mod: Optional[Callable], kind: str) -> Tuple[str, List[torch.Tensor]]:
    """``(key, captured tensors)`` of ``mod`` inside ``torch.compile``. A ``StructuredMod`` (the model mask
    of ``registry.masking``, often built inside the compiled graph) is keyed by its structure; any other
    mod must exist before the graph (its closure is read along constant paths, see ``mod_key``)."""
    if mod is None:
        return "", []
    if isinstance(mod, StructuredMod):
        tensors = mod.tensors()
        key, order = structured_mod_key(type(mod), mod.structure(), tuple((t.dtype, t.dim()) for t in tensors), kind)
        return key, [tensors[i] for i in order]
    key, paths = mod_key(mod, kind)
    return key, fetch_captured(mod, paths)
