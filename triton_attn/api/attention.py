"""``attention()``: validate, plan the route once (``dispatch.plan_call``), run it.

A call with ``dropout_p > 0`` draws one ``Dropout`` (``triton_attn/dropout.py``: the probability and a seed
from the inputs' device generator) and hands it to the route, forward and backward."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .. import ops
from ..backends import run
from ..dispatch import Route, call_backend, plan_call
from ..dropout import Dropout, draw_dropout
from ..masks.block_mask import BlockMask
from ..masks.safety import check_mods, check_score_result_type
from ..masks.standard import default_block_mask
from ..mod_table import compiled_mod, register_mod
from ..versions import require_triton
from .checks import (
    broadcast_kv_batch,
    validate_autotune,
    validate_block_mask,
    validate_dropout,
    validate_mod_devices,
    validate_scale,
    validate_tensors,
)

__all__ = ["attention", "attention_call", "explain"]


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
              score_mod: Optional[Callable] = None, block_mask: Optional[BlockMask] = None,
              scale: Optional[float] = None, enable_gqa: bool = False, return_lse: bool = False,
              backend: Optional[str] = None, autotune: Optional[bool] = None, dropout_p: float = 0.0,
              return_dropout_mask: bool = False):
    """Fused attention with a block-sparse mask and an optional score_mod, and optional attention dropout.

    query: [B, Hq, Lq, D]; key: [B, Hkv, Lkv, D]; value: [B, Hkv, Lkv, Dv]; key/value may have batch 1,
    broadcast over the query's batch without a copy (their gradients are summed over it).
    score_mod(score, b, h, q_idx, kv_idx) -> score, applied to every computed score.
    block_mask: from ``create_block_mask``; None attends everywhere. A mask with more batch entries
    (or heads) than the query is read at the first B (Hq) of them, as FlexAttention does.
    scale: defaults to 1/sqrt(D). enable_gqa: allow Hq a multiple of Hkv.
    backend: "triton" (CUDA), "interpret" (the Triton kernels on CPU tensors), "torch"; None picks.
    autotune: on the triton backend, with no tuned config cached for this problem, search the
    config table now and remember the winner on disk (default: off, unless TRITON_ATTN_AUTOTUNE=1).
    Returns out [B, Hq, Lq, Dv] in the input dtype, and with return_lse=True also lse [B, Hq, Lq]
    float32 (natural log; -inf for rows that attend to nothing, whose output is 0).
    float64 inputs run on the torch backend only, computed in float64, lse float64 too.
    dropout_p: attention dropout, in [0, 1). With p > 0 the probabilities P = softmax(scores) (normalized as
    without dropout) are each dropped with probability p and the kept ones scaled by 1 / (1 - p) before
    P @ V; the lse stays that of the softmax without dropout. Applied on every call with p > 0, with or
    without gradients, as FlashAttention does: pass 0.0 in evaluation. Each call draws one seed from the
    inputs' device generator (``torch.manual_seed`` makes it reproducible); the backward drops the same
    probabilities. 0.0 runs exactly the call without dropout.
    return_dropout_mask: for tests and debugging; also return the keep mask the call used, bool
    [B, Hq, Lq, Lkv] (True = kept; all True for dropout_p 0), as the last element of the returned tuple:
    (out, mask) or (out, lse, mask). It materializes B * Hq * Lq * Lkv elements; eager calls only.
    Raises ValueError / TypeError naming the bad argument (README, "Errors and guarantees"); the
    Triton backends raise what the torch backend raises for a mod that indexes a captured tensor
    out of range, divides an integer by zero, or returns a bool or integer score.
    The path the call takes is ``dispatch.plan_call``'s (``TRITON_ATTN_LOG=route`` prints it).
    """
    dropout_p = validate_dropout(dropout_p, return_dropout_mask)
    # The seed is drawn before the other checks (they run in attention_call); a call that fails them has
    # only advanced the generator. Not for a query that is no tensor: its check names it.
    dropout = draw_dropout(dropout_p, query.device) if dropout_p > 0 and isinstance(query, torch.Tensor) else None
    out, lse, route = _call(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale,
                            enable_gqa=enable_gqa, backend=backend, autotune=autotune, dropout=dropout)
    result = (out, lse) if return_lse else (out,)
    if return_dropout_mask:
        batch, q_heads, q_len, _ = query.shape
        result += (run.keep_mask(route, dropout, batch, q_heads, q_len, key.shape[2], device=query.device),)
    return result if len(result) > 1 else out


def attention_call(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, score_mod: Optional[Callable],
                   block_mask: Optional[BlockMask], scale: Optional[float], enable_gqa: bool, backend: Optional[str],
                   autotune: Optional[bool] = None, tiles: Optional[Callable] = None,
                   dropout: Optional[Dropout] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every entry point's one path for a contiguous call: checks, the route, the run -> (out, lse).

    ``tiles(query, value, block_mask)``: the forward ``KernelConfig`` a caller fixes (Flex's
    ``kernel_options``), used where the route is the direct prefill forward (no gradient, Triton).
    ``dropout``: the call's (``dropout.draw_dropout``; None: none), forward and backward."""
    out, lse, _ = _call(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale,
                        enable_gqa=enable_gqa, backend=backend, autotune=autotune, tiles=tiles, dropout=dropout)
    return out, lse


def _call(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, score_mod: Optional[Callable],
          block_mask: Optional[BlockMask], scale: Optional[float], enable_gqa: bool, backend: Optional[str],
          autotune: Optional[bool], tiles: Optional[Callable] = None,
          dropout: Optional[Dropout] = None) -> Tuple[torch.Tensor, torch.Tensor, Route]:
    """``attention_call`` -> (out, lse, the route it took)."""
    validate_tensors(query, key, value, enable_gqa)
    scale = validate_scale(scale, query)
    validate_autotune(autotune)
    chosen = call_backend(query, score_mod, backend)  # backend errors come before the BlockMask's
    block_mask = _call_mask(block_mask, query, key)
    route = plan_call(query, key, value, block_mask, score_mod, backend=backend, fixed_config=tiles is not None,
                      chosen=chosen, dropout=dropout is not None)
    key, value = broadcast_kv_batch(key, query.shape[0]), broadcast_kv_batch(value, query.shape[0])
    compiling = torch.compiler.is_compiling()
    if not compiling:  # (closure walks and a probe call; under torch.compile the kernels check the tensors)
        _check_mods(route, query, key, block_mask, score_mod)
    config = tiles(query, value, block_mask) if tiles is not None and route.tiles else None
    if route.call == "op":
        out, lse = _through_ops(route, query, key, value, block_mask, score_mod, scale, autotune, compiling, dropout)
    else:
        out, lse = run.direct(route, query, key, value, block_mask, score_mod=score_mod, scale=scale,
                              autotune=autotune, config=config, dropout=dropout)
    return out, lse, route


def explain(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, score_mod: Optional[Callable] = None,
            block_mask: Optional[BlockMask] = None, enable_gqa: bool = False, backend: Optional[str] = None,
            dropout_p: float = 0.0) -> Route:
    """The ``Route`` that ``attention`` with these arguments would take (under the current grad mode),
    without running it: ``print(ta.explain(q, k, v, block_mask=bm))``. Same checks as ``attention``."""
    validate_tensors(query, key, value, enable_gqa)
    dropout = validate_dropout(dropout_p, False) > 0
    return plan_call(query, key, value, _call_mask(block_mask, query, key), score_mod, backend=backend,
                     dropout=dropout)


def _call_mask(block_mask: Optional[BlockMask], query: torch.Tensor, key: torch.Tensor) -> BlockMask:
    """The call's BlockMask, checked; None is the all-full mask, built here for these lengths and this
    device (nothing to check)."""
    if block_mask is None:
        return default_block_mask(query.shape[2], key.shape[2], query.device)
    return validate_block_mask(block_mask, query, key)


def _check_mods(route: Route, query: torch.Tensor, key: torch.Tensor, block_mask: BlockMask,
                score_mod: Optional[Callable]) -> None:
    """Mods' devices and results, where the torch backend would fail: a kernel cannot raise."""
    validate_mod_devices(score_mod, "score_mod", query.device)
    if score_mod is not None:
        # Every backend, even where no tile would run the mod; scores are float64 for float64 inputs.
        score_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
        check_score_result_type(score_mod, query.device, score_dtype)
    # Once per mask and device: a mask's mask_mod and what it captures are fixed when it is built.
    block_mask.derived(f"mask_mod_on_{query.device}",
                       lambda: validate_mod_devices(block_mask.mask_mod, "block_mask.mask_mod", query.device))
    if route.backend != "torch":
        require_triton(interpret=route.interpret)  # a clear error for a missing or too old Triton
        check_mods(score_mod, block_mask, query.shape[0], query.shape[1], query.shape[2], key.shape[2], query.device)


def _through_ops(route: Route, query, key, value, block_mask: BlockMask, score_mod, scale: float, autotune,
                 compiling: bool, dropout: Optional[Dropout]) -> Tuple[torch.Tensor, torch.Tensor]:
    if compiling:
        mask, score = compiled_mod(block_mask.mask_mod, "mask"), compiled_mod(score_mod, "score")
    else:
        mask, score = register_mod(block_mask.mask_mod, "mask"), register_mod(score_mod, "score")
    return ops.attention_op(route, query, key, value, block_mask, mask, score, scale=scale, autotune=autotune,
                            dropout=dropout)
