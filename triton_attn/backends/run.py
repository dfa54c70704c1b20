"""Running a planned call: the route's forward and backward, and its direct autograd.

``forward`` / ``backward`` run what a ``Route`` (``dispatch.py``) names and decide nothing: the custom
ops' implementations call them with the route they carry, and ``attention`` calls ``direct`` for routes
that skip the ops. The backward is defined once (``backward``); the direct Triton route wraps it in
``KernelAttention`` (an ``autograd.Function``), the ops register it as their autograd formula.

Dropout: a call's ``Dropout`` (``triton_attn/dropout.py``, None for none) goes to the forward and to the
backward, which regenerates the forward's keep decisions from its seed; ``keep_mask`` gives them whole.

Triton is imported only when a Triton route runs (``kernels.entry``).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ..dispatch import DROPOUT_FAMILIES, Route
from ..dropout import Dropout
from ..masks.block_mask import BlockMask
from ..masks.closure import captured_tensors
from ..masks.evaluate import mod_name
from .torch import cpu_flash
from .torch import dropout as torch_dropout
from .torch.blockwise import blockwise_attention, blockwise_backward
from .torch.dense import dense_attention
from .torch.paged import paged_attention_torch
from .torch.sdpa import sdpa_attention

__all__ = ["forward", "backward", "direct", "keep_mask", "plan_paged", "TorchPaged", "softmax_stats",
           "LearnableScoreTensorWarning"]


def _dropout_kwargs(dropout: Optional[Dropout]) -> dict:
    """The kernels' entry points' ``dropout`` keyword: none at all without dropout, so a call without
    dropout is exactly the call it was before dropout existed."""
    return {} if dropout is None else {"dropout": dropout}


def softmax_stats(route: Route, query: torch.Tensor) -> Optional[torch.Tensor]:
    """An empty float32 [B, Hq, Lq, 2] for the forward's softmax statistics when the route's backward is the
    Triton kernels (which recompute P from them), else None. The kernels' host helpers load only here, so a
    torch-only process never imports them."""
    if not route.saves_stats:
        return None
    from ..kernels.host import new_softmax_stats

    return new_softmax_stats(query)


def forward(route: Route, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask, *,
            score_mod: Optional[Callable], scale: float, autotune: Optional[bool] = None,
            stats: Optional[torch.Tensor] = None, config=None,
            dropout: Optional[Dropout] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """out [B, Hq, Lq, Dv], lse [B, Hq, Lq] of ``route``'s forward (differentiable on the torch routes).

    query [B, Hq, Lq, D], key [B, Hkv, Lkv, D], value [B, Hkv, Lkv, Dv], validated. ``stats``: an empty
    ``softmax_stats`` the Triton prefill kernel fills for the backward. ``config``: fixed forward
    tiles (Flex's kernel_options; prefill only). ``dropout``: the call's (None: none); its routes are
    ``prefill`` and the torch backend's ``blockwise`` and ``dense`` (``dispatch``)."""
    family = route.family
    if dropout is not None and family not in DROPOUT_FAMILIES:
        raise ValueError(f"route {route.token} has no dropout (dispatch.plan_call plans none with it)")
    if route.backend == "torch":
        if family == "sdpa":
            keep = cpu_flash.dense_keep(block_mask) if route.sdpa_mask == "dense" else None
            result = sdpa_attention(query, key, value, causal=route.sdpa_mask == "causal", keep=keep, scale=scale)
            # None, or a NaN under a causal mask: a hidden non-finite key/value may have reached the output
            # (the fused kernel multiplies masked probabilities, 0, by every value of a tile); the loop keeps it out.
            if result is not None and not (route.sdpa_mask == "causal" and math.isnan(float(result[0].detach().sum()))):
                return result[0].contiguous(), result[1]
        elif family == "cpu_flash":
            result = cpu_flash.fused_attention(query, key, value, block_mask, scale=scale)
            if result is not None:  # None: as above
                return result
        elif family == "dense":
            result = dense_attention(query, key, value, block_mask, mask=route.sdpa_mask, scale=scale, dropout=dropout)
            if result is not None:  # None: as above
                return result
        return blockwise_attention(query, key, value, block_mask, score_mod=score_mod, scale=scale, dropout=dropout)
    from ..kernels import entry  # Triton is imported only when used

    interpret = route.interpret
    if family == "decode":
        return entry.decode_forward(query, key, value, block_mask, score_mod=score_mod, scale=scale,
                                    interpret=interpret, autotune=autotune)
    return entry.prefill_forward(query, key, value, block_mask, score_mod=score_mod, scale=scale, interpret=interpret,
                                 autotune=autotune, stats=stats, config=config, **_dropout_kwargs(dropout))


def backward(route: Route, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, grad_out: Optional[torch.Tensor], grad_lse: Optional[torch.Tensor],
             block_mask: BlockMask, *, score_mod: Optional[Callable], scale: float, autotune: Optional[bool] = None,
             softmax_stats: Optional[torch.Tensor] = None, learnable: Sequence[torch.Tensor] = (),
             dropout: Optional[Dropout] = None) -> Tuple[Optional[torch.Tensor], ...]:
    """Gradients (dq, dk, dv, *d learnable) of ``route``'s forward; grad_out [B, Hq, Lq, Dv] / grad_lse
    [B, Hq, Lq] None count as zero. ``kernels``: the Triton backward, P from ``softmax_stats``
    (None: from lse). ``blockwise``: PyTorch recomputes each query-block row and differentiates it,
    reaching ``learnable`` (tensors the score_mod captured) through the closure. ``dropout``: the
    forward's, whose keep decisions are regenerated."""
    if route.backward == "kernels":
        from ..kernels import entry

        return entry.prefill_backward(query, key, value, out, lse, grad_out, grad_lse, block_mask,
                                      score_mod=score_mod, scale=scale, interpret=route.interpret,
                                      autotune=autotune, softmax_stats=softmax_stats, **_dropout_kwargs(dropout))
    if route.backward != "blockwise":
        raise ValueError(f"route {route.token} has no backward here")
    return blockwise_backward(query, key, value, block_mask, score_mod=score_mod, scale=scale, grad_out=grad_out,
                              grad_lse=grad_lse, learnable=learnable, dropout=dropout)


def keep_mask(route: Route, dropout: Optional[Dropout], batch: int, q_heads: int, q_len: int, kv_len: int, *,
              device: torch.device) -> torch.Tensor:
    """bool [B, Hq, Lq, Lkv]: the keep decisions ``route`` makes for ``dropout`` (all True for None): the torch
    backend's stream (``backends/torch/dropout.py``) or the kernels' Philox (``kernels.entry``)."""
    if dropout is None or route.backend == "torch":
        return torch_dropout.keep_mask(dropout, batch, q_heads, q_len, kv_len, device=device)
    from ..kernels import entry

    return entry.dropout_keep_mask(dropout, batch, q_heads, q_len, kv_len, device=device, interpret=route.interpret)


class KernelAttention(torch.autograd.Function):
    """apply(route, query, key, value, block_mask, score_mod, scale, autotune, dropout, *learnable) -> (out, lse):
    a Triton forward on a direct route, differentiated by ``backward`` (``route.backward``) with the same
    ``dropout`` (or None)."""

    @staticmethod
    def forward(ctx, route, query, key, value, block_mask, score_mod, scale, autotune, dropout, *learnable):
        stats = softmax_stats(route, query)
        out, lse = forward(route, query, key, value, block_mask, score_mod=score_mod, scale=scale,
                           autotune=autotune, stats=stats, dropout=dropout)
        ctx.save_for_backward(query, key, value, out, lse, *([] if stats is None else [stats]), *learnable)
        ctx.call = (route, block_mask, score_mod, scale, autotune, dropout, stats is not None, len(learnable))
        ctx.set_materialize_grads(False)  # an unused lse (or out) gradient arrives as None: no zeros launched
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        route, block_mask, score_mod, scale, autotune, dropout, has_stats, learnable_count = ctx.call
        query, key, value, out, lse, *rest = ctx.saved_tensors
        stats = rest[0] if has_stats else None
        learnable = rest[len(rest) - learnable_count:]
        grads = backward(route, query, key, value, out, lse, grad_out, grad_lse, block_mask, score_mod=score_mod,
                         scale=scale, autotune=autotune, softmax_stats=stats, learnable=learnable, dropout=dropout)
        return (None, *grads[:3], None, None, None, None, None, *grads[3:])


class LearnableScoreTensorWarning(UserWarning):
    """A score_mod's learnable tensors make the backward pass use the slower recompute path."""


_WARNED: set = set()


def direct(route: Route, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask, *,
           score_mod: Optional[Callable], scale: float, autotune: Optional[bool] = None,
           config=None, dropout: Optional[Dropout] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """A call on a direct route: out [B, Hq, Lq, Dv], lse [B, Hq, Lq], differentiable as the route says.
    ``dropout``: the call's (None: none)."""
    if route.backend == "torch" or route.backward == "none":
        return forward(route, query, key, value, block_mask, score_mod=score_mod, scale=scale, autotune=autotune,
                       config=config, dropout=dropout)
    learnable: List[torch.Tensor] = []
    if route.backward == "blockwise":
        learnable = [t for t in captured_tensors(score_mod) if t.requires_grad]
        name = mod_name(score_mod)
        if learnable and name not in _WARNED:
            _WARNED.add(name)
            warnings.warn(f"score_mod {name!r} captures tensors that require grad; their gradients come from a "
                          "PyTorch recomputation of the backward pass (slower than the fused Triton backward). "
                          "Detach them if they need no gradient.", LearnableScoreTensorWarning, stacklevel=4)
    return KernelAttention.apply(route, query, key, value, block_mask, score_mod, scale, autotune, dropout,
                                 *learnable)


class TorchPaged:
    """A paged plan on the torch backend: the table, lengths (tensors and, once read, ints) and mods, for
    ``paged_attention_torch`` per layer (differentiable: the torch route keeps autograd)."""

    def __init__(self, page_table: torch.Tensor, kv_lens: torch.Tensor, lengths: Optional[List[int]], *,
                 mask_mod: Optional[Callable], score_mod: Optional[Callable], scale: float):
        self.mask_mod, self.score_mod, self.scale = mask_mod, score_mod, scale
        self.update(page_table, kv_lens, lengths)

    def update(self, page_table: torch.Tensor, kv_lens: torch.Tensor, lengths: Optional[List[int]] = None) -> None:
        self.page_table, self.kv_lens = page_table, kv_lens
        self.lengths = lengths if lengths is not None else [int(n) for n in kv_lens.tolist()]

    def run(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor
            ) -> Tuple[torch.Tensor, torch.Tensor]:
        return paged_attention_torch(query, key_cache, value_cache, self.page_table, self.kv_lens,
                                     mask_mod=self.mask_mod, score_mod=self.score_mod, scale=self.scale,
                                     lengths=self.lengths)


def plan_paged(route: Route, page_table: torch.Tensor, kv_lens: torch.Tensor, key_cache: torch.Tensor,
               value_cache: torch.Tensor, *, num_q_heads: int, q_len: int, mask_mod: Optional[Callable],
               score_mod: Optional[Callable], scale: float, lengths: Optional[List[int]]):
    """The prepared paged call of ``route`` (family ``paged``): an object with ``run(query, key_cache,
    value_cache) -> (out [B, Hq, Lq, Dv], lse [B, Hq, Lq])`` and ``update(page_table, kv_lens, lengths)``."""
    if route.backend == "torch":
        return TorchPaged(page_table, kv_lens, lengths, mask_mod=mask_mod, score_mod=score_mod, scale=scale)
    from ..kernels import entry

    return entry.paged_plan(page_table, kv_lens, key_cache, value_cache, num_q_heads=num_q_heads, q_len=q_len,
                            mask_mod=mask_mod, score_mod=score_mod, scale=scale, interpret=route.interpret,
                            lengths=lengths)
