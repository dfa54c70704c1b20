"""The forward attention kernel: ordinary ``@triton.jit`` source, specialized through constexpr functions.

What differs per (mask_mod, score_mod) arrives as ``tl.constexpr`` arguments built by
``kernels/jit/functions.py`` (the only generated source):

- ``MASK_FN(batch, head, q_idx, kv_idx, *mask_captured) -> keep``: the mask predicate, applied on
  partial blocks only (``jit.predicates.keep_all`` when there are none, ``bitmask_keep`` for
  untraceable mask_mods);
- ``SCORE_FN(score, batch, head, q_idx, kv_idx, *score_captured) -> score``: the score_mod in natural
  units, or None (then the raw ``qk`` is the score, scaled once inside the softmax's FMA).

``mask_captured`` / ``score_captured`` are tuples (pointer, sizes, strides per captured tensor).

Algorithm (one program = one tile of ``BLOCK_M`` query rows of one (batch, query head)):

1. Load the Q tile once ``[BLOCK_M, BLOCK_D]`` (head_dim zero-padded to a power of two).
2. Phase 0 walks the *partial* KV blocks of this query block row (``kv_num_blocks`` /
   ``kv_indices``) and applies the predicate; phase 1 walks the *full* blocks
   (``full_kv_num_blocks`` / ``full_kv_indices``) without it (``blocks.phase_blocks``). Each mask
   block is walked in ``KV_TILES_PER_BLOCK`` steps of ``BLOCK_N`` keys.
3. Online softmax in base 2: the row max is taken on the unscaled scores and the scale (folded
   into ``log2(e)``) enters once per score, as the FMA ``scores * factor - shift`` before ``exp2``;
   running max / sum / accumulator stay in float32. The next block index is loaded at the end of
   each step and carried, which keeps ``num_stages - 1`` K/V loads in flight in both phases.
4. Rows that never saw an allowed key end with ``running_sum == 0``: they store 0 and an LSE of
   ``-inf`` instead of 0/0.
5. ``DROPOUT`` (attention dropout, ``triton_attn.dropout``): the probabilities that meet V are zeroed
   where ``blocks.dropout_keep`` drops them and the output is multiplied by ``1 / (1 - p)`` once, at the
   end: ``(P * keep / (1 - p)) @ V`` with one multiply per row instead of one per probability. The
   running sum, hence the normalization, the lse and the statistics, are those
   without dropout. ``dropout_p`` (float) and ``dropout_seed`` (int64 ``[1]``, read here, so a captured
   graph replays with a fresh seed) are None without dropout: the launch then compiles as before.

Tensor arguments (all strides in elements; ``Bm``/``Hm`` are the BlockMask's own batch/head
sizes and their strides are 0 when the mask broadcasts):

- ``Q`` [B, Hq, Lq, D], ``K`` [B, Hkv, Lkv, D], ``V`` [B, Hkv, Lkv, Dv], ``Out`` [B, Hq, Lq, Dv]
  (input dtype), ``Lse`` [B, Hq, Lq] float32, natural log; ``Stats`` [B, Hq, Lq, 2] float32
  contiguous (written when ``STORE_STATS``: per row the final base-2 shift and 1 / sum, for the
  backward's recompute of P).
- ``kv_num_blocks`` / ``full_kv_num_blocks`` int32 [Bm, Hm, NQ] (strides ``stride_layout_*``),
  ``kv_indices`` / ``full_kv_indices`` int32 [Bm, Hm, NQ, NKV] (strides ``stride_index_*``).
- ``dropout_seed`` int64 [1] (with ``DROPOUT``; else None).

Grid: ``(NQ * Q_TILES_PER_BLOCK, B * Hq)`` (``tiling.launch_grid``; past 65,535 (batch, head) pairs
folded over axes 1 and 2, ``FOLD_BATCH_HEADS``, with ``batch_heads`` = B * Hq to stop the spare programs).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .blocks import (
    LN_2,
    LOG2_E_IN_KERNEL,
    batch_head_program,
    dropout_keep,
    head_dim_lanes,
    layout_offsets,
    phase_blocks,
    query_tile_program,
    tile_positions,
)

LN_2_IN_KERNEL = tl.constexpr(LN_2)


@triton.jit(do_not_specialize=["q_len", "kv_len", "batch_heads"])
def attention_forward_kernel(
    Q, K, V, Out, Lse, Stats,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lse_b, stride_lse_h,
    kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
    stride_layout_b, stride_layout_h, stride_layout_m,
    stride_index_b, stride_index_h, stride_index_m,
    q_len, kv_len, num_q_heads, gqa_groups, batch_heads,
    scale_log2, score_scale,
    dropout_p, dropout_seed,
    mask_captured, score_captured,
    MASK_FN: tl.constexpr, SCORE_FN: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    Q_BLOCK_SIZE: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr,
    Q_TILES_PER_BLOCK: tl.constexpr, KV_TILES_PER_BLOCK: tl.constexpr,
    CHECK_KV_BOUNDS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ROW_OFFSETS_64: tl.constexpr, LAYOUT_OFFSETS_64: tl.constexpr, FOLD_BATCH_HEADS: tl.constexpr,
    HEAVY_TILES_LAST: tl.constexpr, STORE_STATS: tl.constexpr, DROPOUT: tl.constexpr,
):
    batch_head = batch_head_program(FOLD_BATCH_HEADS)
    if FOLD_BATCH_HEADS:
        if batch_head >= batch_heads:  # a spare program of the folded grid
            return
    batch, head, kv_head, mask_row, rows_in_block, q_pos, row_valid = query_tile_program(
        batch_head, HEAVY_TILES_LAST, num_q_heads, gqa_groups, Q_TILES_PER_BLOCK, Q_BLOCK_SIZE, BLOCK_M, q_len)
    q_idx = q_pos[:, None]                                                  # [BLOCK_M, 1]
    offs_d, offs_dv, d_valid, dv_valid = head_dim_lanes(BLOCK_D, BLOCK_DV, HEAD_DIM, HEAD_DIM_V)

    if ROW_OFFSETS_64:
        # The launcher saw that position * row stride can reach 2**31 (a [B, S, H, D] view of a
        # long sequence): row products in 64 bits. Otherwise 32 bits, which address math prefers.
        stride_qm = stride_qm.to(tl.int64)
        stride_kn = stride_kn.to(tl.int64)
        stride_vn = stride_vn.to(tl.int64)
        stride_om = stride_om.to(tl.int64)
    # 64-bit base offsets: batch * stride can exceed 2**31 for long sequences.
    q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    q_tile = tl.load(q_base + q_pos[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                     mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    if UPCAST_DOT:
        q_tile = q_tile.to(tl.float32)

    # Scores are raw qk (no score_mod) or the score_mod's output; these positive factors take them
    # to base-2 logits and to natural-log units.
    if SCORE_FN is not None:
        scores_to_log2 = LOG2_E_IN_KERNEL
        scores_to_natural = 1.0
    else:
        scores_to_log2 = scale_log2
        scores_to_natural = score_scale
    running_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    running_shift = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)   # base 2, as applied
    running_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    accumulator = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if DROPOUT:
        seed = tl.load(dropout_seed)
        row_base = batch_head.to(tl.int64) * q_len     # (batch * Hq + head) * Lq: the dropout counter's rows

    # Where this (batch, head, mask_row) finds its block lists; stride 0 where the mask broadcasts.
    layout_offset, index_offset = layout_offsets(LAYOUT_OFFSETS_64, batch, head, mask_row, stride_layout_b,
                                                 stride_layout_h, stride_layout_m, stride_index_b, stride_index_h,
                                                 stride_index_m)
    for phase in tl.static_range(2):
        # phase 0: partial blocks, predicate applied; phase 1: full blocks, no predicate.
        block_count, block_list = phase_blocks(phase, kv_num_blocks, kv_indices, full_kv_num_blocks,
                                               full_kv_indices, layout_offset, index_offset)
        # One flat loop over (block, sub-tile) pairs: a single pipelined loop instead of two nested ones.
        # The block index is loaded one step ahead and carried: no K/V address depends on a load
        # of its own step, so the pipeliner keeps num_stages - 1 K/V tiles in flight in both phases
        # (an index loaded in the step makes it treat K/V as indirect loads: one stage, two buffers).
        num_steps = block_count * KV_TILES_PER_BLOCK
        kv_block = tl.load(block_list, mask=num_steps > 0, other=0)
        for step in range(0, num_steps):
            cols_in_block, kv_pos, kv_valid = tile_positions(kv_block, step % KV_TILES_PER_BLOCK, KV_BLOCK_SIZE,
                                                             BLOCK_N, kv_len)
            kv_idx = kv_pos[None, :]                                            # [1, BLOCK_N]

            # K is loaded transposed, [BLOCK_D, BLOCK_N], ready for Q @ K^T.
            k_ptrs = k_base + kv_pos[None, :] * stride_kn + offs_d[:, None] * stride_kd
            if CHECK_KV_BOUNDS:
                k_tile = tl.load(k_ptrs, mask=kv_valid[None, :] & d_valid[:, None], other=0.0)
            elif BLOCK_D != HEAD_DIM:
                k_tile = tl.load(k_ptrs, mask=d_valid[:, None], other=0.0)
            else:
                k_tile = tl.load(k_ptrs)
            if UPCAST_DOT:
                k_tile = k_tile.to(tl.float32)
            qk = tl.dot(q_tile, k_tile, input_precision=DOT_PRECISION)        # [BLOCK_M, BLOCK_N] fp32

            if SCORE_FN is not None:
                # The score_mod sees scores in natural units.
                scores = SCORE_FN(qk * score_scale, batch, head, q_idx, kv_idx, *score_captured)
            else:
                scores = qk  # raw: scaled once below, inside the exp2's FMA

            if phase == 0:
                mask_keep = MASK_FN(batch, head, q_idx, kv_idx, *mask_captured)
                if CHECK_KV_BOUNDS:
                    mask_keep = mask_keep & kv_valid[None, :]
                scores = tl.where(mask_keep, scores, float("-inf"))
            elif CHECK_KV_BOUNDS:
                scores = tl.where(kv_valid[None, :], scores, float("-inf"))

            # Online softmax in base 2, the row max taken on the unscaled scores (the factor is
            # positive, so it commutes with max): one explicit FMA per score, scores * factor - shift,
            # rounded once near 0 rather than at the scores' magnitude (the interpreter's tl.fma is
            # fused too). The correction uses the previous step's shift as it was applied, so every
            # probability stays consistent with the final shift whatever its rounding.
            # A row that has only seen masked keys keeps running_max == -inf; shifting it by 0
            # instead makes its probabilities exp2(-inf) = 0 rather than NaN.
            new_max = tl.maximum(running_max, tl.max(scores, 1))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max * scores_to_log2)
            correction = tl.exp2(running_shift - shift)
            probs = tl.exp2(tl.fma(scores, scores_to_log2, -shift[:, None]))
            running_sum = running_sum * correction + tl.sum(probs, 1)
            accumulator = accumulator * correction[:, None]

            v_ptrs = v_base + kv_pos[:, None] * stride_vn + offs_dv[None, :] * stride_vd
            if CHECK_KV_BOUNDS:
                v_tile = tl.load(v_ptrs, mask=kv_valid[:, None] & dv_valid[None, :], other=0.0)
            elif BLOCK_DV != HEAD_DIM_V:
                v_tile = tl.load(v_ptrs, mask=dv_valid[None, :], other=0.0)
            else:
                v_tile = tl.load(v_ptrs)
            if UPCAST_DOT:
                v_tile = v_tile.to(tl.float32)
            if DROPOUT:
                # Dropped probabilities leave the product, not the sum: 1 / (1 - p) is applied at the end.
                probs = tl.where(dropout_keep(seed, dropout_p, row_base, q_idx, kv_idx, kv_len), probs, 0.0)
            accumulator = tl.dot(probs.to(v_tile.dtype), v_tile, accumulator, input_precision=DOT_PRECISION)
            running_max = new_max
            running_shift = shift
            kv_block = tl.load(block_list + (step + 1) // KV_TILES_PER_BLOCK, mask=step + 1 < num_steps, other=0)

    attended = running_sum > 0.0
    safe_sum = tl.where(attended, running_sum, 1.0)
    if DROPOUT:
        out_tile = accumulator * ((1.0 / (1.0 - dropout_p)) / safe_sum)[:, None]
    else:
        out_tile = accumulator / safe_sum[:, None]
    # LSE in natural log: max in natural units + ln(sum).
    lse = tl.where(attended, running_max * scores_to_natural + tl.log2(safe_sum) * LN_2_IN_KERNEL, float("-inf"))

    out_ptrs = (Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
                + q_pos[:, None] * stride_om + offs_dv[None, :] * stride_od)
    tl.store(out_ptrs, out_tile.to(Out.dtype.element_ty), mask=row_valid[:, None] & dv_valid[None, :])
    lse_ptrs = Lse + batch.to(tl.int64) * stride_lse_b + head.to(tl.int64) * stride_lse_h + q_pos
    tl.store(lse_ptrs, lse, mask=row_valid)
    if STORE_STATS:
        # For the backward: the final base-2 shift and 1 / sum per row, so that it recomputes
        # P = exp2(scores * factor - shift) / sum exactly as this pass normalized it. Going through
        # the lse instead rounds at the lse's magnitude (|lse| ~ 40 under an amplifying score_mod,
        # an error ~ 2e-6 in every P, several times a plain float32 softmax's).
        final_shift = tl.where(attended, running_shift, 0.0)
        inverse_sum = tl.where(attended, 1.0 / safe_sum, 0.0)
        stats_ptrs = Stats + (batch_head.to(tl.int64) * q_len + q_pos) * 2  # batch_head = batch * Hq + head
        tl.store(stats_ptrs, final_shift, mask=row_valid)
        tl.store(stats_ptrs + 1, inverse_sum, mask=row_valid)
