"""``triton_attention``: the Triton forward kernel as a ``torch.autograd.Function``.

Forward runs the fused kernel (``launch.attention_forward``).

Backward -- INTERIM PATH, replaced by the Triton backward kernel of issue 4 (kernels/backward.py):
it recomputes the attention with the PyTorch blockwise backend (``reference.blockwise_attention``)
under autograd and differentiates that. Correct and memory-bounded (one query-block row at a
time), but not fused. Learnable tensors captured by the score_mod (a relative-position bias
table, say) are passed through ``apply`` so that they receive gradients too.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

from ..masks.block_mask import BlockMask
from ..masks.closure import captured_tensors
from .launch import attention_forward


class TritonAttentionFunction(torch.autograd.Function):
    """apply(query, key, value, block_mask, score_mod, scale, interpret, *learnable) -> (out, lse)."""

    @staticmethod
    def forward(ctx, query, key, value, block_mask, score_mod, scale, interpret, *learnable):
        out, lse = attention_forward(query, key, value, block_mask, score_mod=score_mod, scale=scale,
                                     interpret=interpret)
        ctx.save_for_backward(query, key, value, *learnable)
        ctx.block_mask, ctx.score_mod, ctx.scale = block_mask, score_mod, scale
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        # INTERIM (issue 4 replaces this): differentiate the PyTorch blockwise recomputation.
        from ..reference import blockwise_attention

        query, key, value, *learnable = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(t.requires_grad) for t in (query, key, value)]
            out, lse = blockwise_attention(*inputs, ctx.block_mask, score_mod=ctx.score_mod, scale=ctx.scale)
            outputs, grads_in = [out], [grad_out]
            if grad_lse is not None:
                outputs.append(lse)
                grads_in.append(grad_lse)
            wrt = [t for t in inputs + list(learnable) if t.requires_grad]
            computed = iter(torch.autograd.grad(outputs, wrt, grads_in, allow_unused=True)) if wrt else iter(())
        grads = [next(computed) if t.requires_grad else None for t in inputs + list(learnable)]
        return (grads[0], grads[1], grads[2], None, None, None, None, *grads[3:])


def _learnable_tensors(score_mod: Optional[Callable]) -> List[torch.Tensor]:
    if score_mod is None:
        return []
    return [t for t in captured_tensors(score_mod) if t.requires_grad]


def triton_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask, *,
                     score_mod: Optional[Callable], scale: float, interpret: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused attention with the Triton kernel; inputs are validated by ``triton_attn.attention``.

    query [B, Hq, Lq, D], key [B, Hkv, Lkv, D], value [B, Hkv, Lkv, Dv]; ``interpret`` runs the
    same kernel under the Triton interpreter (CPU tensors). Returns out [B, Hq, Lq, Dv] in the
    input dtype and lse [B, Hq, Lq] float32 (natural log; -inf for rows with no allowed key).
    """
    learnable = _learnable_tensors(score_mod)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in [query, key, value, *learnable])
    if not needs_grad:
        return attention_forward(query, key, value, block_mask, score_mod=score_mod, scale=scale, interpret=interpret)
    return TritonAttentionFunction.apply(query, key, value, block_mask, score_mod, scale, interpret, *learnable)
