"""The ``torch`` backend: attention over a ``BlockMask``, tile by tile, in plain PyTorch.

``blockwise_attention`` walks the mask's tile rows with an online softmax in float32 (float64 for
float64 inputs), skips empty tiles, evaluates the mask_mod on partial tiles only, and never holds
more than a bounded slab of scores. Autograd works through it, recomputing one query-block row at a
time in the backward pass; ``blockwise_backward`` is the same recomputation as a plain function
(the custom op's backward). It computes what ``reference.dense_attention`` specifies.

Dropout (a call's ``Dropout``): each tile's weights ``exp(s - max)`` count in full towards the row's sum
(the lse stays that of the softmax without dropout), and the dropped ones are zeroed before ``weights @ V``;
the output is divided by ``1 - p`` once at the end. Which are dropped comes from ``dropout.DropoutStream``
(seed and position only), so the recomputed backward drops the same ones.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch

from ...dropout import Dropout
from ...masks.block_mask import BlockMask
from ...masks.closure import captured_tensors
from ...masks.evaluate import call_mask_mod, call_score_mod
from ...reference import accumulation_dtype, index_grids, lse_dtype
from .dropout import DropoutStream

# Score elements ([B, H, q_rows, kv_cols]) processed per step of the blockwise backend.
SCORE_BUDGET = 1 << 21


class _TileFetcher:
    """Loads the K/V tiles of a run of blocks, and multiplies queries against them.

    When every (b, h) shares one layout (the mask broadcasts over B and H), the positions are
    one vector: K/V come as a view (consecutive blocks) or one ``index_select`` ``[B, Hkv, L, D]``,
    and GQA query heads are folded into the rows so K/V are never repeated. Otherwise each
    (b, h) gathers its own tiles ``[B, Hq, L, D]``.
    """

    def __init__(self, key: torch.Tensor, value: torch.Tensor, q_heads: int, shared: bool):
        self.key, self.value = key, value
        self.compute_dtype = accumulation_dtype(key.dtype)
        self.batch, self.kv_heads, self.kv_len = key.shape[0], key.shape[1], key.shape[2]
        self.groups = q_heads // self.kv_heads
        self.q_heads = q_heads
        self.shared = shared
        h = torch.arange(q_heads, device=key.device)
        self.kv_head = (h // self.groups).view(1, -1, 1)
        self.batch_index = torch.arange(self.batch, device=key.device).view(-1, 1, 1)

    def fetch(self, blocks: torch.Tensor, block_valid: torch.Tensor, kv_block: int):
        """blocks/block_valid: ``[Bm, Hm, n]``. Returns (kv_idx ``[Bm, Hm, 1, L]``, valid, k, v)."""
        offsets = torch.arange(kv_block, device=blocks.device)
        positions = blocks.long().unsqueeze(-1) * kv_block + offsets                     # [Bm, Hm, n, kv_block]
        valid = (block_valid.unsqueeze(-1) & (positions < self.kv_len)).flatten(2)        # [Bm, Hm, L]
        positions = positions.flatten(2).clamp(max=self.kv_len - 1)
        if self.shared:
            flat = positions.view(-1)
            first, count = int(flat[0]), flat.numel()
            if bool(valid.all()) and int(flat[-1]) - first == count - 1:
                k_tile, v_tile = self.key[:, :, first:first + count], self.value[:, :, first:first + count]
            else:
                k_tile, v_tile = self.key.index_select(2, flat), self.value.index_select(2, flat)
        else:
            k_tile = self.key[self.batch_index, self.kv_head, positions]                    # [B, Hq, L, D]
            v_tile = self.value[self.batch_index, self.kv_head, positions]
        return positions.unsqueeze(2), valid.unsqueeze(2), k_tile, v_tile

    def scores(self, q_float: torch.Tensor, k_tile: torch.Tensor) -> torch.Tensor:
        """q_float ``[B, Hq, rows, D]`` against the tile: ``[B, Hq, rows, L]`` in the accumulation dtype."""
        batch, _, rows, dim = q_float.shape
        k_tile = k_tile.to(self.compute_dtype)
        if self.shared:
            grouped = q_float.reshape(batch, self.kv_heads, self.groups * rows, dim)
            return (grouped @ k_tile.transpose(-1, -2)).view(batch, self.q_heads, rows, -1)
        return q_float @ k_tile.transpose(-1, -2)

    def weighted_values(self, weights: torch.Tensor, v_tile: torch.Tensor) -> torch.Tensor:
        """weights ``[B, Hq, rows, L]`` times the V tile: ``[B, Hq, rows, Dv]`` in the accumulation dtype."""
        batch, _, rows, length = weights.shape
        v_tile = v_tile.to(self.compute_dtype)
        if self.shared:
            grouped = weights.reshape(batch, self.kv_heads, self.groups * rows, length)
            return (grouped @ v_tile).view(batch, self.q_heads, rows, -1)
        return weights @ v_tile


def _weighted_values_masking_hidden(fetcher: "_TileFetcher", weights: torch.Tensor, v_tile: torch.Tensor,
                                    visible: torch.Tensor) -> torch.Tensor:
    """``weights @ v_tile`` where a non-finite value reaches only the rows that give it weight.

    A value the mask hides from a row has weight 0 there, but ``0 * nan`` (or ``0 * inf``) is NaN, so a
    plain product would leak it. Non-finite values are zeroed for the product, and the output columns
    of the rows that give such a value positive weight before dropout (``visible``: the weights without
    it, ``weights`` itself without dropout) become NaN (inf included: non-finite either way): dropout does
    not change which rows see a value. The check is one reduction over the tile; finite tiles take the
    plain product.
    """
    if v_tile.is_floating_point() and not bool(torch.isfinite(v_tile).all()):
        bad = ~torch.isfinite(v_tile)
        product = fetcher.weighted_values(weights, v_tile.masked_fill(bad, 0.0))
        reached = fetcher.weighted_values((visible > 0).to(product.dtype), bad.to(product.dtype)) > 0
        return product.masked_fill(reached, float("nan"))
    return fetcher.weighted_values(weights, v_tile)


def _query_block_row(q_tile: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, q_start: int,
                     layout, block_mask: BlockMask, score_mod: Optional[Callable],
                     scale: float, dropout: Optional[DropoutStream] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query block row over its non-empty KV tiles.

    q_tile: [B, Hq, rows, D]; key: [B, Hkv, Lkv, D]; value: [B, Hkv, Lkv, Dv]. ``dropout``: the call's
    keep decisions (None: no dropout).
    Returns out [B, Hq, rows, Dv] and lse [B, Hq, rows] in the accumulation dtype (float32, or
    float64 for float64 inputs).
    """
    batch, q_heads, rows, _ = q_tile.shape
    value_dim = value.shape[-1]
    device = q_tile.device
    kv_block = block_mask.BLOCK_SIZE[1]
    shared = layout[0][0].numel() == 1
    fetcher = _TileFetcher(key, value, q_heads, shared)
    b, h = index_grids(batch, q_heads, device)
    q_idx = torch.arange(q_start, q_start + rows, device=device).view(1, 1, -1, 1)
    compute_dtype = accumulation_dtype(q_tile.dtype)
    q_float = q_tile.to(compute_dtype)
    running_max = torch.full((batch, q_heads, rows, 1), float("-inf"), dtype=compute_dtype, device=device)
    running_sum = torch.zeros((batch, q_heads, rows, 1), dtype=compute_dtype, device=device)
    accumulator = torch.zeros((batch, q_heads, rows, value_dim), dtype=compute_dtype, device=device)
    blocks_per_step = max(1, SCORE_BUDGET // (batch * q_heads * rows * kv_block))
    for (num_blocks, indices), is_partial in zip(layout, (True, False)):
        most = int(num_blocks.max()) if num_blocks.numel() else 0
        for j0 in range(0, most, blocks_per_step):
            j1 = min(most, j0 + blocks_per_step)
            block_valid = torch.arange(j0, j1, device=device) < num_blocks.unsqueeze(-1)
            kv_idx, keep, k_tile, v_tile = fetcher.fetch(indices[..., j0:j1], block_valid, kv_block)
            scores = fetcher.scores(q_float, k_tile) * scale                                # [B, H, rows, L]
            if score_mod is not None:
                scores = call_score_mod(score_mod, scores, b, h, q_idx, kv_idx)
            if is_partial:
                keep = keep & call_mask_mod(block_mask.mask_mod, b, h, q_idx, kv_idx, scores.shape)
            if not (shared and bool(keep.all())):
                scores = scores.masked_fill(~keep, float("-inf"))
            # The max only stabilizes exp(); the result does not depend on it, so no gradient flows.
            new_max = torch.maximum(running_max, scores.amax(dim=-1, keepdim=True)).detach()
            safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
            correction = torch.exp(running_max - safe_max)
            weights = torch.exp(scores - safe_max)
            running_sum = running_sum * correction + weights.sum(dim=-1, keepdim=True)
            # Dropout after the sum: the softmax is normalized as without dropout.
            kept = weights if dropout is None else weights * dropout.kept(q_start, rows, kv_idx, dtype=weights.dtype)
            accumulator = accumulator * correction + _weighted_values_masking_hidden(fetcher, kept, v_tile, weights)
            running_max = new_max
    attended = running_sum > 0
    safe_sum = torch.where(attended, running_sum, torch.ones_like(running_sum))
    safe_max = torch.where(torch.isinf(running_max), torch.zeros_like(running_max), running_max)
    out = accumulator / (safe_sum if dropout is None else safe_sum * (1.0 - dropout.p))
    lse = torch.where(attended, safe_max + torch.log(safe_sum), torch.full_like(safe_sum, float("-inf")))
    return out, lse.squeeze(-1)


class _RecomputedRow(torch.autograd.Function):
    """One query-block row whose backward recomputes it instead of keeping its probabilities.

    apply(row_kwargs, q_tile, key, value, *learnable) -> (out, lse). ``learnable``: tensors the
    score_mod captured that require grad; the recomputation reaches them through the closure, so
    passing them here is what lets their gradients flow out. (torch.utils.checkpoint would do the
    same, but its first call imports torch._dynamo, over a second of start-up.)
    """

    @staticmethod
    def forward(ctx, row_kwargs, q_tile, key, value, *learnable):
        ctx.row_kwargs = row_kwargs
        ctx.save_for_backward(q_tile, key, value, *learnable)
        with torch.no_grad():
            return _query_block_row(q_tile, key, value, **row_kwargs)

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q_tile, key, value, *learnable = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:]
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(need) for t, need in zip((q_tile, key, value), needs)]
            out, lse = _query_block_row(*inputs, **ctx.row_kwargs)
            wrt = [t for t, need in zip(inputs + learnable, needs) if need]
            # A row whose mask lets nothing through visits no tile: nothing to differentiate.
            pairs = [(o, g) for o, g in ((out, grad_out), (lse, grad_lse)) if o.requires_grad]
            if pairs:
                computed = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
            else:
                computed = [None] * len(wrt)
            grads = iter(torch.zeros_like(t) if g is None else g for t, g in zip(wrt, computed))
        return (None,) + tuple(next(grads) if need else None for need in needs)


class _AttachToInputs(torch.autograd.Function):
    """Identity on ``out`` that makes it depend on q, k, v with zero gradients.

    When the mask lets nothing through, no tile is visited and ``out`` would have no grad_fn;
    calling ``backward`` must still work and give zero gradients, as it does for a mask with holes.
    """

    @staticmethod
    def forward(ctx, out, query, key, value):
        ctx.save_for_backward(query, key, value)
        return out.clone()

    @staticmethod
    def backward(ctx, grad_out):
        return (None,) + tuple(torch.zeros_like(t) for t in ctx.saved_tensors)


def blockwise_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask, *,
                        score_mod: Optional[Callable], scale: float,
                        dropout: Optional[Dropout] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``torch`` backend: attention over the tiles of ``block_mask``.

    query: [B, Hq, Lq, D]; key: [B, Hkv, Lkv, D]; value: [B, Hkv, Lkv, Dv]; inputs already validated.
    ``dropout``: the call's dropout (None: none). Returns out [B, Hq, Lq, Dv] in query.dtype and lse
    [B, Hq, Lq] float32 (float64 for float64 inputs; the lse of the softmax without dropout).
    """
    batch, q_heads, q_len, _ = query.shape
    q_block = block_mask.BLOCK_SIZE[0]
    learnable = [t for t in captured_tensors(score_mod) if t.requires_grad] if score_mod is not None else []
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, *learnable))
    stream = None if dropout is None else DropoutStream(dropout, batch, q_heads)
    outs, lses = [], []
    for row in range(block_mask.num_blocks[0]):
        q_start = row * q_block
        layout = block_mask.row_layout(row, query.device)
        q_tile = query[:, :, q_start:q_start + q_block]
        kwargs = dict(q_start=q_start, layout=layout, block_mask=block_mask, score_mod=score_mod, scale=scale,
                      dropout=stream)
        if needs_grad:
            # Recompute the row in backward instead of saving every tile's probabilities.
            out, lse = _RecomputedRow.apply(kwargs, q_tile, key, value, *learnable)
        else:
            out, lse = _query_block_row(q_tile, key, value, **kwargs)
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs, dim=2).to(query.dtype)
    if needs_grad and not out.requires_grad:
        out = _AttachToInputs.apply(out, query, key, value)
    return out, torch.cat(lses, dim=2).to(lse_dtype(query.dtype))


def blockwise_backward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask, *,
                       score_mod: Optional[Callable], scale: float, grad_out: Optional[torch.Tensor],
                       grad_lse: Optional[torch.Tensor], learnable: Sequence[torch.Tensor] = (),
                       dropout: Optional[Dropout] = None) -> Tuple[torch.Tensor, ...]:
    """Gradients of ``blockwise_attention`` (the torch backend's backward op), one query-block row at a time.

    Each row is recomputed with autograd and differentiated at once, so memory stays bounded by one
    row's tiles. grad_out [B, Hq, Lq, Dv] / grad_lse [B, Hq, Lq] may be None (zero). Returns
    (dq, dk, dv) shaped and typed like (query, key, value), then the gradient of each of ``learnable``
    (tensors the score_mod captured, reached through its closure); rows that attend to nothing give zeros.
    ``dropout``: the forward's (the same probabilities are dropped again).
    """
    q_block = block_mask.BLOCK_SIZE[0]
    stream = None if dropout is None else DropoutStream(dropout, query.shape[0], query.shape[1])
    accumulate = torch.promote_types(query.dtype, torch.float32)  # float64 inputs are computed in float64
    grad_query = torch.zeros_like(query)
    grad_key = torch.zeros(key.shape, dtype=accumulate, device=key.device)
    grad_value = torch.zeros(value.shape, dtype=accumulate, device=value.device)
    key_in, value_in = key.detach().requires_grad_(True), value.detach().requires_grad_(True)
    grad_learnable = [torch.zeros_like(t) for t in learnable]
    for row in range(block_mask.num_blocks[0]):
        q_start = row * q_block
        rows = slice(q_start, q_start + q_block)
        pairs_out = []
        with torch.enable_grad():
            q_tile = query[:, :, rows].detach().requires_grad_(True)
            out, lse = _query_block_row(q_tile, key_in, value_in, q_start=q_start,
                                        layout=block_mask.row_layout(row, query.device), block_mask=block_mask,
                                        score_mod=score_mod, scale=scale, dropout=stream)
            if grad_out is not None and out.requires_grad:
                pairs_out.append((out, grad_out[:, :, rows].to(out.dtype)))
            if grad_lse is not None and lse.requires_grad:
                pairs_out.append((lse, grad_lse[:, :, rows].to(lse.dtype)))
            if not pairs_out:
                continue
            dq, dk, dv, *d_learnable = torch.autograd.grad([o for o, _ in pairs_out],
                                                           (q_tile, key_in, value_in, *learnable),
                                                           [g for _, g in pairs_out], allow_unused=True)
        for total, grad in zip(grad_learnable, d_learnable):
            if grad is not None:
                total += grad
        if dq is not None:
            grad_query[:, :, rows] = dq.to(query.dtype)
        if dk is not None:
            grad_key += dk
        if dv is not None:
            grad_value += dv
    return (grad_query, grad_key.to(key.dtype), grad_value.to(value.dtype), *grad_learnable)
