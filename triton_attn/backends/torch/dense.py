"""The torch backend's dense dropout route: calls with dropout whose mask is small enough to materialize.

PyTorch's fused CPU kernel (``sdpa``) cannot give the keep decisions, so a call with dropout cannot take it;
the blockwise loop can, but walks tiles of one query block row at a time with an online softmax and an
autograd recomputation in the backward. For masks that ``sdpa`` would take (no mask, the causal family, a
head-shared dense mask: ``dispatch``) this route instead computes a chunk of query rows against all their
keys at once -- scores, mask, softmax, dropout, ``@ V`` -- in a few large matrix products, and has an explicit
backward:

    P = softmax(S)  (S = scale * Q K^T, masked)          lse = logsumexp(S) (without dropout)
    O = (P * Z) V,  Z = keep / (1 - p)                    Di = rowsum(dO * O)
    dV = (P * Z)^T dO,  dP = (dO V^T) * Z,  dS = P * (dP - Di + dlse),  dQ = scale dS K,  dK = scale dS^T Q

(``rowsum(P * dP) = dO . O``, as without dropout). The backward recomputes S and P from the forward's lse and
regenerates Z from the seed (``dropout.DropoutStream``: the same decisions as the blockwise loop's).

Masks (``Route.sdpa_mask``): ``none`` (every key), ``causal`` (top-left ``q_idx >= kv_idx``: each chunk stops at
its last row's keys) and ``dense`` (``cpu_flash.dense_keep``, derived once per BlockMask), added to the scores
as a 0 / -inf bias. A NaN or inf key or value that the mask hides would reach the row (``nan + -inf``,
``0 * nan``); as on the fused routes, the forward then returns
None (one reduction over the output) and the caller takes the blockwise loop, which keeps it out.
Scores are float32 (float64 for float64 inputs); the output is rounded once to the input dtype.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ...dropout import Dropout
from ...masks.block_mask import BlockMask
from ...reference import accumulation_dtype, lse_dtype
from . import cpu_flash
from .dropout import CHUNK_ROWS, DropoutStream

__all__ = ["dense_attention", "SCORE_BUDGET"]

# Score elements ([B, Hq, rows, keys]) per chunk of query rows: the products stay large, the few score-sized
# buffers (scores or P, dP, the keep factor) a few tens of MB.
SCORE_BUDGET = 1 << 22


class _Chunks:
    """The query-row chunks of a call and, per chunk, its keys and masked scores (shared by forward and backward).

    query [B, Hq, Lq, D], key [B, Hkv, Lkv, D] and value [B, Hkv, Lkv, Dv] in the compute dtype; the Hq / Hkv
    query heads sharing a K/V head are folded into rows (``[B, Hkv, groups * rows, ...]``), so K/V are never
    repeated."""

    def __init__(self, query, key, value, block_mask: BlockMask, mask: str, scale: float):
        self.query, self.key, self.value = query, key, value
        self.batch, self.q_heads, self.q_len, _ = query.shape
        self.kv_heads, self.kv_len = key.shape[1], key.shape[2]
        self.groups = self.q_heads // self.kv_heads
        self.mask, self.scale = mask, scale
        self.keep = cpu_flash.dense_keep(block_mask) if mask == "dense" else None   # [Bm, 1, Lq, Lkv]
        per_row = max(1, self.batch * self.q_heads * self.kv_len)
        self.rows = max(CHUNK_ROWS, SCORE_BUDGET // per_row // CHUNK_ROWS * CHUNK_ROWS)

    def spans(self):
        """(first row, rows, keys) of each chunk: keys [0, keys) can be visible to its rows."""
        for start in range(0, self.q_len, self.rows):
            rows = min(self.rows, self.q_len - start)
            keys = min(self.kv_len, start + rows) if self.mask == "causal" else self.kv_len
            yield start, rows, keys

    def grouped(self, t: torch.Tensor) -> torch.Tensor:
        """[B, Hq, rows, X] as [B, Hkv, groups * rows, X] (a view when ``t`` is contiguous)."""
        return t.reshape(self.batch, self.kv_heads, -1, t.shape[-1])

    def per_head(self, t: torch.Tensor) -> torch.Tensor:
        """[B, Hkv, groups * rows, X] as [B, Hq, rows, X]."""
        return t.view(self.batch, self.q_heads, -1, t.shape[-1])

    def scaled_query(self, start: int, rows: int) -> torch.Tensor:
        """scale * Q of query rows [start, start + rows), grouped: [B, Hkv, groups * rows, D]."""
        return self.grouped(self.query[:, :, start:start + rows] * self.scale)

    def scores(self, start: int, rows: int, keys: int) -> torch.Tensor:
        """Masked scores [B, Hq, rows, keys] (-inf where hidden), in the compute dtype: the same expression in
        the forward and the backward. The mask enters as a 0 / -inf bias of one head ([rows, keys] or
        [Bm, 1, rows, keys]): adding it is far cheaper than ``masked_fill`` over every head."""
        scores = self.per_head(torch.matmul(self.scaled_query(start, rows), self.key[:, :, :keys].transpose(-1, -2)))
        if self.mask == "causal":
            hidden = torch.arange(keys).view(1, -1) > torch.arange(start, start + rows).view(-1, 1)
        elif self.mask == "dense":
            hidden = ~self.keep[:, :, start:start + rows, :keys]
        else:
            return scores
        return scores.add_(torch.zeros(hidden.shape, dtype=scores.dtype).masked_fill_(hidden, -math.inf))


def _forward(chunks: _Chunks, stream: Optional[DropoutStream], out_dtype: torch.dtype
             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """out [B, Hq, Lq, Dv] (``out_dtype``), lse [B, Hq, Lq] (compute dtype)."""
    query, value = chunks.query, chunks.value
    compute = query.dtype
    out = torch.empty(chunks.batch, chunks.q_heads, chunks.q_len, value.shape[-1], dtype=out_dtype,
                      device=query.device)
    lse = torch.empty(chunks.batch, chunks.q_heads, chunks.q_len, dtype=compute, device=query.device)
    keep_fraction = 1.0 if stream is None else 1.0 - stream.p
    for start, rows, keys in chunks.spans():
        weights = chunks.scores(start, rows, keys)
        row_max = weights.amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
        weights.sub_(row_max).exp_()                                            # exp(s - max), 0 where hidden
        row_sum = weights.sum(dim=-1, keepdim=True)
        attended = row_sum > 0
        if stream is not None:  # after the sum: the softmax is normalized as without dropout
            weights.mul_(stream.kept_span(start, rows, 0, keys, dtype=compute, device=weights.device))
        product = chunks.per_head(torch.matmul(chunks.grouped(weights), value[:, :, :keys]))
        safe_sum = torch.where(attended, row_sum, torch.ones_like(row_sum))
        out[:, :, start:start + rows] = product / (safe_sum * keep_fraction)
        lse[:, :, start:start + rows] = torch.where(attended, row_max + torch.log(safe_sum),
                                                    torch.full_like(safe_sum, -math.inf)).squeeze(-1)
    return out, lse


def _backward(chunks: _Chunks, stream: Optional[DropoutStream], out: torch.Tensor, lse: torch.Tensor,
              grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor]):
    """(dq, dk, dv) in the compute dtype (module docstring)."""
    query, key, value = chunks.query, chunks.key, chunks.value
    compute = query.dtype
    grad_query = torch.empty_like(query)
    grad_key, grad_value = torch.zeros_like(key), torch.zeros_like(value)
    for start, rows, keys in chunks.spans():
        rows_of = slice(start, start + rows)
        shift = lse[:, :, rows_of].unsqueeze(-1)
        shift = torch.where(torch.isinf(shift), torch.zeros_like(shift), shift)   # a row that sees nothing: P 0
        probs = chunks.scores(start, rows, keys).sub_(shift).exp_()                # P [B, Hq, rows, keys]
        d_out = grad_out[:, :, rows_of].to(compute)
        # Z = kept / (1 - p): the 0/1 factor on the score-sized tensors, 1 / (1 - p) on dO (rows x Dv).
        kept = None if stream is None else stream.kept_span(start, rows, 0, keys, dtype=compute, device=probs.device)
        d_out_kept = d_out if stream is None else d_out * stream.keep_scale
        d_probs = chunks.per_head(torch.matmul(chunks.grouped(d_out_kept), value[:, :, :keys].transpose(-1, -2)))
        if kept is not None:
            d_probs.mul_(kept)                                                                    # dP = (dO V^T) * Z
        row_dot = (d_out * out[:, :, rows_of].to(compute)).sum(dim=-1, keepdim=True)            # Di
        if grad_lse is not None:
            row_dot = row_dot - torch.nan_to_num(grad_lse[:, :, rows_of].to(compute), nan=0.0).unsqueeze(-1)
        d_scores = chunks.grouped(d_probs.sub_(row_dot).mul_(probs))                            # dS
        grad_query[:, :, rows_of] = chunks.per_head(torch.matmul(d_scores, key[:, :, :keys])).mul_(chunks.scale)
        grad_key[:, :, :keys] += torch.matmul(d_scores.transpose(-1, -2), chunks.scaled_query(start, rows))
        del d_probs, d_scores
        kept_probs = probs if kept is None else probs.mul_(kept)                                  # P * kept
        grad_value[:, :, :keys] += torch.matmul(chunks.grouped(kept_probs).transpose(-1, -2),
                                                chunks.grouped(d_out_kept))                     # (P * Z)^T dO
    return grad_query, grad_key, grad_value


class _DenseAttention(torch.autograd.Function):
    """apply(query, key, value, block_mask, mask, scale, dropout) -> (out, lse), the explicit backward."""

    @staticmethod
    def forward(ctx, query, key, value, block_mask, mask, scale, dropout):
        compute = accumulation_dtype(query.dtype)
        chunks = _Chunks(*(t.to(compute) for t in (query, key, value)), block_mask, mask, scale)
        stream = None if dropout is None else DropoutStream(dropout, query.shape[0], query.shape[1])
        out, lse = _forward(chunks, stream, query.dtype)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.call = (block_mask, mask, scale, dropout)
        ctx.set_materialize_grads(False)
        return out, lse.to(lse_dtype(query.dtype))

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        query, key, value, out, lse = ctx.saved_tensors
        block_mask, mask, scale, dropout = ctx.call
        if grad_out is None and grad_lse is None:
            return (None,) * 7
        compute = accumulation_dtype(query.dtype)
        chunks = _Chunks(*(t.to(compute) for t in (query, key, value)), block_mask, mask, scale)
        stream = None if dropout is None else DropoutStream(dropout, query.shape[0], query.shape[1])
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out
        dq, dk, dv = _backward(chunks, stream, out, lse, grad_out, grad_lse)
        return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype), None, None, None, None


def dense_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask, *,
                    mask: str, scale: float, dropout: Optional[Dropout]
                    ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """Attention with dropout over whole rows of keys, differentiable w.r.t. query, key and value (and
    through the lse).

    query [B, Hq, Lq, D]; key [B, Hkv, Lkv, D]; value [B, Hkv, Lkv, Dv] (Hq a multiple of Hkv; K/V may be
    stride-0 views over B); ``mask``: ``none``, ``causal`` or ``dense`` (module docstring; ``block_mask``'s
    mask shared by all heads for ``dense``); ``dropout``: the call's (None: none). Returns out
    [B, Hq, Lq, Dv] in the input dtype and lse [B, Hq, Lq] float32 (float64 for float64 inputs), or None
    when a masked-out non-finite value may have reached the output (the caller takes the blockwise loop).
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        out, lse = _DenseAttention.apply(query, key, value, block_mask, mask, scale, dropout)
    else:
        compute = accumulation_dtype(query.dtype)
        chunks = _Chunks(*(t.to(compute) for t in (query, key, value)), block_mask, mask, scale)
        stream = None if dropout is None else DropoutStream(dropout, query.shape[0], query.shape[1])
        out, lse = _forward(chunks, stream, query.dtype)
        lse = lse.to(lse_dtype(query.dtype))
    if mask != "none" and math.isnan(float(out.detach().sum())):
        return None
    return out, lse
