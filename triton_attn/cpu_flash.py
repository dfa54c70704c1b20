"""Inference fast path of the ``torch`` backend: PyTorch's fused CPU flash kernel, tile row by tile row.

For each query block row, the *full* KV blocks go through
``aten::_scaled_dot_product_flash_attention_for_cpu`` over their K/V span with no mask, the
*partial* blocks through the same op with the mask_mod's tile as an additive ``-inf`` mask, and
the two results are merged by their log-sum-exps. Empty blocks are still skipped, and the
mask_mod is still evaluated on partial tiles only. On a 2-core CPU this brings the backend level
with ``torch.compile(flex_attention)`` at 8k tokens (bench/results), where the plain blockwise
loop (``reference._query_block_row``) is ~1.5x slower.

It applies only where it is exact and simple: float32, no score_mod, no gradient needed, the
BlockMask broadcast over batch and heads (one layout), D == Dv, and the op present in this
torch build. ``blockwise_attention`` checks ``applicable`` and otherwise takes the plain loop.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from .masks.block_mask import BlockMask
from .masks.evaluate import call_mask_mod


def _flash_op():
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def applicable(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask,
               score_mod, needs_grad: bool) -> bool:
    """Whether ``fused_attention`` may serve this call (see the module docstring)."""
    return (not needs_grad and score_mod is None and query.device.type == "cpu"
            and query.dtype == torch.float32 and key.shape[-1] == value.shape[-1]
            and tuple(block_mask.shape[:2]) == (1, 1) and _flash_op() is not None
            # The op reads a head dim with stride != 1 wrongly (torch 2.13); SDPA copies such inputs first.
            and all(t.stride(-1) == 1 for t in (query, key, value)))


def _span(key: torch.Tensor, value: torch.Tensor, blocks: torch.Tensor, kv_block: int):
    """Positions [L], K [B, Hkv, L, D] and V of a list of KV blocks: a view when they are consecutive."""
    kv_len = key.shape[2]
    first, last = int(blocks[0]), int(blocks[-1])
    if last - first == blocks.numel() - 1:
        start, stop = first * kv_block, min(kv_len, (last + 1) * kv_block)
        return torch.arange(start, stop), key[:, :, start:stop], value[:, :, start:stop]
    positions = (blocks.long().unsqueeze(-1) * kv_block + torch.arange(kv_block)).flatten()
    positions = positions[positions < kv_len]
    return positions, key.index_select(2, positions), value.index_select(2, positions)


def _merge(parts: List[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Combine softmax results over disjoint key sets by their log-sum-exps ([..., rows, Dv], [..., rows])."""
    if len(parts) == 1:
        return parts[0]
    (out_a, lse_a), (out_b, lse_b) = parts
    top = torch.maximum(lse_a, lse_b)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    weight_a, weight_b = torch.exp(lse_a - top), torch.exp(lse_b - top)
    total = weight_a + weight_b
    out = (out_a * weight_a.unsqueeze(-1) + out_b * weight_b.unsqueeze(-1)) / total.clamp_min(1e-30).unsqueeze(-1)
    lse = torch.where(total > 0, top + torch.log(total), torch.full_like(total, -math.inf))
    return out, lse


# One call over the blocks' whole span (gaps masked with -inf) beats two calls and a merge as long as
# the gaps are small: sliding windows and documents give one contiguous run per row.
MAX_GAP_FRACTION = 0.25


def _keep_tile(block_mask: BlockMask, q_start: int, rows: int, positions: torch.Tensor) -> torch.Tensor:
    """The mask_mod on query rows [q_start, q_start + rows) x ``positions``: bool [rows, len(positions)]."""
    index = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    q_idx = torch.arange(q_start, q_start + rows).view(1, 1, -1, 1)
    return call_mask_mod(block_mask.mask_mod, index, index, q_idx, positions.view(1, 1, 1, -1),
                         (1, 1, rows, positions.numel()))[0, 0]


def _flash_with_keep(flash, grouped, k_span, v_span, keep: Optional[torch.Tensor], groups: int, scale: float):
    """Flash attention of grouped queries [B, Hkv, groups * rows, D] over a K/V span; ``keep`` [rows, L] or None."""
    if keep is None:
        return flash(grouped, k_span, v_span, 0.0, False, scale=scale)
    bias = torch.zeros(keep.shape, dtype=grouped.dtype).masked_fill_(~keep, -math.inf)
    bias = bias.repeat(groups, 1) if groups > 1 else bias
    out, lse = flash(grouped, k_span, v_span, 0.0, False, attn_mask=bias, scale=scale)
    # The op reports 0 for a row that saw only -inf; the contract is out 0, lse -inf.
    attended = keep.any(-1).repeat(groups)                                                  # [groups * rows]
    if not bool(attended.all()):
        out = out.masked_fill(~attended.view(1, 1, -1, 1), 0.0)
        lse = lse.masked_fill(~attended.view(1, 1, -1), -math.inf)
    return out, lse


def _row_as_one_span(block_mask, key, value, q_start, rows, partial_blocks, full_blocks, dtype):
    """(k_span, v_span, bias) covering all of a row's blocks in one span, or None when the gaps are large.

    bias [rows, L] in ``dtype``: 0 where the query may attend, -inf elsewhere (gaps, masked positions).
    """
    kv_block, kv_len = block_mask.BLOCK_SIZE[1], key.shape[2]
    blocks = torch.cat([partial_blocks, full_blocks]).long()
    first, last = int(blocks.min()), int(blocks.max())
    if (last - first + 1) - blocks.numel() > MAX_GAP_FRACTION * blocks.numel():
        return None
    start, stop = first * kv_block, min(kv_len, (last + 1) * kv_block)
    bias = torch.full((rows, stop - start), -math.inf, dtype=dtype)
    for block in full_blocks.tolist():
        bias[:, block * kv_block - start:min(kv_len, (block + 1) * kv_block) - start] = 0.0
    positions = (partial_blocks.long().unsqueeze(-1) * kv_block + torch.arange(kv_block)).flatten()
    positions = positions[positions < kv_len]
    keep = _keep_tile(block_mask, q_start, rows, positions)
    bias[:, positions - start] = torch.zeros((), dtype=dtype).masked_fill(~keep, -math.inf)
    return key[:, :, start:stop], value[:, :, start:stop], bias


def fused_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask, *,
                    scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """query [B, Hq, Lq, D], key/value [B, Hkv, Lkv, D] (``applicable`` holds) -> out [B, Hq, Lq, D], lse [B, Hq, Lq]."""
    flash = _flash_op()
    batch, q_heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    groups = q_heads // kv_heads
    q_block, kv_block = block_mask.BLOCK_SIZE
    outs, lses = [], []
    for row in range(block_mask.num_blocks[0]):
        q_start = row * q_block
        q_tile = query[:, :, q_start:q_start + q_block]
        rows = q_tile.shape[2]
        # GQA: the query heads sharing a K/V head become extra rows, so K/V are never repeated.
        grouped = q_tile.reshape(batch, kv_heads, groups * rows, head_dim)
        (partial_count, partial), (full_count, full) = block_mask.row_layout(row)
        partial_blocks, full_blocks = partial[0, 0, :int(partial_count[0, 0])], full[0, 0, :int(full_count[0, 0])]
        one_span = None
        if partial_blocks.numel() and full_blocks.numel():
            one_span = _row_as_one_span(block_mask, key, value, q_start, rows, partial_blocks, full_blocks,
                                        query.dtype)
        parts = []
        if one_span is not None:
            # The row has full blocks, so every query row attends to something: no empty-row fix-up.
            k_span, v_span, bias = one_span
            parts.append(flash(grouped, k_span, v_span, 0.0, False, attn_mask=bias.repeat(groups, 1)
                               if groups > 1 else bias, scale=scale))
        else:
            if partial_blocks.numel():
                positions, k_span, v_span = _span(key, value, partial_blocks, kv_block)
                keep = _keep_tile(block_mask, q_start, rows, positions)
                parts.append(_flash_with_keep(flash, grouped, k_span, v_span, keep, groups, scale))
            if full_blocks.numel():
                _, k_span, v_span = _span(key, value, full_blocks, kv_block)
                parts.append(_flash_with_keep(flash, grouped, k_span, v_span, None, groups, scale))
        if parts:
            out, lse = _merge(parts)
        else:
            out = query.new_zeros(batch, kv_heads, groups * rows, head_dim)
            lse = torch.full((batch, kv_heads, groups * rows), -math.inf)
        outs.append(out.reshape(batch, q_heads, rows, head_dim))
        lses.append(lse.reshape(batch, q_heads, rows))
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)
