"""The split-KV decode kernel and its combine kernel: ordinary ``@triton.jit`` source.

Decode steps have one or a few query rows against a long KV cache. The prefill kernel's grid
(query tiles x B*Hq) would launch B*Hq programs, each streaming the whole cache for one query head
in a mostly empty 16-row tile, reading every K/V head once per query head of its group. Here:

- **GQA packing.** One program holds ``HEADS_PER_TILE`` query heads of one GQA group times their
  query rows: packed row ``r`` is query row ``r // HEADS_PER_TILE`` of head
  ``first_head + r % HEADS_PER_TILE``. All of them share one read of K/V. (The launcher packs a
  whole group when the BlockMask is the same for every head, else one head per program.)
- **Split KV.** The non-empty blocks of a row of the BlockMask (partial blocks, then full ones) are
  cut into ``NUM_SPLITS`` contiguous runs, one per program along grid axis 1. Each program writes
  its normalized partial output and its base-2 LSE; ``decode_combine_kernel`` merges the splits in
  split order (deterministic, no atomics). With one split the kernel writes the result directly.
- **Block sparsity** as in prefill: empty blocks are never visited, full blocks run without the
  predicate, partial blocks call ``MASK_FN``.
- **Paged K/V** (``PAGED``): logical position ``p`` of sequence ``b`` lives in physical page
  ``page_table[b, p // PAGE_SIZE]`` at row ``p % PAGE_SIZE``; K/V strides are then those of
  ``[num_pages, Hkv, PAGE_SIZE, D]`` (``stride_kb`` is the page stride), and positions at or past
  ``kv_lens[b]`` are never read.

What differs per (mask_mod, score_mod) arrives as constexpr functions (``MASK_FN(batch, head, q_idx,
kv_idx, *mask_captured)``, ``SCORE_FN(score, batch, head, q_idx, kv_idx, *score_captured)`` or None),
with the captured tensors as one tuple per mod. ``head`` is ``[BLOCK_M, 1]`` here (rows of several
heads share a tile), ``q_idx`` ``[BLOCK_M, 1]``, ``kv_idx`` ``[1, BLOCK_N]``.

Tensors: ``Q`` [B, Hq, Lq, D]; ``K`` [B, Hkv, Lkv, D] (or pages); ``V`` likewise with Dv; ``Out``
[B, Hq, Lq, Dv]; ``Lse`` [B, Hq, Lq] float32 natural log; ``PartOut`` float32 [NUM_SPLITS, B, Hq,
Lq, Dv] and ``PartLse`` float32 [NUM_SPLITS, B, Hq, Lq] (base 2), both contiguous; BlockMask lists
as in prefill (``Bm``/``Hm`` strides 0 where the mask broadcasts).

- **Pipelined loads.** The next step's block index and (paged) its keys' K/V row offsets, read
  from the page table, are computed at the end of a step and carried, so K/V addresses never wait
  on a load of their own step and K/V tiles stay in flight while a step computes (num_stages >= 3;
  at 2 stages Triton keeps one buffer for ``mma.sync`` operands in any case).
- **Offsets.** Per-row and per-key offsets (``position * stride``, ``page * page stride``) and the
  block-list offsets are 32-bit unless the launcher saw they can reach 2**31 (``ROW_OFFSETS_64``,
  ``LAYOUT_OFFSETS_64``); per-program bases (batch, head) are always 64-bit.

Grid: ``(NQ * ROW_TILES_PER_BLOCK * B * Hq // HEADS_PER_TILE, NUM_SPLITS)`` (``launch.DecodePlan.grid``):
axis 0 has room for any batch (2**31 - 1 programs), axis 1 for ``configs.MAX_SPLITS``. On axis 0 the row
tiles of one head tile come first (``row_programs`` = NQ * ROW_TILES_PER_BLOCK of them), then the head
tiles in (batch, head) order, so that the programs that read the same K/V -- the row tiles of one head
tile, and the head tiles of one GQA group when heads are not packed -- are launched side by side and
share its trip through L2. The splits of one row read disjoint key ranges and share nothing but the
block list: they go on the slow axis, each split a pass over every sequence.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..attention.blocks import (
    LN_2,
    LOG2_E_IN_KERNEL,
    head_dim_lanes,
    layout_offsets,
    load_tile,
    online_softmax_step,
    tile_positions,
)

LN_2_IN_KERNEL = tl.constexpr(LN_2)


@triton.jit
def paged_rows(pages, kv_block, sub_tile, seq_len, stride_kb, stride_kn, stride_vb, stride_vn,
               KV_BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """(K row offsets, V row offsets) ``[BLOCK_N]`` of the keys of sub-tile ``sub_tile`` of logical block
    ``kv_block``: ``page * page stride + row in page * row stride``, the physical page read from this
    sequence's row ``pages`` of the page table (page 0 for a key at or past ``seq_len``, which is not read).
    Only positions below ``seq_len`` read the table, so a block index of 0 (what the walk carries past its
    last step) reads entries that exist."""
    _, kv_pos, kv_valid = tile_positions(kv_block, sub_tile, KV_BLOCK_SIZE, BLOCK_N, seq_len)
    page = tl.load(pages + kv_pos // PAGE_SIZE, mask=kv_valid, other=0)
    row_in_page = kv_pos % PAGE_SIZE
    return page * stride_kb + row_in_page * stride_kn, page * stride_vb + row_in_page * stride_vn


@triton.jit(do_not_specialize=["q_len", "kv_len"])
def decode_split_kernel(
    Q, K, V, Out, Lse, PartOut, PartLse, page_table, kv_lens,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lse_b, stride_lse_h, stride_page_b,
    kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
    stride_layout_b, stride_layout_h, stride_layout_m,
    stride_index_b, stride_index_h, stride_index_m,
    q_len, kv_len, num_q_heads, gqa_groups, row_programs,
    scale_log2, score_scale,
    mask_captured, score_captured,
    MASK_FN: tl.constexpr, SCORE_FN: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    Q_BLOCK_SIZE: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr,
    KV_TILES_PER_BLOCK: tl.constexpr, ROW_TILES_PER_BLOCK: tl.constexpr,
    HEADS_PER_TILE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, CHECK_KV_BOUNDS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ROW_OFFSETS_64: tl.constexpr, LAYOUT_OFFSETS_64: tl.constexpr,
):
    # Grid axis 0: the row tiles of one head tile (row_programs = NQ * ROW_TILES_PER_BLOCK of them, adjacent),
    # then the head tiles in (batch, head) order; axis 1: the splits (see the module docstring for why).
    program = tl.program_id(0)
    split = tl.program_id(1)
    tile_id = program % row_programs
    head_tile = program // row_programs
    tiles_per_batch = num_q_heads // HEADS_PER_TILE
    batch = head_tile // tiles_per_batch
    first_head = (head_tile % tiles_per_batch) * HEADS_PER_TILE
    kv_head = first_head // gqa_groups

    # Packed rows: query row (within this mask block row) major, head minor.
    mask_row = tile_id // ROW_TILES_PER_BLOCK
    packed = (tile_id % ROW_TILES_PER_BLOCK) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in_block = packed // HEADS_PER_TILE
    head_in_tile = packed % HEADS_PER_TILE
    head = first_head + head_in_tile                                        # [BLOCK_M]
    q_pos = mask_row * Q_BLOCK_SIZE + row_in_block
    row_valid = (row_in_block < Q_BLOCK_SIZE) & (q_pos < q_len)
    q_idx = q_pos[:, None]                                                  # [BLOCK_M, 1]
    head_idx = head[:, None]

    offs_d, offs_dv, d_valid, dv_valid = head_dim_lanes(BLOCK_D, BLOCK_DV, HEAD_DIM, HEAD_DIM_V)

    if ROW_OFFSETS_64:
        # The launcher saw a per-row (or per-key) offset that can reach 2**31: the packed heads' and query
        # rows' offsets in one sequence of Q / Out (a long paged Lq), a key's in one (sequence, head) of
        # contiguous K / V, a page's in the page pool. Otherwise 32 bits, which address math prefers;
        # the per-program base offsets (batch, first head, KV head) are 64-bit either way.
        # (tl.cast, not .to: a stride of 1 arrives as a constexpr int.)
        stride_qh = tl.cast(stride_qh, tl.int64)
        stride_qm = tl.cast(stride_qm, tl.int64)
        stride_oh = tl.cast(stride_oh, tl.int64)
        stride_om = tl.cast(stride_om, tl.int64)
        stride_kn = tl.cast(stride_kn, tl.int64)
        stride_vn = tl.cast(stride_vn, tl.int64)
        stride_kb = tl.cast(stride_kb, tl.int64)
        stride_vb = tl.cast(stride_vb, tl.int64)
    q_base = Q + batch.to(tl.int64) * stride_qb + first_head.to(tl.int64) * stride_qh
    q_rows = head_in_tile * stride_qh + q_pos * stride_qm                      # [BLOCK_M]
    q_tile = tl.load(q_base + q_rows[:, None] + offs_d[None, :] * stride_qd,
                     mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    if UPCAST_DOT:
        q_tile = q_tile.to(tl.float32)
    if PAGED:
        seq_len = tl.load(kv_lens + batch)
        k_base = K + kv_head.to(tl.int64) * stride_kh
        v_base = V + kv_head.to(tl.int64) * stride_vh
        pages = page_table + batch.to(tl.int64) * stride_page_b
    else:
        seq_len = kv_len
        k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
        v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh

    running_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    accumulator = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # This program's run of the row's visits: partial blocks are visits [0, P), full ones [P, P + F).
    # (The block lists of all packed heads are those of the first: the launcher packs heads only when the
    # BlockMask is the same for every head.)
    layout_offset, index_offset = layout_offsets(LAYOUT_OFFSETS_64, batch, first_head, mask_row, stride_layout_b,
                                                 stride_layout_h, stride_layout_m, stride_index_b, stride_index_h,
                                                 stride_index_m)
    partial_count = tl.load(kv_num_blocks + layout_offset)
    full_count = tl.load(full_kv_num_blocks + layout_offset)
    per_split = tl.cdiv(partial_count + full_count, NUM_SPLITS)
    visit_start = split * per_split
    visit_end = tl.minimum(visit_start + per_split, partial_count + full_count)
    for phase in tl.static_range(2):
        if phase == 0:
            slot_start = tl.minimum(visit_start, partial_count)
            slot_end = tl.minimum(visit_end, partial_count)
            block_list = kv_indices + index_offset + slot_start
        else:
            slot_start = tl.maximum(visit_start, partial_count) - partial_count
            slot_end = tl.maximum(visit_end, partial_count) - partial_count
            block_list = full_kv_indices + index_offset + slot_start
        # One flat loop over this run's (block, sub-tile) steps. The block index -- and, paged, the K/V row
        # offsets of the keys, read from the page table -- are loaded one step ahead and carried: no K/V
        # address depends on a load of its own step, so the pipeliner keeps K/V tiles in flight in both
        # phases (loaded inside the step, they make it treat K/V as indirect loads: one buffer, async_wait
        # 0 at every step). The row offsets, not the pages, are carried: the pages would have to be kept
        # in both the K and the V tile's layout next to what the step computes from them (about 40 more
        # registers per thread on sm_90).
        num_steps = (slot_end - slot_start) * KV_TILES_PER_BLOCK
        kv_block = tl.load(block_list, mask=num_steps > 0, other=0)
        if PAGED:
            k_rows, v_rows = paged_rows(pages, kv_block, 0, seq_len, stride_kb, stride_kn, stride_vb, stride_vn,
                                        KV_BLOCK_SIZE, BLOCK_N, PAGE_SIZE)
        for step in range(0, num_steps):
            _, kv_pos, kv_valid = tile_positions(kv_block, step % KV_TILES_PER_BLOCK, KV_BLOCK_SIZE, BLOCK_N,
                                                 seq_len)                       # [BLOCK_N] logical positions
            kv_idx = kv_pos[None, :]
            if not PAGED:
                k_rows = kv_pos * stride_kn
                v_rows = kv_pos * stride_vn

            k_ptrs = k_base + k_rows[None, :] + offs_d[:, None] * stride_kd      # [BLOCK_D, BLOCK_N]
            k_tile = load_tile(k_ptrs, kv_valid[None, :], d_valid[:, None], CHECK_KV_BOUNDS, BLOCK_D != HEAD_DIM,
                               UPCAST_DOT)
            qk = tl.dot(q_tile, k_tile, input_precision=DOT_PRECISION)        # [BLOCK_M, BLOCK_N] fp32

            if SCORE_FN is not None:
                logits = SCORE_FN(qk * score_scale, batch, head_idx, q_idx, kv_idx, *score_captured) * LOG2_E_IN_KERNEL
            else:
                logits = qk * scale_log2
            if phase == 0:
                mask_keep = MASK_FN(batch, head_idx, q_idx, kv_idx, *mask_captured)
                if CHECK_KV_BOUNDS:
                    mask_keep = mask_keep & kv_valid[None, :]
                logits = tl.where(mask_keep, logits, float("-inf"))
            elif CHECK_KV_BOUNDS:
                logits = tl.where(kv_valid[None, :], logits, float("-inf"))

            probs, new_max, running_sum, accumulator = online_softmax_step(logits, running_max, running_sum,
                                                                           accumulator)
            v_ptrs = v_base + v_rows[:, None] + offs_dv[None, :] * stride_vd
            v_tile = load_tile(v_ptrs, kv_valid[:, None], dv_valid[None, :], CHECK_KV_BOUNDS, BLOCK_DV != HEAD_DIM_V,
                               UPCAST_DOT)
            accumulator = tl.dot(probs.to(v_tile.dtype), v_tile, accumulator, input_precision=DOT_PRECISION)
            running_max = new_max
            # The next step's block index and row offsets (nothing is read past the last step).
            has_next = step + 1 < num_steps
            kv_block = tl.load(block_list + (step + 1) // KV_TILES_PER_BLOCK, mask=has_next, other=0)
            if PAGED:
                k_rows, v_rows = paged_rows(pages, kv_block, (step + 1) % KV_TILES_PER_BLOCK, seq_len, stride_kb,
                                            stride_kn, stride_vb, stride_vn, KV_BLOCK_SIZE, BLOCK_N, PAGE_SIZE)

    attended = running_sum > 0.0
    safe_sum = tl.where(attended, running_sum, 1.0)
    out_tile = accumulator / safe_sum[:, None]
    lse_log2 = tl.where(attended, running_max + tl.log2(safe_sum), float("-inf"))
    store_mask = row_valid[:, None] & dv_valid[None, :]
    if NUM_SPLITS == 1:
        out_base = Out + batch.to(tl.int64) * stride_ob + first_head.to(tl.int64) * stride_oh
        out_rows = head_in_tile * stride_oh + q_pos * stride_om
        tl.store(out_base + out_rows[:, None] + offs_dv[None, :] * stride_od, out_tile.to(Out.dtype.element_ty),
                 mask=store_mask)
        # head_in_tile * stride_lse_h + q_pos < Hq * Lq: 32 bits (Q holds D times as many elements).
        lse_base = Lse + batch.to(tl.int64) * stride_lse_b + first_head.to(tl.int64) * stride_lse_h
        tl.store(lse_base + head_in_tile * stride_lse_h + q_pos, lse_log2 * LN_2_IN_KERNEL, mask=row_valid)
    else:
        # Partials are contiguous [NUM_SPLITS, B, Hq, Lq(, Dv)] float32: this program's rows start at
        # (split, batch, first_head); head_tile * HEADS_PER_TILE = batch * Hq + first_head, and the grid
        # holds B * Hq // HEADS_PER_TILE head tiles. 64-bit when the launcher saw the partials reach 2**31.
        head_tiles = tl.num_programs(0) // row_programs
        first_row = (split.to(tl.int64) * head_tiles + head_tile) * HEADS_PER_TILE * q_len
        part_rows = head_in_tile * q_len + q_pos                                                    # [BLOCK_M]
        if ROW_OFFSETS_64:
            part_rows = part_rows.to(tl.int64)
        tl.store(PartOut + first_row * HEAD_DIM_V + part_rows[:, None] * HEAD_DIM_V + offs_dv[None, :], out_tile,
                 mask=store_mask)
        tl.store(PartLse + first_row + part_rows, lse_log2, mask=row_valid)


@triton.jit
def decode_combine_kernel(
    PartOut, PartLse, Out, Lse,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lse_b, stride_lse_h,
    num_rows, q_len, num_q_heads,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
):
    """Merge the splits of one query row: ``out = sum_s 2^(lse_s - m) out_s / sum_s 2^(lse_s - m)``.

    Grid: ``(B * Hq * Lq,)``. ``num_rows`` = B * Hq * Lq (the stride between splits of the partials).
    Splits that saw no allowed key carry lse -inf and weigh 0; a row that no split attended stores 0
    and lse -inf.
    """
    row = tl.program_id(0)
    batch = row // (num_q_heads * q_len)
    head = (row // q_len) % num_q_heads
    q_pos = row % q_len
    splits = tl.arange(0, BLOCK_SPLITS)
    offs_dv = tl.arange(0, BLOCK_DV)
    split_valid = splits < NUM_SPLITS
    part_rows = splits.to(tl.int64) * num_rows + row
    lse_parts = tl.load(PartLse + part_rows, mask=split_valid, other=float("-inf"))    # [BLOCK_SPLITS]
    top = tl.max(lse_parts, 0)
    shift = tl.where(top == float("-inf"), 0.0, top)
    weights = tl.exp2(lse_parts - shift)
    total = tl.sum(weights, 0)
    out_parts = tl.load(PartOut + part_rows[:, None] * HEAD_DIM_V + offs_dv[None, :],
                        mask=split_valid[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    attended = total > 0.0
    merged = tl.sum(out_parts * weights[:, None], 0) / tl.where(attended, total, 1.0)
    lse = tl.where(attended, (shift + tl.log2(tl.where(attended, total, 1.0))) * LN_2_IN_KERNEL, float("-inf"))
    out_ptrs = Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + q_pos * stride_om
    tl.store(out_ptrs + offs_dv * stride_od, merged.to(Out.dtype.element_ty), mask=offs_dv < HEAD_DIM_V)
    tl.store(Lse + batch.to(tl.int64) * stride_lse_b + head.to(tl.int64) * stride_lse_h + q_pos, lse)
