"""``attention()`` as a pair of ``torch.library`` custom ops: ``triton_attn::attention_forward`` and
``triton_attn::attention_backward``.

Custom ops are what ``torch.compile`` (fake tensors, ``fullgraph=True``) and ``torch.library.opcheck``
understand. Their arguments can only be tensors, numbers and strings, so a call is flattened:

- a mod (mask_mod or score_mod) travels as its string key in the mod table plus the tensors it
  captured (``mod_table.py``);
- the BlockMask travels as its eight index tensors plus ints: BLOCK_SIZE, seq_lengths and its
  ``LaunchPlan`` (so the launch never reads the device to plan itself);
- the route (``dispatch.Route``, decided by the caller) as its token ``backend/family/backward``;
- the call's dropout (``triton_attn/dropout.py``) as ``dropout_p`` (a float) and ``dropout_seed`` (its int64
  ``[1]`` seed tensor): ``0.0`` and None (or an empty tensor) mean none. The seed is a tensor so that a
  compiled graph draws it with ``torch.randint`` on every run instead of baking a constant in; the backward
  op gets the same two, and regenerates the forward's keep decisions from them.

The implementations run the route (``backends/run.py``) and decide nothing; the registered autograd
formula calls the backward op, which runs ``run.backward``. The fake implementations give shapes only,
which is also what makes meta tensors work.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .backends import run
from .dispatch import Route
from .dropout import Dropout
from .masks.block_mask import BlockMask, LaunchPlan
from .mod_table import resolve_mod
from .reference import lse_dtype

__all__ = ["flatten_block_mask", "unflatten_block_mask", "attention_op", "FORWARD", "BACKWARD"]

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
            plan.max_partial_q_blocks, plan.max_full_q_blocks, int(plan.exact), plan.computed_blocks,
            -1 if plan.heavy_tiles_last is None else int(plan.heavy_tiles_last)]
    return [getattr(block_mask, name) for name in BlockMask._TENSOR_FIELDS], ints


def unflatten_block_mask(layout: Sequence[torch.Tensor], ints: Sequence[int], mask_mod) -> BlockMask:
    """Inverse of ``flatten_block_mask``, with ``mask_mod`` as the mask's predicate (no device read): the
    caller's own BlockMask when these are its tensors and its mask_mod, else a new one."""
    original = _original(layout, mask_mod)
    if original is not None:
        return original
    fields = dict(zip(BlockMask._TENSOR_FIELDS, layout))
    plan = LaunchPlan(*ints[4:8], exact=bool(ints[8]), computed_blocks=ints[9],
                      heavy_tiles_last=None if ints[10] < 0 else bool(ints[10]))
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


# Defined with torch.library.define/impl rather than the custom_op decorator: the decorator's wrapper
# imports torch._dynamo on the first call (over a second), which an eager call must not pay.
FORWARD = "triton_attn::attention_forward"
BACKWARD = "triton_attn::attention_backward"
_MASK_AND_MODS = ("Tensor[] layout, int[] mask_ints, str mask_key, Tensor[] mask_captured, str score_key, "
                  "Tensor[] score_captured, float scale, str route, int autotune")
# The forward's third output: the softmax statistics (shift, 1 / sum per row) the Triton backward recomputes P
# from (P from the rounded lse is off by ulp(|lse|), which large position biases make visible); written when the
# route's backward is the Triton kernels (``Route.saves_stats``), else an empty tensor.
_DROPOUT = "float dropout_p=0.0, Tensor? dropout_seed=None"
torch.library.define(FORWARD, f"(Tensor query, Tensor key, Tensor value, {_MASK_AND_MODS}, {_DROPOUT}) "
                              "-> (Tensor, Tensor, Tensor)")
torch.library.define(BACKWARD, "(Tensor query, Tensor key, Tensor value, Tensor out, Tensor lse, Tensor? grad_out, "
                               f"Tensor? grad_lse, {_MASK_AND_MODS}, Tensor? softmax_stats=None, {_DROPOUT}) "
                               "-> (Tensor, Tensor, Tensor)")


def _dropout(dropout_p: float, dropout_seed: Optional[torch.Tensor]) -> Optional[Dropout]:
    """The ``Dropout`` the ops' two dropout arguments carry, or None (p 0, or no seed)."""
    if dropout_p == 0.0 or dropout_seed is None or dropout_seed.numel() == 0:
        return None
    return Dropout(float(dropout_p), dropout_seed)


@torch.library.impl(FORWARD, "default")
def attention_forward_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: List[torch.Tensor],
                         mask_ints: List[int], mask_key: str, mask_captured: List[torch.Tensor], score_key: str,
                         score_captured: List[torch.Tensor], scale: float, route: str,
                         autotune: int, dropout_p: float = 0.0, dropout_seed: Optional[torch.Tensor] = None
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """query [B, Hq, Lq, D], key [B, Hkv, Lkv, D], value [B, Hkv, Lkv, Dv] -> (out [B, Hq, Lq, Dv], lse [B, Hq, Lq],
    softmax_stats: float32 [B, Hq, Lq, 2] when the route's backward is the Triton kernels, else empty [0]).
    ``dropout_p`` / ``dropout_seed`` (int64 [1]): the call's dropout (0.0 / None: none)."""
    planned = Route.from_token(route)
    block_mask = unflatten_block_mask(layout, mask_ints, resolve_mod(mask_key, mask_captured))
    score_mod = resolve_mod(score_key, score_captured)
    stats = run.softmax_stats(planned, query)
    out, lse = run.forward(planned, query, key, value, block_mask, score_mod=score_mod, scale=scale,
                           autotune=_autotune_flag(autotune), stats=stats, dropout=_dropout(dropout_p, dropout_seed))
    return out.contiguous(), lse.contiguous(), query.new_empty(0, dtype=torch.float32) if stats is None else stats


@torch.library.register_fake(FORWARD)
def _attention_forward_fake(query, key, value, layout, mask_ints, mask_key, mask_captured, score_key, score_captured,
                            scale, route, autotune, dropout_p=0.0, dropout_seed=None):
    batch, q_heads, q_len, _ = query.shape
    out = query.new_empty(batch, q_heads, q_len, value.shape[-1])
    stats_shape = (batch, q_heads, q_len, 2) if Route.from_token(route).saves_stats else (0,)
    return (out, query.new_empty(batch, q_heads, q_len, dtype=lse_dtype(query.dtype)),
            query.new_empty(stats_shape, dtype=torch.float32))


@torch.library.impl(BACKWARD, "default")
def attention_backward_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor,
                          lse: torch.Tensor, grad_out: Optional[torch.Tensor], grad_lse: Optional[torch.Tensor],
                          layout: List[torch.Tensor], mask_ints: List[int], mask_key: str,
                          mask_captured: List[torch.Tensor], score_key: str, score_captured: List[torch.Tensor],
                          scale: float, route: str, autotune: int, softmax_stats: Optional[torch.Tensor] = None,
                          dropout_p: float = 0.0, dropout_seed: Optional[torch.Tensor] = None
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) shaped like (query, key, value); grad_out / grad_lse None count as zero.
    ``softmax_stats``: the forward's [B, Hq, Lq, 2] statistics (Triton backward), None or empty: from ``lse``.
    ``dropout_p`` / ``dropout_seed``: the forward's dropout (0.0 / None: none)."""
    planned = Route.from_token(route)
    block_mask = unflatten_block_mask(layout, mask_ints, resolve_mod(mask_key, mask_captured))
    score_mod = resolve_mod(score_key, score_captured)
    stats = softmax_stats if softmax_stats is not None and softmax_stats.numel() else None
    with _autograd_inside_op() if planned.backward == "blockwise" else contextlib.nullcontext():
        grads = run.backward(planned, query, key, value, out, lse, grad_out, grad_lse, block_mask,
                             score_mod=score_mod, scale=scale, autotune=_autotune_flag(autotune),
                             softmax_stats=stats, dropout=_dropout(dropout_p, dropout_seed))
    return tuple(g.contiguous() for g in grads[:3])


@torch.library.register_fake(BACKWARD)
def _attention_backward_fake(query, key, value, out, lse, grad_out, grad_lse, layout, mask_ints, mask_key,
                             mask_captured, score_key, score_captured, scale, route, autotune, softmax_stats=None,
                             dropout_p=0.0, dropout_seed=None):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _setup_context(ctx, inputs, output):
    query, key, value, layout, mask_ints, mask_key, mask_captured, score_key, score_captured, scale, route, \
        autotune, *dropout = inputs
    dropout_p, dropout_seed = (dropout + [0.0, None])[:2]
    out, lse, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(query, key, value, out, lse, stats, dropout_seed, *layout, *mask_captured, *score_captured)
    ctx.counts = (len(layout), len(mask_captured))
    ctx.args = (mask_ints, mask_key, score_key, scale, route, autotune, dropout_p)


def _backward(ctx, grad_out, grad_lse, _grad_stats):
    query, key, value, out, lse, stats, dropout_seed, *rest = ctx.saved_tensors
    layout_count, mask_count = ctx.counts
    layout, mask_captured = rest[:layout_count], rest[layout_count:layout_count + mask_count]
    score_captured = rest[layout_count + mask_count:]
    mask_ints, mask_key, score_key, scale, route, autotune, dropout_p = ctx.args
    dq, dk, dv = torch.ops.triton_attn.attention_backward(query, key, value, out, lse, grad_out, grad_lse,
                                                          list(layout), mask_ints, mask_key, list(mask_captured),
                                                          score_key, list(score_captured), scale, route, autotune,
                                                          stats, dropout_p, dropout_seed)
    # One entry per input, a list for each tensor-list input (the layout, the captured tensors), for the inputs
    # the call passed: the dispatcher leaves out trailing arguments equal to their defaults (the dropout ones).
    grads = (dq, dk, dv, [None] * layout_count, None, None, [None] * mask_count, None, [None] * len(score_captured),
             None, None, None, None, None)
    return grads[:len(ctx.needs_input_grad)]


torch.library.register_autograd(FORWARD, _backward, setup_context=_setup_context)


def attention_op(route: Route, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask,
                 mask: Tuple[str, List[torch.Tensor]], score: Tuple[str, List[torch.Tensor]], *, scale: float,
                 autotune: Optional[bool], dropout: Optional[Dropout] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Call the forward op on ``route`` (differentiable through the backward op); inputs validated.

    ``mask`` / ``score``: ``(key, captured tensors)`` from ``mod_table.register_mod`` (``compiled_mod``
    under ``torch.compile``). ``dropout``: the call's (None: none; the op is then called exactly as
    without dropout). Returns out [B, Hq, Lq, Dv] and lse [B, Hq, Lq] float32.
    """
    layout, ints = flatten_block_mask(block_mask)
    extra = () if dropout is None else (float(dropout.p), dropout.seed)
    out, lse, _ = torch.ops.triton_attn.attention_forward(query, key, value, layout, ints, mask[0], list(mask[1]),
                                                         score[0], list(score[1]), float(scale), route.token,
                                                         -1 if autotune is None else int(autotune), *extra)
    return out, lse
