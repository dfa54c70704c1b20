"""``triton_attention``: the Triton kernels as ``torch.autograd.Function``s.

Forward runs the fused kernel (``launch.attention_forward``). Backward runs the Triton backward
kernels (``backward_launch.attention_backward``): delta preprocessing, dK/dV over the transposed
block layout, dQ over the forward layout; deterministic, no atomics.

One case goes another way: a score_mod that captures a tensor requiring grad (a learnable bias
table). The Triton backward does not scatter gradients into captured tensors, so such calls
keep the fused forward and differentiate a recomputation through the PyTorch blockwise backend,
which reaches the table through the closure. A one-time warning says so.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Tuple

import torch

from ...masks.block_mask import BlockMask
from ...masks.evaluate import mod_name
from .forward_launch import attention_forward, new_softmax_stats


class LearnableScoreTensorWarning(UserWarning):
    """A score_mod's learnable tensors make the backward pass use the slower recompute path."""


_WARNED = set()


class TritonAttentionFunction(torch.autograd.Function):
    """apply(query, key, value, block_mask, score_mod, scale, interpret, autotune) -> (out, lse)."""

    @staticmethod
    def forward(ctx, query, key, value, block_mask, score_mod, scale, interpret, autotune):
        stats = new_softmax_stats(query)  # the backward recomputes P from these, not from the rounded lse
        out, lse = attention_forward(query, key, value, block_mask, score_mod=score_mod, scale=scale,
                                     interpret=interpret, autotune=autotune, stats=stats)
        ctx.save_for_backward(query, key, value, out, lse, stats)
        ctx.block_mask, ctx.score_mod, ctx.scale, ctx.interpret = block_mask, score_mod, scale, interpret
        ctx.autotune = autotune
        ctx.set_materialize_grads(False)  # an unused lse (or out) gradient arrives as None: no zeros launched
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        from .backward_launch import attention_backward

        query, key, value, out, lse, stats = ctx.saved_tensors
        grad_query, grad_key, grad_value = attention_backward(
            query, key, value, out, lse, grad_out, grad_lse, ctx.block_mask, score_mod=ctx.score_mod,
            scale=ctx.scale, interpret=ctx.interpret, autotune=ctx.autotune, softmax_stats=stats)
        return grad_query, grad_key, grad_value, None, None, None, None, None


class RecomputeBackwardFunction(torch.autograd.Function):
    """apply(query, key, value, block_mask, score_mod, scale, interpret, autotune, *learnable) -> (out, lse).

    Fused forward; backward differentiates ``reference.blockwise_attention`` recomputed one
    query-block row at a time, so ``learnable`` (tensors the score_mod captured) get gradients.
    """

    @staticmethod
    def forward(ctx, query, key, value, block_mask, score_mod, scale, interpret, autotune, *learnable):
        out, lse = attention_forward(query, key, value, block_mask, score_mod=score_mod, scale=scale,
                                     interpret=interpret, autotune=autotune)
        ctx.save_for_backward(query, key, value, *learnable)
        ctx.block_mask, ctx.score_mod, ctx.scale = block_mask, score_mod, scale
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        from ...reference import blockwise_attention

        query, key, value, *learnable = ctx.saved_tensors
        needs = ctx.needs_input_grad
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(need) for t, need in zip((query, key, value), needs[:3])]
            out, lse = blockwise_attention(*inputs, ctx.block_mask, score_mod=ctx.score_mod, scale=ctx.scale)
            wrt = inputs + list(learnable)
            wanted = [t for t, need in zip(wrt, needs[:3] + needs[8:]) if need]
            computed = iter(torch.autograd.grad((out, lse), wanted, (grad_out, grad_lse), allow_unused=True))
        grads = [next(computed) if need else None for need in needs[:3] + needs[8:]]
        grads = [torch.zeros_like(t) if need and g is None else g
                 for t, g, need in zip(wrt, grads, needs[:3] + needs[8:])]
        return (grads[0], grads[1], grads[2], None, None, None, None, None, *grads[3:])


def triton_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask, *,
                     score_mod: Optional[Callable], scale: float, interpret: bool,
                     autotune: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused attention with the Triton kernels; inputs are validated by ``triton_attn.attention``.

    query [B, Hq, Lq, D], key [B, Hkv, Lkv, D], value [B, Hkv, Lkv, Dv]; ``interpret`` runs the
    same kernels under the Triton interpreter (CPU tensors). Returns out [B, Hq, Lq, Dv] in the
    input dtype and lse [B, Hq, Lq] float32 (natural log; -inf for rows with no allowed key).
    Both are differentiable (a loss on lse, as attention sinks use, reaches q and k).
    ``autotune``: search the config table now when no tuned winner is cached (see ``launch``).
    """
    from .backward_launch import learnable_score_tensors

    learnable = learnable_score_tensors(score_mod) if torch.is_grad_enabled() else []
    needs_grad = torch.is_grad_enabled() and (any(t.requires_grad for t in (query, key, value)) or bool(learnable))
    if not needs_grad:
        return attention_forward(query, key, value, block_mask, score_mod=score_mod, scale=scale, interpret=interpret,
                                 autotune=autotune)
    if learnable:
        name = mod_name(score_mod)
        if name not in _WARNED:
            _WARNED.add(name)
            warnings.warn(f"score_mod {name!r} captures tensors that require grad; their gradients come from a "
                          "PyTorch recomputation of the backward pass (slower than the fused Triton backward). "
                          "Detach them if they need no gradient.", LearnableScoreTensorWarning, stacklevel=3)
        return RecomputeBackwardFunction.apply(query, key, value, block_mask, score_mod, scale, interpret, autotune,
                                               *learnable)
    return TritonAttentionFunction.apply(query, key, value, block_mask, score_mod, scale, interpret, autotune)
