"""``@triton.jit`` helpers shared by the attention kernels: the block walk and the softmax constants.

Every attention kernel walks a BlockMask layout the same way: for one row (or, transposed, one
column) of mask blocks, phase 0 visits the *partial* blocks (the mask predicate applies), phase 1
the *full* blocks (no predicate); empty blocks are never visited. Each mask block is covered by
``TILES_PER_BLOCK`` tiles of the kernel's tile size, so the walk is one flat loop over
(block slot, sub-tile) steps -- a single loop that Triton software-pipelines.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2_E = 1.4426950408889634     # log2(e): the kernels' softmax runs in base 2
LN_2 = 0.6931471805599453       # ln(2): back from base 2 to natural log (the lse)
LOG2_E_IN_KERNEL = tl.constexpr(LOG2_E)


@triton.jit
def batch_head_program(FOLD_BATCH_HEADS: tl.constexpr):
    """The (batch * heads + head) pair this program works on: grid axis 1, or, for more pairs than one axis
    takes (``tiling.batch_head_axes``), folded over axes 1 and 2. A folded grid has spare programs past
    the last pair: the kernel returns for them (a return must sit in the kernel itself)."""
    if FOLD_BATCH_HEADS:
        return tl.program_id(1) + tl.program_id(2) * tl.num_programs(1)
    else:
        return tl.program_id(1)


@triton.jit
def layout_offsets(LAYOUT_OFFSETS_64: tl.constexpr, batch, head, row, stride_layout_b, stride_layout_h,
                   stride_layout_row, stride_index_b, stride_index_h, stride_index_row):
    """(offset of the block count, offset of the block list) of one row (or column) of a block layout:
    ``counts[batch, head, row]`` and ``indices[batch, head, row, :]``. In 64 bits when the launcher saw
    a layout tensor of 2**31 elements or more (``host.needs_64bit_offsets``: many (batch, head) pairs
    x blocks), else in 32, which address math prefers."""
    if LAYOUT_OFFSETS_64:
        batch = batch.to(tl.int64)
        head = head.to(tl.int64)
        row = row.to(tl.int64)
    return (batch * stride_layout_b + head * stride_layout_h + row * stride_layout_row,
            batch * stride_index_b + head * stride_index_h + row * stride_index_row)


@triton.jit
def phase_blocks(PHASE: tl.constexpr, num_blocks, indices, full_num_blocks, full_indices, layout_offset,
                 index_offset):
    """(block count, pointer to the block list) of one row of the layout in phase 0 (partial) or 1 (full)."""
    if PHASE == 0:
        block_count = tl.load(num_blocks + layout_offset)
        block_list = indices + index_offset
    else:
        block_count = tl.load(full_num_blocks + layout_offset)
        block_list = full_indices + index_offset
    return block_count, block_list


@triton.jit
def query_tile_program(batch_head, HEAVY_TILES_LAST: tl.constexpr, num_q_heads, gqa_groups,
                       Q_TILES_PER_BLOCK: tl.constexpr, Q_BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, q_len):
    """What a program of a query-tile grid ``(query tiles, B * Hq)`` (``batch_head``: its pair,
    ``batch_head_program``) works on: (batch, head, kv_head, mask block row, rows' offsets in that block,
    query positions, valid) -- the last three ``[BLOCK_M]``.

    HEAVY_TILES_LAST: under causal-like masks the last query tiles see the most keys; they are launched
    first, so light tiles fill the gaps at the end instead of one long tile finishing alone. GQA: query
    heads ``[g * groups, (g + 1) * groups)`` share key/value head ``g``; nothing is copied."""
    if HEAVY_TILES_LAST:
        tile_id = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        tile_id = tl.program_id(0)
    batch = batch_head // num_q_heads
    head = batch_head % num_q_heads
    mask_row = tile_id // Q_TILES_PER_BLOCK
    rows_in_block, q_pos, row_valid = tile_positions(mask_row, tile_id % Q_TILES_PER_BLOCK, Q_BLOCK_SIZE, BLOCK_M,
                                                     q_len)
    return batch, head, head // gqa_groups, mask_row, rows_in_block, q_pos, row_valid


@triton.jit
def head_dim_lanes(BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr):
    """(offs_d ``[BLOCK_D]``, offs_dv ``[BLOCK_DV]``, d_valid, dv_valid): the head-dim lanes of Q/K and of V,
    valid below the true head_dim (all valid unless it was padded to a power of two, e.g. 80 -> 128)."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    return offs_d, offs_dv, offs_d < HEAD_DIM, offs_dv < HEAD_DIM_V


@triton.jit
def tile_positions(block, sub_tile, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, length):
    """Sub-tile ``sub_tile`` of mask block ``block``: (offsets in the block, positions, valid) ``[TILE]``.

    A position is valid inside the sequence (``< length``) and inside its mask block (the last
    sub-tile of an odd block size overhangs it).
    """
    in_block = sub_tile * TILE + tl.arange(0, TILE)
    positions = block * BLOCK_SIZE + in_block
    valid = (positions < length) & (in_block < BLOCK_SIZE)
    return in_block, positions, valid


@triton.jit
def load_tile(pointers, bounds_mask, dim_mask, CHECK_BOUNDS: tl.constexpr, PADDED_DIM: tl.constexpr,
              UPCAST: tl.constexpr):
    """A K or V tile: masked by position (``bounds_mask``) only where a tile can overhang, by the padded
    head dim (``dim_mask``) only where the head dim was padded; float32 when ``UPCAST`` (the bf16
    interpreter workaround). Both masks broadcast against ``pointers``."""
    if CHECK_BOUNDS:
        tile = tl.load(pointers, mask=bounds_mask & dim_mask, other=0.0)
    elif PADDED_DIM:
        tile = tl.load(pointers, mask=dim_mask, other=0.0)
    else:
        tile = tl.load(pointers)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def online_softmax_step(logits, running_max, running_sum, accumulator):
    """One base-2 online-softmax step over ``logits`` ``[M, N]``: (probabilities, new running max, new
    running sum, accumulator rescaled to the new max). A row that has seen only masked keys keeps a
    running max of -inf and shifts by 0 instead, so its probabilities are 0, not NaN."""
    new_max = tl.maximum(running_max, tl.max(logits, 1))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    correction = tl.exp2(running_max - shift)
    probs = tl.exp2(logits - shift[:, None])
    return probs, new_max, running_sum * correction + tl.sum(probs, 1), accumulator * correction[:, None]


@triton.jit
def dropout_keep(seed, dropout_p, row_base, q_idx, kv_idx, kv_len):
    """Attention dropout's keep decision (``triton_attn.dropout``): True where the probability of query row
    ``q_idx`` and key ``kv_idx`` is kept, ``tl.rand(seed, counter) >= dropout_p`` with the 64-bit counter
    ``((b * Hq + h) * Lq + i) * Lkv + j``. ``row_base`` is ``(b * Hq + h) * Lq`` as int64 (b, h: the
    query's batch and head); ``q_idx`` / ``kv_idx`` broadcast against each other (``[M, 1]`` and ``[1, N]``
    for a query-major tile, ``[1, M]`` and ``[N, 1]`` for the dK/dV kernel's keys-major one: the same
    (row, key) gets the same counter whichever way a tile is laid out). ``seed``: int64 scalar.

    Every kernel that needs the mask (forward, dK/dV, dQ, ``dropout_mask``) calls this one function, so the
    backward regenerates exactly the forward's mask. ``tl.rand`` splits a 64-bit counter into its low and
    high 32 bits (Philox 4x32, 10 rounds) on every supported Triton (3.4 to 3.9)."""
    counter = (row_base + q_idx) * kv_len + kv_idx
    return tl.rand(seed, counter) >= dropout_p
