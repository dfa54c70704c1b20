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

(``rowsum(P * dP) = dO . O``, as without dropout). The backward recomputes S and P from the forward's lse. The
forward draws the call's keep mask once (``dropout.DropoutStream.packed``: the same decisions as the blockwise
loop's, only the query-row chunks' visible keys) and keeps it, one bit a probability, for the backward; a mask
over ``dropout.KEEP_BUDGET_BYTES`` is drawn per chunk instead, in the forward and again in the backward. Z is
applied as a 0/1 float factor (one in-place multiply, the factor's buffer reused across chunks); the
``1 / (1 - p)`` enters once per output row (and on dO).

Chunks: query rows of every batch entry at once, or, for a ``dense`` mask that differs by batch entry (a
padding mask), of one batch entry at a time, each against the keys its rows can see (``[0, keys)``): a
padded key takes no product (PyTorch's fused kernel computes them all, then masks; a key no batch entry's rows
see is not drawn for either), and a chunk whose keys are all visible adds no bias.

Masks (``Route.sdpa_mask``): ``none`` (every key), ``causal`` (top-left ``q_idx >= kv_idx``: each chunk stops at
its last row's keys) and ``dense`` (``cpu_flash.dense_keep``, derived once per BlockMask), added to the scores
as a 0 / -inf bias. A NaN or inf key or value that the mask hides would reach the row (``nan + -inf``,
``0 * nan``); as on the fused routes, the forward then returns
None (one reduction over the output) and the caller takes the blockwise loop, which keeps it out.
Scores are float32 (float64 for float64 inputs); the output is rounded once to the input dtype.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import numpy as np
import torch

from ...dropout import Dropout
from ...masks.block_mask import BlockMask
from ...reference import accumulation_dtype, lse_dtype
from . import cpu_flash
from .dropout import CHUNK_ROWS, DropoutStream, unpack

__all__ = ["dense_attention", "SCORE_BUDGET"]

# Score elements ([B, Hq, rows, keys]) per chunk of query rows: the products stay large, the few score-sized
# buffers (scores or P, dP, the keep factor) a few tens of MB.
SCORE_BUDGET = 1 << 22


def _key_stop(keep: torch.Tensor) -> int:
    """1 + the last key any row of ``keep`` (bool [..., rows, Lkv]) sees; 0 if none."""
    seen = keep.reshape(-1, keep.shape[-1]).any(dim=0).nonzero()
    return int(seen[-1]) + 1 if seen.numel() else 0


class _Chunks:
    """The chunks of a call (batch entries x query rows) and, per chunk, its keys and masked scores (shared by
    forward and backward).

    query [B, Hq, Lq, D], key [B, Hkv, Lkv, D] and value [B, Hkv, Lkv, Dv] in the compute dtype; the Hq / Hkv
    query heads sharing a K/V head are folded into rows (``[b, Hkv, groups * rows, ...]``), so K/V are never
    repeated. A ``dense`` mask is read per chunk for the keys its rows see (``[0, keys)``: a padding mask's
    padded keys are skipped, per batch entry when ``per_batch`` and the mask differs by batch entry) and whether
    any key before them is hidden (else no bias is added)."""

    def __init__(self, query, key, value, block_mask: BlockMask, mask: str, scale: float, per_batch: bool = True):
        self.query, self.key, self.value = query, key, value
        self.batch, self.q_heads, self.q_len, _ = query.shape
        self.kv_heads, self.kv_len = key.shape[1], key.shape[2]
        self.groups = self.q_heads // self.kv_heads
        self.mask, self.scale = mask, scale
        self.keep = cpu_flash.dense_keep(block_mask) if mask == "dense" else None   # [Bm, 1, Lq, Lkv]
        self.spans = list(self._spans(per_batch and self.keep is not None and self.keep.shape[0] > 1))

    def _spans(self, per_batch: bool):
        """(batch entries, mask's batch entries, first row, rows, keys, biased) of each chunk: keys [0, keys) can
        be visible to its rows; ``biased``: some of them are hidden."""
        entries = [(slice(b, b + 1), slice(b, b + 1)) for b in range(self.batch)] if per_batch else \
            [(slice(0, self.batch), slice(0, self.keep.shape[0] if self.keep is not None else 1))]
        for batch, mask_batch in entries:
            per_row = max(1, (batch.stop - batch.start) * self.q_heads * self.kv_len)
            chunk_rows = max(CHUNK_ROWS, SCORE_BUDGET // per_row // CHUNK_ROWS * CHUNK_ROWS)
            for start in range(0, self.q_len, chunk_rows):
                rows = min(chunk_rows, self.q_len - start)
                if self.mask == "causal":
                    yield batch, mask_batch, start, rows, min(self.kv_len, start + rows), True
                elif self.mask == "dense":
                    keep = self.keep[mask_batch, :, start:start + rows]
                    keys = max(_key_stop(keep), min(1, self.kv_len))  # a row that sees nothing: one hidden key
                    yield batch, mask_batch, start, rows, keys, not bool(keep[..., :keys].all())
                else:
                    yield batch, mask_batch, start, rows, self.kv_len, False

    def chunk_keys(self) -> List[int]:
        """Per ``CHUNK_ROWS`` query rows, the keys [0, n) any of them can see: the part of the keep mask a
        dropout call draws (``DropoutStream.packed``)."""
        starts = range(0, self.q_len, CHUNK_ROWS)
        if self.mask == "causal":
            return [min(self.kv_len, start + CHUNK_ROWS) for start in starts]
        if self.mask == "none":
            return [self.kv_len for _ in starts]
        seen = self.keep.any(dim=0)[0]                                                  # [Lq, Lkv]
        row_stop = (seen * torch.arange(1, self.kv_len + 1)).amax(dim=-1)              # [Lq]
        return [int(row_stop[start:start + CHUNK_ROWS].max()) for start in starts]

    def grouped(self, t: torch.Tensor) -> torch.Tensor:
        """[b, Hq, rows, X] as [b, Hkv, groups * rows, X] (a view when ``t`` is contiguous)."""
        return t.reshape(t.shape[0], self.kv_heads, -1, t.shape[-1])

    def per_head(self, t: torch.Tensor) -> torch.Tensor:
        """[b, Hkv, groups * rows, X] as [b, Hq, rows, X]."""
        return t.view(t.shape[0], self.q_heads, -1, t.shape[-1])

    def scaled_query(self, batch: slice, start: int, rows: int) -> torch.Tensor:
        """scale * Q of query rows [start, start + rows) of the batch entries ``batch``, grouped:
        [b, Hkv, groups * rows, D]."""
        return self.grouped(self.query[batch, :, start:start + rows] * self.scale)

    def scores(self, batch: slice, mask_batch: slice, start: int, rows: int, keys: int, biased: bool) -> torch.Tensor:
        """Masked scores [b, Hq, rows, keys] (-inf where hidden), in the compute dtype: the same expression in
        the forward and the backward. The mask enters as a 0 / -inf bias of one head ([rows, keys] or
        [1, 1, rows, keys]): adding it is far cheaper than ``masked_fill`` over every head."""
        scores = self.per_head(torch.matmul(self.scaled_query(batch, start, rows),
                                            self.key[batch, :, :keys].transpose(-1, -2)))
        if not biased:
            return scores
        if self.mask == "causal":
            hidden = torch.arange(keys).view(1, -1) > torch.arange(start, start + rows).view(-1, 1)
        else:
            hidden = ~self.keep[mask_batch, :, start:start + rows, :keys]
        return scores.add_(torch.zeros(hidden.shape, dtype=scores.dtype).masked_fill_(hidden, -math.inf))


def _forward(chunks: _Chunks, stream: Optional[DropoutStream], kept_bits: Optional[np.ndarray],
             out_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """out [B, Hq, Lq, Dv] (``out_dtype``), lse [B, Hq, Lq] (compute dtype). ``kept_bits``: ``stream``'s packed
    mask (``DropoutStream.packed``), or None to draw each chunk's decisions."""
    query, value = chunks.query, chunks.value
    compute = query.dtype
    out = torch.zeros(chunks.batch, chunks.q_heads, chunks.q_len, value.shape[-1], dtype=out_dtype,
                      device=query.device)
    lse = torch.full((chunks.batch, chunks.q_heads, chunks.q_len), -math.inf, dtype=compute, device=query.device)
    keep_fraction = 1.0 if stream is None else 1.0 - stream.p
    buffer = _factor_buffer(chunks, stream)
    for batch, mask_batch, start, rows, keys, biased in chunks.spans:
        rows_of = slice(start, start + rows)
        weights = chunks.scores(batch, mask_batch, start, rows, keys, biased)
        row_max = weights.amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
        weights.sub_(row_max).exp_()                                            # exp(s - max), 0 where hidden
        row_sum = weights.sum(dim=-1, keepdim=True)
        attended = row_sum > 0
        if stream is not None:  # after the sum: the softmax is normalized as without dropout
            weights.mul_(_kept(stream, kept_bits, buffer, batch, start, rows, keys, weights))
        product = chunks.per_head(torch.matmul(chunks.grouped(weights), value[batch, :, :keys]))
        safe_sum = torch.where(attended, row_sum, torch.ones_like(row_sum))
        out[batch, :, rows_of] = product / (safe_sum * keep_fraction)            # 1 / (1 - p) once a row
        lse[batch, :, rows_of] = torch.where(attended, row_max + torch.log(safe_sum),
                                             torch.full_like(safe_sum, -math.inf)).squeeze(-1)
    return out, lse


def _kept(stream: DropoutStream, kept_bits: Optional[np.ndarray], buffer: torch.Tensor, batch: slice,
          start: int, rows: int, keys: int, like: torch.Tensor) -> torch.Tensor:
    """[b, Hq, rows, keys] like ``like``: 1 where kept, from the stored bits into (the front of) ``buffer``, else
    drawn."""
    if kept_bits is None:
        return stream.kept_span(start, rows, 0, keys, dtype=like.dtype, device=like.device)[batch]
    return unpack(kept_bits, batch, start, rows, keys, out=buffer[:like.numel()].view(like.shape))


def _factor_buffer(chunks: _Chunks, stream: Optional[DropoutStream]) -> Optional[torch.Tensor]:
    """A flat buffer the size of the largest chunk's scores, for its keep factor (None without dropout)."""
    if stream is None:
        return None
    size = max(((b.stop - b.start) * chunks.q_heads * rows * keys for b, _, _, rows, keys, _ in chunks.spans),
               default=0)
    return torch.empty(size, dtype=chunks.query.dtype, device=chunks.query.device)


def _backward(chunks: _Chunks, stream: Optional[DropoutStream], kept_bits: Optional[np.ndarray], out: torch.Tensor,
              lse: torch.Tensor, grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor]):
    """(dq, dk, dv) in the compute dtype (module docstring)."""
    query, key, value = chunks.query, chunks.key, chunks.value
    compute = query.dtype
    grad_query = torch.zeros_like(query)
    grad_key, grad_value = torch.zeros_like(key), torch.zeros_like(value)
    buffer = _factor_buffer(chunks, stream)
    for batch, mask_batch, start, rows, keys, biased in chunks.spans:
        rows_of = slice(start, start + rows)
        shift = lse[batch, :, rows_of].unsqueeze(-1)
        shift = torch.where(torch.isinf(shift), torch.zeros_like(shift), shift)   # a row that sees nothing: P 0
        probs = chunks.scores(batch, mask_batch, start, rows, keys, biased).sub_(shift).exp_()   # P [b, Hq, rows, keys]
        d_out = grad_out[batch, :, rows_of].to(compute)
        # Z = kept / (1 - p): the 0/1 factor on the score-sized tensors, 1 / (1 - p) on dO (rows x Dv).
        kept = None if stream is None else _kept(stream, kept_bits, buffer, batch, start, rows, keys, probs)
        d_out_kept = d_out if stream is None else d_out * stream.keep_scale
        d_probs = chunks.per_head(torch.matmul(chunks.grouped(d_out_kept), value[batch, :, :keys].transpose(-1, -2)))
        row_dot = (d_out * out[batch, :, rows_of].to(compute)).sum(dim=-1, keepdim=True)        # Di
        if grad_lse is not None:
            row_dot = row_dot - torch.nan_to_num(grad_lse[batch, :, rows_of].to(compute), nan=0.0).unsqueeze(-1)
        if kept is None:
            d_scores = chunks.grouped(d_probs.sub_(row_dot).mul_(probs))                        # dS
        else:  # one pass of the 0/1 factor (P * kept), then dS = (dO V^T) * (P * kept) - Di * P: three passes, not four
            kept_probs = kept.mul_(probs)
            d_scores = chunks.grouped(d_probs.mul_(kept_probs).addcmul_(probs, row_dot, value=-1))
        grad_query[batch, :, rows_of] = chunks.per_head(torch.matmul(d_scores, key[batch, :, :keys])).mul_(chunks.scale)
        grad_key[batch, :, :keys] += torch.matmul(d_scores.transpose(-1, -2), chunks.scaled_query(batch, start, rows))
        del d_probs, d_scores
        kept_probs = probs if kept is None else kept_probs
        grad_value[batch, :, :keys] += torch.matmul(chunks.grouped(kept_probs).transpose(-1, -2),
                                                    chunks.grouped(d_out_kept))                 # (P * Z)^T dO
    return grad_query, grad_key, grad_value


def _prepare(query, key, value, block_mask, mask, scale, dropout, kept_bits=None, draw=True):
    """(chunks, stream, packed keep mask or None) of a call, in the compute dtype: the mask is drawn (``draw``)
    when it fits ``KEEP_BUDGET_BYTES``; without it the chunks span every batch entry, so a drawn chunk of
    decisions serves them all."""
    compute = accumulation_dtype(query.dtype)
    stream = None if dropout is None else DropoutStream(dropout, query.shape[0], query.shape[1])
    packs = stream is not None and (kept_bits is not None or (draw and stream.fits(query.shape[2], key.shape[2])))
    chunks = _Chunks(*(t.to(compute) for t in (query, key, value)), block_mask, mask, scale,
                     per_batch=stream is None or packs)
    if packs and kept_bits is None:
        kept_bits = stream.packed(chunks.q_len, chunks.kv_len, chunks.chunk_keys())
    return chunks, stream, kept_bits


class _DenseAttention(torch.autograd.Function):
    """apply(query, key, value, block_mask, mask, scale, dropout) -> (out, lse), the explicit backward (which reads
    the forward's packed keep mask when it stored one, else draws the decisions again)."""

    @staticmethod
    def forward(ctx, query, key, value, block_mask, mask, scale, dropout):
        chunks, stream, kept_bits = _prepare(query, key, value, block_mask, mask, scale, dropout)
        out, lse = _forward(chunks, stream, kept_bits, query.dtype)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.call = (block_mask, mask, scale, dropout, kept_bits)
        ctx.set_materialize_grads(False)
        return out, lse.to(lse_dtype(query.dtype))

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        query, key, value, out, lse = ctx.saved_tensors
        block_mask, mask, scale, dropout, kept_bits = ctx.call
        if grad_out is None and grad_lse is None:
            return (None,) * 7
        chunks, stream, _ = _prepare(query, key, value, block_mask, mask, scale, dropout, kept_bits, draw=False)
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out
        dq, dk, dv = _backward(chunks, stream, kept_bits, out, lse, grad_out, grad_lse)
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
        chunks, stream, kept_bits = _prepare(query, key, value, block_mask, mask, scale, dropout)
        out, lse = _forward(chunks, stream, kept_bits, query.dtype)
        lse = lse.to(lse_dtype(query.dtype))
    if mask != "none" and math.isnan(float(out.detach().sum())):
        return None
    return out, lse
