"""Inference fast path of the ``torch`` backend: PyTorch's fused CPU flash kernel.

Two routes, both through ``aten::_scaled_dot_product_flash_attention_for_cpu``:

- *dense*, for calls whose whole score grid is small (decode steps, short prompts; at most
  ``DENSE_BIAS_ELEMENTS`` mask elements): one call with the mask as an additive ``-inf`` bias
  ``[Bm, 1, Lq, Lkv]``. The bias is derived once per BlockMask (``BlockMask.derived``), so the
  layers of a model that share one mask share one bias, as they do with ``sdpa``.
- *blockwise*, for each query block row: the *full* KV blocks with no mask, the *partial* blocks
  with the mask_mod's tile as a bias (or one span with a bias when the gaps are small), merged by
  their log-sum-exps. Empty blocks are skipped and the mask_mod runs on partial tiles only. On a
  2-core CPU this is level with ``torch.compile(flex_attention)`` at 8k tokens (bench/results).

A mask that depends on the batch (padding, packed documents) is walked one batch entry at a time.

Masked-out keys stay out: a NaN or inf in a key or value that the mask hides from a row would
reach that row through the bias addition (``nan + -inf = nan``, ``inf + -inf = nan``) or through
``0 * nan``, and always as a NaN in the output. So the output is checked (one reduction over
``[B, Hq, Lq, Dv]``, far cheaper than scanning K/V on every decode step); if it holds a NaN,
``fused_attention`` returns None and the caller takes the exact blockwise loop, which masks scores
after computing them and zeroes non-finite values outside the rows that weight them (and so gives NaN
exactly in the rows that do see a NaN key or value).

It applies only where it is exact and simple: float32, no score_mod, no gradient needed, the
BlockMask broadcast over heads, D == Dv, and the op present in this torch build: the route
(``dispatch.py``) sends such calls here (family ``cpu_flash``).
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from ...masks.block_mask import BlockMask
from ...masks.evaluate import call_mask_mod


def flash_op():
    """PyTorch's fused CPU attention (``.default``: no overload resolution per call), or None."""
    packet = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return None if packet is None else packet.default


# Mask elements (Bm * Lq * Lkv) up to which a call takes the dense route (one flash call with a bias).
DENSE_BIAS_ELEMENTS = 1 << 22


def _no_leak(out: torch.Tensor) -> bool:
    """Whether no hidden NaN/inf reached the output (see the module docstring: a leak always shows up as a
    NaN). One reduction: the sum is NaN when any element is (or when +inf and -inf both appear, legitimate
    only if rare; the exact loop then recomputes the same result)."""
    return not math.isnan(float(out.sum()))


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


def merge_parts(parts: List[Tuple[torch.Tensor, torch.Tensor]], compute: torch.dtype
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax results over disjoint key sets, ``(out [..., rows, Dv], lse [..., rows])`` each, as one
    result over their union (in ``compute``). A row no part saw gets out 0, lse -inf."""
    if len(parts) == 1:
        out, lse = parts[0]
        return out.to(compute), lse.to(compute)
    lses = torch.stack([lse.to(compute) for _, lse in parts])                       # [n, ..., rows]
    top = lses.amax(dim=0)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    weights = torch.exp(lses - top)
    total = weights.sum(dim=0)
    out = parts[0][0].to(compute) * weights[0].unsqueeze(-1)
    for (part, _), weight in zip(parts[1:], weights[1:]):
        out = out.addcmul_(part.to(compute), weight.unsqueeze(-1))
    seen = total > 0
    out = out / torch.where(seen, total, torch.ones_like(total)).unsqueeze(-1)
    lse = torch.where(seen, top + torch.log(total), torch.full_like(total, float("-inf")))
    return out, lse


# One call over the blocks' whole span (gaps masked with -inf) beats two calls and a merge as long as
# the gaps are small: sliding windows and documents give one contiguous run per row.
MAX_GAP_FRACTION = 0.25


def _keep_tile(block_mask: BlockMask, q_start: int, rows: int, positions: torch.Tensor, batch: int = 0) -> torch.Tensor:
    """The mask_mod of batch entry ``batch`` on query rows [q_start, q_start + rows) x ``positions``:
    bool [rows, len(positions)]."""
    b = torch.full((1, 1, 1, 1), batch, dtype=torch.long)
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    q_idx = torch.arange(q_start, q_start + rows).view(1, 1, -1, 1)
    return call_mask_mod(block_mask.mask_mod, b, h, q_idx, positions.view(1, 1, 1, -1),
                         (1, 1, rows, positions.numel()))[0, 0]


def _expand_blocks(blocks: torch.Tensor, block_size, seq_lengths) -> torch.Tensor:
    """Bool block map ``[..., NQ, NKV]`` as an element map ``[..., Lq, Lkv]``."""
    q_bs, kv_bs = block_size
    q_len, kv_len = seq_lengths
    q_block_of = torch.arange(q_len, device=blocks.device) // q_bs
    kv_block_of = torch.arange(kv_len, device=blocks.device) // kv_bs
    return blocks[..., q_block_of, :][..., kv_block_of]


def dense_keep(block_mask: BlockMask) -> torch.Tensor:
    """Bool ``[Bm, 1, Lq, Lkv]``: the mask of every element, derived once per mask; full blocks attend,
    partial ones ask the mask_mod. A mask with an exact layout (``BlockMask.exact_layout``) is the mask_mod
    itself everywhere, so its index lists are not read (nor built, if deferred)."""
    return block_mask.derived("cpu_flash_keep", lambda: _dense_keep(block_mask))


def _dense_keep(block_mask: BlockMask) -> torch.Tensor:
    batch = block_mask.shape[0]
    q_len, kv_len = block_mask.seq_lengths

    def mask_mod_everywhere():
        b = torch.arange(batch).view(-1, 1, 1, 1)
        h = torch.zeros(1, 1, 1, 1, dtype=torch.long)
        q_idx, kv_idx = torch.arange(q_len).view(1, 1, -1, 1), torch.arange(kv_len).view(1, 1, 1, -1)
        return call_mask_mod(block_mask.mask_mod, b, h, q_idx, kv_idx, (batch, 1, q_len, kv_len))

    if block_mask.exact_layout:
        return mask_mod_everywhere()
    full = _expand_blocks(block_mask.full_blocks(), block_mask.BLOCK_SIZE, block_mask.seq_lengths)
    partial = _expand_blocks(block_mask.partial_blocks(), block_mask.BLOCK_SIZE, block_mask.seq_lengths)
    return full | (partial & mask_mod_everywhere()) if bool(partial.any()) else full


def dense_bias(block_mask: BlockMask, groups: int):
    """(bias ``[Bm, 1, groups * Lq or 1, Lkv]`` float32 0/-inf for queries grouped by K/V head, attended rows
    ``[Bm, 1, Lq]`` bool, whether every row attends): derived once per mask and group count, so the
    layers of a model share it (``BlockMask.derived``)."""
    def make():
        keep = dense_keep(block_mask)
        bias = torch.where(keep, 0.0, -math.inf)
        attended = keep.any(-1)
        # One query row (a decode step): the op broadcasts the bias over the grouped rows itself, which is
        # faster than a stride-0 view of them (bench/results/generate_*).
        if groups > 1 and keep.shape[2] > 1:
            bias = bias.repeat(1, 1, groups, 1)
        return bias, attended, bool(attended.all())

    return block_mask.derived(f"cpu_flash_dense_{groups}", make)


def _dense_attention(flash, query, key, value, block_mask: BlockMask, scale: float):
    """The dense route: one flash call over all keys with the cached bias."""
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads = key.shape[1]
    groups = q_heads // kv_heads
    mask, attended, every_row_attends = dense_bias(block_mask, groups)
    grouped = query.reshape(batch, kv_heads, groups * q_len, head_dim)
    out, lse = flash(grouped, key, value, 0.0, False, attn_mask=mask, scale=scale)  # (broadcast over B)
    out, lse = out.reshape(batch, q_heads, q_len, head_dim), lse.reshape(batch, q_heads, q_len)
    # The op reports 0 for a row that saw only -inf; the contract is out 0, lse -inf.
    if not every_row_attends:
        rows = attended.expand(batch, q_heads, q_len)
        out = out.masked_fill(~rows.unsqueeze(-1), 0.0)
        lse = lse.masked_fill(~rows, -math.inf)
    return out, lse


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


def _row_as_one_span(block_mask, key, value, q_start, rows, partial_blocks, full_blocks, dtype, batch=0):
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
    keep = _keep_tile(block_mask, q_start, rows, positions, batch)
    bias[:, positions - start] = torch.zeros((), dtype=dtype).masked_fill(~keep, -math.inf)
    return key[:, :, start:stop], value[:, :, start:stop], bias


def fused_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask, *,
                    scale: float) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """query [B, Hq, Lq, D], key/value [B, Hkv, Lkv, D] (``applicable`` holds) -> out [B, Hq, Lq, D], lse [B, Hq, Lq];
    None when a hidden NaN/inf key or value leaked into the output (the caller then takes the exact loop)."""
    flash = flash_op()
    # The fused kernel reads rows of D contiguous elements; other strides come out wrong, not as errors.
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    mask_batch = block_mask.shape[0]
    q_len, kv_len = block_mask.seq_lengths
    if mask_batch * q_len * kv_len <= DENSE_BIAS_ELEMENTS:
        out, lse = _dense_attention(flash, query, key, value, block_mask, scale)
    elif mask_batch == 1:
        out, lse = _blockwise_rows(flash, query, key, value, block_mask, scale, 0)
    else:
        parts = [_blockwise_rows(flash, query[b:b + 1], key[b:b + 1], value[b:b + 1], block_mask, scale, b)
                 for b in range(mask_batch)]
        out, lse = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return (out, lse) if _no_leak(out) else None


def _blockwise_rows(flash, query, key, value, block_mask: BlockMask, scale: float, mask_batch_index: int):
    """The blockwise route over the layout of batch entry ``mask_batch_index``."""
    batch, q_heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    groups = q_heads // kv_heads
    q_block, kv_block = block_mask.BLOCK_SIZE
    b = mask_batch_index
    outs, lses = [], []
    for row in range(block_mask.num_blocks[0]):
        q_start = row * q_block
        q_tile = query[:, :, q_start:q_start + q_block]
        rows = q_tile.shape[2]
        # GQA: the query heads sharing a K/V head become extra rows, so K/V are never repeated.
        grouped = q_tile.reshape(batch, kv_heads, groups * rows, head_dim)
        (partial_count, partial), (full_count, full) = block_mask.row_layout(row)
        partial_blocks, full_blocks = partial[b, 0, :int(partial_count[b, 0])], full[b, 0, :int(full_count[b, 0])]
        one_span = None
        if partial_blocks.numel() and full_blocks.numel():
            one_span = _row_as_one_span(block_mask, key, value, q_start, rows, partial_blocks, full_blocks,
                                        query.dtype, b)
        parts = []
        if one_span is not None:
            # The row has full blocks, so every query row attends to something: no empty-row fix-up.
            k_span, v_span, bias = one_span
            parts.append(flash(grouped, k_span, v_span, 0.0, False, attn_mask=bias.repeat(groups, 1)
                               if groups > 1 else bias, scale=scale))
        else:
            if partial_blocks.numel():
                positions, k_span, v_span = _span(key, value, partial_blocks, kv_block)
                keep = _keep_tile(block_mask, q_start, rows, positions, b)
                parts.append(_flash_with_keep(flash, grouped, k_span, v_span, keep, groups, scale))
            if full_blocks.numel():
                _, k_span, v_span = _span(key, value, full_blocks, kv_block)
                parts.append(_flash_with_keep(flash, grouped, k_span, v_span, None, groups, scale))
        if parts:
            out, lse = merge_parts(parts, parts[0][0].dtype)
        else:
            out = query.new_zeros(batch, kv_heads, groups * rows, head_dim)
            lse = torch.full((batch, kv_heads, groups * rows), -math.inf)
        outs.append(out.reshape(batch, q_heads, rows, head_dim))
        lses.append(lse.reshape(batch, q_heads, rows))
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)
