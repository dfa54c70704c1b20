"""The backward attention kernels: ordinary ``@triton.jit`` source, specialized through constexpr functions.

Given the forward's ``Out`` and ``Lse`` and the incoming gradient ``dOut`` (and optionally ``dLse``),
with ``S = scale * Q K^T``, ``Z = score_mod(S)``, ``P = exp(Z - lse)``:

    dV = P^T dO        dP = dO V^T        delta = rowsum(dO * O) - dLse
    dZ = P * (dP - delta)                 dS = dZ * score_mod'(S)
    dQ = scale * dS K                     dK = scale * dS^T Q

Three kernels:

1. ``attention_backward_preprocess``: ``delta`` [B, Hq, Lq] float32.
2. The dK/dV kernel (``attention_backward_dkdv_kernel``): one program per ``BLOCK_N`` keys of one (batch, KV
   head). It holds its K/V tile and the dK/dV accumulators and walks the *transposed* layout
   (``q_num_blocks``/``q_indices`` partial, with the predicate; ``full_q_*`` without), once per
   query head of its GQA group. So dK/dV are summed over the group inside one program: no
   atomics (deterministic), and K/V are read once, never repeated per query head.
3. The dQ kernel (``attention_backward_dq_kernel``): one program per ``BLOCK_M`` query rows of one (batch, query
   head), walking the forward layout (``kv_num_blocks``/``kv_indices``, ``full_kv_*``), like the
   forward kernel. Each dQ row is owned by exactly one program: no atomics.

Attention dropout (``DROPOUT``; ``triton_attn.dropout``): with ``Zd = keep / (1 - p)`` the forward's
output is ``(P * Zd) @ V``, so ``dV = (P * Zd)^T dO`` and ``dP = (dO V^T) * Zd``; ``delta = rowsum(dO * O)``
of that (dropped) output is still ``rowsum(P * dP)``, and ``dZ = P * (dP - delta)`` as without dropout
(the lse has none). Each kernel regenerates the forward's keep decisions with ``blocks.dropout_keep``
from the seed and the (query row, key) positions -- the dK/dV kernel's transposed tile included -- and
applies ``1 / (1 - p)`` once to dV's accumulator, per element to dP. ``dropout_p`` / ``dropout_seed``
are None without dropout.

Splitting dQ from dK/dV recomputes ``P`` twice (FlashAttention-2's choice for determinism) but
needs no atomic adds and no dQ accumulator in global memory. The dK/dV kernel can itself be
launched twice, computing only dV (``COMPUTE_DV``) and then only dK (``COMPUTE_DK``): each launch
holds one float32 accumulator, which is what lets 128 keys x 64 query rows at head_dim 128 fit
in registers on Hopper (``backward_launch.HOPPER_BACKWARD_CONFIGS``), for one more recompute of P.

Per (mask_mod, score_mod), as for the forward kernel (``kernels/jit/functions.py``): ``MASK_FN``,
``SCORE_FN`` (None without a score_mod) and ``SCORE_GRAD_FN`` (value and derivative together, so
they share subexpressions; None when the derivative is the constant ``SCORE_GRAD_CONSTANT``, 1.0
without a score_mod), with ``mask_captured`` / ``score_captured`` tuples.

Index shapes: in the dQ kernel (query rows x keys) ``q_idx`` is ``[BLOCK_M, 1]`` and ``kv_idx``
``[1, BLOCK_N]``, as in the forward; in the dK/dV kernel the tile is transposed (keys x query
rows): ``kv_idx`` is ``[BLOCK_N, 1]`` and ``q_idx`` ``[1, BLOCK_M]``. The generated functions only
broadcast, so the same functions serve both.

P is recomputed from the forward's softmax statistics ``Stats`` [B, Hq, Lq, 2] (per row the final
base-2 shift and 1 / sum): ``P = exp2(scores * factor - shift) * (1 / sum)``, the same scores (the
same generated function, one FMA) and the same normalization as the forward, never through the
rounded lse (whose float32 rounding at |lse| ~ 40, under an amplifying score_mod like ``s * 8``,
alone puts several times a plain float32 softmax's error into every P). The launcher builds the
statistics from the lse when the forward did not keep them (``shift = lse * log2(e)``, 1 / sum = 1).
Rows that attend to nothing have 1 / sum = 0 and only -inf scores: P = 0 and their gradients are 0,
not NaN. Padding rows of a tile (past ``q_len``) have no statistics (shift 0, 1 / sum 0): the dK/dV
kernel clamps their exponent at 64, so P = 0 there whatever their scores -- a position-dependent bias
(``s + (q - kv)``, ALiBi) is largest in those rows, and unclamped ``exp2`` of it overflows: ``inf * 0`` =
NaN would be summed into every key's dK / dV (a real row's exponent is <= 0 up to rounding). The next
query/key block index is loaded one step ahead and carried, as in the forward kernel, so every loop
keeps ``num_stages - 1`` tile loads in flight.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .blocks import (
    LOG2_E_IN_KERNEL,
    batch_head_program,
    dropout_keep,
    head_dim_lanes,
    layout_offsets,
    phase_blocks,
    query_tile_program,
    tile_positions,
)


@triton.jit
def scores_log2_factor(SCORE_FN: tl.constexpr, scale_log2):
    """The positive factor from the kernels' ``scores`` to base-2 logits: ``scale * log2(e)`` for the
    raw ``qk`` (no score_mod), ``log2(e)`` for a score_mod's output (already scaled)."""
    if SCORE_FN is not None:
        return LOG2_E_IN_KERNEL
    else:
        return scale_log2


@triton.jit
def shifted_dp_transposed(v_tile, do_tile, delta_ptrs, row_valid, keep, keep_scale, CHECK_Q_BOUNDS: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, DROPOUT: tl.constexpr):
    """``dP^T - delta`` [BLOCK_N, BLOCK_M] for the dK/dV kernel: ``V dO^T`` (v_tile [BLOCK_N, BLOCK_DV],
    do_tile [BLOCK_M, BLOCK_DV]) minus each query row's ``delta`` (``delta_ptrs`` [BLOCK_M]). With
    ``DROPOUT``, ``V dO^T`` is taken where ``keep`` [BLOCK_N, BLOCK_M] and times ``keep_scale``, 0 elsewhere."""
    if CHECK_Q_BOUNDS:
        delta = tl.load(delta_ptrs, mask=row_valid, other=0.0)
    else:
        delta = tl.load(delta_ptrs)
    dp = tl.dot(v_tile, tl.trans(do_tile), input_precision=DOT_PRECISION)
    if DROPOUT:
        dp = tl.where(keep, dp * keep_scale, 0.0)
    return dp - delta[None, :]


@triton.jit(do_not_specialize=["q_len", "batch_heads"])
def attention_backward_preprocess(
    Out, DOut, DLse, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dlse_b, stride_dlse_h,
    q_len, num_q_heads, batch_heads,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr,
    ROW_OFFSETS_64: tl.constexpr, FOLD_BATCH_HEADS: tl.constexpr,
):
    """``Delta[b, h, i] = sum_d dOut * Out - dLse`` in float32.

    Out, DOut [B, Hq, Lq, Dv] (input dtype), DLse [B, Hq, Lq] float32 (unused unless HAS_DLSE),
    Delta [B, Hq, Lq] float32, contiguous. Grid ``(cdiv(Lq, BLOCK_M), B * Hq)``, the pairs folded over
    axes 1 and 2 when ``FOLD_BATCH_HEADS`` (``tiling.batch_head_axes``; ``batch_heads`` = B * Hq).
    ROW_OFFSETS_64: row * row stride can reach 2**31 (dO as a [B, S, H, D] view: row stride H * D).
    """
    batch_head = batch_head_program(FOLD_BATCH_HEADS)
    if FOLD_BATCH_HEADS:
        if batch_head >= batch_heads:  # a spare program of the folded grid
            return
    if ROW_OFFSETS_64:
        stride_om = stride_om.to(tl.int64)
        stride_dom = stride_dom.to(tl.int64)
    batch = batch_head // num_q_heads
    head = batch_head % num_q_heads
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_DV)
    row_valid = rows < q_len
    tile_mask = row_valid[:, None] & (cols < HEAD_DIM_V)[None, :]
    out = tl.load(Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
                  + rows[:, None] * stride_om + cols[None, :] * stride_od, mask=tile_mask, other=0.0)
    grad = tl.load(DOut + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
                   + rows[:, None] * stride_dom + cols[None, :] * stride_dod, mask=tile_mask, other=0.0)
    delta = tl.sum(out.to(tl.float32) * grad.to(tl.float32), 1)
    if HAS_DLSE:
        # d lse_i / d Z_ij = P_ij, so a gradient on lse enters exactly like -delta.
        delta -= tl.load(DLse + batch.to(tl.int64) * stride_dlse_b + head.to(tl.int64) * stride_dlse_h + rows,
                         mask=row_valid, other=0.0)
    tl.store(Delta + batch_head.to(tl.int64) * q_len + rows, delta, mask=row_valid)


@triton.jit(do_not_specialize=["q_len", "kv_len", "batch_heads"])
def attention_backward_dkdv_kernel(
    Q, K, V, DOut, Stats, Delta, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    q_num_blocks, q_indices, full_q_num_blocks, full_q_indices,
    stride_layout_b, stride_layout_h, stride_layout_n,
    stride_index_b, stride_index_h, stride_index_n,
    q_len, kv_len, num_kv_heads, gqa_groups, batch_heads,
    scale_log2, score_scale,
    dropout_p, dropout_seed,
    mask_captured, score_captured,
    MASK_FN: tl.constexpr, SCORE_FN: tl.constexpr, SCORE_GRAD_FN: tl.constexpr, SCORE_GRAD_CONSTANT: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    Q_BLOCK_SIZE: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr,
    Q_TILES_PER_BLOCK: tl.constexpr, KV_TILES_PER_BLOCK: tl.constexpr,
    CHECK_Q_BOUNDS: tl.constexpr, CHECK_KV_BOUNDS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ROW_OFFSETS_64: tl.constexpr, LAYOUT_OFFSETS_64: tl.constexpr, FOLD_BATCH_HEADS: tl.constexpr,
    HEAVY_TILES_LAST: tl.constexpr,
    KEYS_FIRST: tl.constexpr, COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr, DROPOUT: tl.constexpr,
):
    # Q [B, Hq, Lq, D], DOut [B, Hq, Lq, Dv]; K, DK [B, Hkv, Lkv, D]; V, DV [B, Hkv, Lkv, Dv];
    # Stats [B, Hq, Lq, 2], Delta [B, Hq, Lq] float32 contiguous. Grid: (kv tiles, B * Hkv) (folded over
    # axes 1 and 2 past 65,535 pairs, ``batch_heads`` = B * Hkv), key tiles in order (under a causal-like
    # mask the first key tiles are the heaviest already).
    tile_id = tl.program_id(0)
    batch_head = batch_head_program(FOLD_BATCH_HEADS)
    if FOLD_BATCH_HEADS:
        if batch_head >= batch_heads:  # a spare program of the folded grid
            return
    batch = batch_head // num_kv_heads
    kv_head = batch_head % num_kv_heads
    num_q_heads = num_kv_heads * gqa_groups

    # This program's keys all lie in mask block column ``mask_col``; keys are the tile's rows.
    mask_col = tile_id // KV_TILES_PER_BLOCK
    cols_in_block, kv_pos, kv_valid = tile_positions(mask_col, tile_id % KV_TILES_PER_BLOCK, KV_BLOCK_SIZE, BLOCK_N,
                                                     kv_len)                # [BLOCK_N]
    kv_idx = kv_pos[:, None]                                                # [BLOCK_N, 1]
    offs_d, offs_dv, d_valid, dv_valid = head_dim_lanes(BLOCK_D, BLOCK_DV, HEAD_DIM, HEAD_DIM_V)
    if ROW_OFFSETS_64:
        # position * row stride can reach 2**31 (see the forward kernel).
        stride_qm = stride_qm.to(tl.int64)
        stride_kn = stride_kn.to(tl.int64)
        stride_vn = stride_vn.to(tl.int64)
        stride_dom = stride_dom.to(tl.int64)
        stride_dkn = stride_dkn.to(tl.int64)
        stride_dvn = stride_dvn.to(tl.int64)
    scores_to_log2 = scores_log2_factor(SCORE_FN, scale_log2)
    if DROPOUT:
        seed = tl.load(dropout_seed)
        keep_scale = 1.0 / (1.0 - dropout_p)
    else:
        keep_scale = 1.0

    # KEYS_FIRST: K as loaded, [BLOCK_N, BLOCK_D], for the scores K @ Q^T. Otherwise K transposed,
    # [BLOCK_D, BLOCK_N], exactly as the forward loads it, for Q @ K^T (see below).
    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    if KEYS_FIRST:
        k_tile = tl.load(k_base + kv_pos[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                         mask=kv_valid[:, None] & d_valid[None, :], other=0.0)    # [BLOCK_N, BLOCK_D]
    else:
        k_tile = tl.load(k_base + kv_pos[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                         mask=kv_valid[None, :] & d_valid[:, None], other=0.0)    # [BLOCK_D, BLOCK_N]
    if UPCAST_DOT:
        k_tile = k_tile.to(tl.float32)
    if COMPUTE_DK:
        v_tile = tl.load(V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
                         + kv_pos[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                         mask=kv_valid[:, None] & dv_valid[None, :], other=0.0)   # [BLOCK_N, BLOCK_DV]
        if UPCAST_DOT:
            v_tile = v_tile.to(tl.float32)
    dk_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    # GQA: the query heads sharing this KV head are summed here, in a fixed order (deterministic).
    for group_member in range(0, gqa_groups):
        head = kv_head * gqa_groups + group_member
        q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
        do_base = DOut + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
        row_base = (batch * num_q_heads + head).to(tl.int64) * q_len     # Stats / Delta are contiguous
        layout_offset, index_offset = layout_offsets(LAYOUT_OFFSETS_64, batch, head, mask_col, stride_layout_b,
                                                     stride_layout_h, stride_layout_n, stride_index_b,
                                                     stride_index_h, stride_index_n)
        for phase in tl.static_range(2):
            # phase 0: partial query blocks of this column, predicate applied; phase 1: full ones.
            block_count, block_list = phase_blocks(phase, q_num_blocks, q_indices, full_q_num_blocks, full_q_indices,
                                                   layout_offset, index_offset)
            # The block index is loaded one step ahead and carried (see the forward kernel), so the
            # Q / dO loads pipeline num_stages - 1 deep.
            num_steps = block_count * Q_TILES_PER_BLOCK
            q_block = tl.load(block_list, mask=num_steps > 0, other=0)
            for step in range(0, num_steps):
                rows_in_block, q_pos, row_valid = tile_positions(q_block, step % Q_TILES_PER_BLOCK, Q_BLOCK_SIZE,
                                                                 BLOCK_M, q_len)  # [BLOCK_M]
                q_idx = q_pos[None, :]                                         # [1, BLOCK_M]

                q_ptrs = q_base + q_pos[:, None] * stride_qm + offs_d[None, :] * stride_qd
                do_ptrs = do_base + q_pos[:, None] * stride_dom + offs_dv[None, :] * stride_dod
                stats_ptrs = Stats + (row_base + q_pos) * 2
                if CHECK_Q_BOUNDS:
                    q_tile = tl.load(q_ptrs, mask=row_valid[:, None] & d_valid[None, :], other=0.0)
                    do_tile = tl.load(do_ptrs, mask=row_valid[:, None] & dv_valid[None, :], other=0.0)
                    shift = tl.load(stats_ptrs, mask=row_valid, other=0.0)
                    inverse_sum = tl.load(stats_ptrs + 1, mask=row_valid, other=0.0)
                else:
                    q_tile = tl.load(q_ptrs, mask=d_valid[None, :], other=0.0)
                    do_tile = tl.load(do_ptrs, mask=dv_valid[None, :], other=0.0)
                    shift = tl.load(stats_ptrs)
                    inverse_sum = tl.load(stats_ptrs + 1)
                if UPCAST_DOT:
                    q_tile = q_tile.to(tl.float32)
                    do_tile = do_tile.to(tl.float32)
                if DROPOUT:
                    # The forward's keep decisions for these (row, key) pairs: the tile is keys x rows.
                    keep = dropout_keep(seed, dropout_p, row_base, q_idx, kv_idx, kv_len)  # [BLOCK_N, BLOCK_M]
                else:
                    keep = None

                if COMPUTE_DK and not COMPUTE_DV:
                    # dK alone: dP^T - delta first, so that delta, and P's shift and 1 / sum, are never
                    # held at the same time (in the fused kernel dV's product goes first instead).
                    dp_shifted = shifted_dp_transposed(v_tile, do_tile, Delta + row_base + q_pos, row_valid, keep,
                                                       keep_scale, CHECK_Q_BOUNDS, DOT_PRECISION, DROPOUT)

                # The forward's scores, reduced along the whole head_dim in the same steps, so they meet
                # its shift and 1 / sum (a different rounding is an error amplifying score_mods
                # multiply). With 16-bit inputs every product is exact in float32, and K Q^T reduces
                # the same products in the same order as Q K^T (a dot's rounding follows its reduction
                # order, not which operand comes first). Computed with the keys as rows, the scores
                # spread over both warpgroups: Q K^T, feeding a second dot, is laid out on
                # [num_warps, 1] warps, so 64 query rows would be replicated in both. float32 inputs
                # (3xTF32, whose two cross terms would swap order) take Q K^T, transposed.
                if KEYS_FIRST:
                    qk = tl.dot(k_tile, tl.trans(q_tile), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
                else:
                    qk = tl.trans(tl.dot(q_tile, k_tile, input_precision=DOT_PRECISION))

                if SCORE_GRAD_FN is not None:
                    scores, dscore = SCORE_GRAD_FN(qk * score_scale, batch, head, q_idx, kv_idx, *score_captured)
                elif SCORE_FN is not None:
                    scores = SCORE_FN(qk * score_scale, batch, head, q_idx, kv_idx, *score_captured)
                else:
                    scores = qk

                if phase == 0:
                    mask_keep = MASK_FN(batch, head, q_idx, kv_idx, *mask_captured)
                    if CHECK_KV_BOUNDS:
                        mask_keep = mask_keep & kv_valid[:, None]
                    scores = tl.where(mask_keep, scores, float("-inf"))
                elif CHECK_KV_BOUNDS:
                    scores = tl.where(kv_valid[:, None], scores, float("-inf"))

                # P exactly as the forward normalized it: its final shift and 1 / sum per row.
                exponent = tl.fma(scores, scores_to_log2, -shift[None, :])
                if CHECK_Q_BOUNDS:
                    # Padding rows have no statistics (shift 0, 1 / sum 0), and a position bias is largest
                    # there: exp2 of it overflows, and inf * 0 = NaN would reach every key's dK / dV through
                    # the dots over the rows. A real row's exponent is <= 0 up to the rounding of its shift
                    # (an ulp of |shift|), far below the clamp, so only padding rows change: exp2(64) * 0 = 0.
                    # (Cheaper on sm_90 than a shift of +inf there: ~30 registers and a spill at D = 128.)
                    exponent = tl.minimum(exponent, 64.0)
                probs = tl.exp2(exponent) * inverse_sum[None, :]  # P^T
                if COMPUTE_DV:
                    if DROPOUT:
                        # (P * keep)^T dO; 1 / (1 - p) is applied to the accumulator at the end.
                        dv_acc = tl.dot(tl.where(keep, probs, 0.0).to(do_tile.dtype), do_tile, dv_acc,
                                        input_precision=DOT_PRECISION)
                    else:
                        dv_acc = tl.dot(probs.to(do_tile.dtype), do_tile, dv_acc, input_precision=DOT_PRECISION)
                if COMPUTE_DK:
                    if COMPUTE_DV:
                        dp_shifted = shifted_dp_transposed(v_tile, do_tile, Delta + row_base + q_pos, row_valid,
                                                           keep, keep_scale, CHECK_Q_BOUNDS, DOT_PRECISION, DROPOUT)
                    dz = probs * dp_shifted
                    if SCORE_GRAD_FN is not None:
                        # P == 0 (masked, padded, underflowed) means dZ == 0; the derivative there may be inf/NaN.
                        ds = tl.where(probs > 0.0, dz * dscore, 0.0)
                    else:
                        ds = dz * SCORE_GRAD_CONSTANT
                    dk_acc = tl.dot(ds.to(q_tile.dtype), q_tile, dk_acc, input_precision=DOT_PRECISION)
                q_block = tl.load(block_list + (step + 1) // Q_TILES_PER_BLOCK, mask=step + 1 < num_steps, other=0)

    if COMPUTE_DK:
        # dK = scale * dS^T Q: the scale is applied once here, not per tile.
        dk_acc = dk_acc * score_scale
        dk_ptrs = (DK + batch.to(tl.int64) * stride_dkb + kv_head.to(tl.int64) * stride_dkh
                   + kv_pos[:, None] * stride_dkn + offs_d[None, :] * stride_dkd)
        tl.store(dk_ptrs, dk_acc.to(DK.dtype.element_ty), mask=kv_valid[:, None] & d_valid[None, :])
    if COMPUTE_DV:
        if DROPOUT:
            dv_acc = dv_acc * keep_scale
        dv_ptrs = (DV + batch.to(tl.int64) * stride_dvb + kv_head.to(tl.int64) * stride_dvh
                   + kv_pos[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd)
        tl.store(dv_ptrs, dv_acc.to(DV.dtype.element_ty), mask=kv_valid[:, None] & dv_valid[None, :])



@triton.jit(do_not_specialize=["q_len", "kv_len", "batch_heads"])
def attention_backward_dq_kernel(
    Q, K, V, DOut, Stats, Delta, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
    stride_layout_b, stride_layout_h, stride_layout_m,
    stride_index_b, stride_index_h, stride_index_m,
    q_len, kv_len, num_q_heads, gqa_groups, batch_heads,
    scale_log2, score_scale,
    dropout_p, dropout_seed,
    mask_captured, score_captured,
    MASK_FN: tl.constexpr, SCORE_FN: tl.constexpr, SCORE_GRAD_FN: tl.constexpr, SCORE_GRAD_CONSTANT: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    Q_BLOCK_SIZE: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr,
    Q_TILES_PER_BLOCK: tl.constexpr, KV_TILES_PER_BLOCK: tl.constexpr,
    CHECK_KV_BOUNDS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ROW_OFFSETS_64: tl.constexpr, LAYOUT_OFFSETS_64: tl.constexpr, FOLD_BATCH_HEADS: tl.constexpr,
    HEAVY_TILES_LAST: tl.constexpr, DROPOUT: tl.constexpr,
):
    # Q, DQ [B, Hq, Lq, D], DOut [B, Hq, Lq, Dv], K [B, Hkv, Lkv, D], V [B, Hkv, Lkv, Dv];
    # Stats [B, Hq, Lq, 2], Delta [B, Hq, Lq] float32 contiguous. Grid: (query tiles, B * Hq), as
    # the forward (folded alike), and like it heaviest tiles first under causal-like masks.
    batch_head = batch_head_program(FOLD_BATCH_HEADS)
    if FOLD_BATCH_HEADS:
        if batch_head >= batch_heads:  # a spare program of the folded grid
            return
    batch, head, kv_head, mask_row, rows_in_block, q_pos, row_valid = query_tile_program(
        batch_head, HEAVY_TILES_LAST, num_q_heads, gqa_groups, Q_TILES_PER_BLOCK, Q_BLOCK_SIZE, BLOCK_M, q_len)
    q_idx = q_pos[:, None]                                                  # [BLOCK_M, 1]
    offs_d, offs_dv, d_valid, dv_valid = head_dim_lanes(BLOCK_D, BLOCK_DV, HEAD_DIM, HEAD_DIM_V)
    if ROW_OFFSETS_64:
        stride_qm = stride_qm.to(tl.int64)
        stride_kn = stride_kn.to(tl.int64)
        stride_vn = stride_vn.to(tl.int64)
        stride_dom = stride_dom.to(tl.int64)
        stride_dqm = stride_dqm.to(tl.int64)
    scores_to_log2 = scores_log2_factor(SCORE_FN, scale_log2)

    q_tile = tl.load(Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
                     + q_pos[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                     mask=row_valid[:, None] & d_valid[None, :], other=0.0)       # [BLOCK_M, BLOCK_D]
    do_tile = tl.load(DOut + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
                      + q_pos[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                      mask=row_valid[:, None] & dv_valid[None, :], other=0.0)     # [BLOCK_M, BLOCK_DV]
    if UPCAST_DOT:
        q_tile = q_tile.to(tl.float32)
        do_tile = do_tile.to(tl.float32)
    row_base = batch_head.to(tl.int64) * q_len    # (batch * Hq + head) rows: Stats / Delta are contiguous
    # Padding rows and rows that attended to nothing have 1 / sum = 0 (a padding row's P may be NaN here,
    # but it stays in its own row, which is never stored).
    shift = tl.load(Stats + (row_base + q_pos) * 2, mask=row_valid, other=0.0)
    inverse_sum = tl.load(Stats + (row_base + q_pos) * 2 + 1, mask=row_valid, other=0.0)
    delta = tl.load(Delta + row_base + q_pos, mask=row_valid, other=0.0)
    dq_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if DROPOUT:
        seed = tl.load(dropout_seed)
        keep_scale = 1.0 / (1.0 - dropout_p)

    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    layout_offset, index_offset = layout_offsets(LAYOUT_OFFSETS_64, batch, head, mask_row, stride_layout_b,
                                                 stride_layout_h, stride_layout_m, stride_index_b, stride_index_h,
                                                 stride_index_m)
    for phase in tl.static_range(2):
        block_count, block_list = phase_blocks(phase, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                                               layout_offset, index_offset)
        num_steps = block_count * KV_TILES_PER_BLOCK
        kv_block = tl.load(block_list, mask=num_steps > 0, other=0)
        for step in range(0, num_steps):
            cols_in_block, kv_pos, kv_valid = tile_positions(kv_block, step % KV_TILES_PER_BLOCK, KV_BLOCK_SIZE,
                                                             BLOCK_N, kv_len)  # [BLOCK_N]
            kv_idx = kv_pos[None, :]                                            # [1, BLOCK_N]

            # K loaded transposed, [BLOCK_D, BLOCK_N], as the forward loads it (same scores, same rounding).
            k_ptrs = k_base + kv_pos[None, :] * stride_kn + offs_d[:, None] * stride_kd
            v_ptrs = v_base + kv_pos[:, None] * stride_vn + offs_dv[None, :] * stride_vd
            if CHECK_KV_BOUNDS:
                k_tile = tl.load(k_ptrs, mask=kv_valid[None, :] & d_valid[:, None], other=0.0)
                v_tile = tl.load(v_ptrs, mask=kv_valid[:, None] & dv_valid[None, :], other=0.0)
            else:
                k_tile = tl.load(k_ptrs, mask=d_valid[:, None], other=0.0)
                v_tile = tl.load(v_ptrs, mask=dv_valid[None, :], other=0.0)
            if UPCAST_DOT:
                k_tile = k_tile.to(tl.float32)
                v_tile = v_tile.to(tl.float32)
            qk = tl.dot(q_tile, k_tile, input_precision=DOT_PRECISION)   # [BLOCK_M, BLOCK_N], as the forward

            if SCORE_GRAD_FN is not None:
                scores, dscore = SCORE_GRAD_FN(qk * score_scale, batch, head, q_idx, kv_idx, *score_captured)
            elif SCORE_FN is not None:
                scores = SCORE_FN(qk * score_scale, batch, head, q_idx, kv_idx, *score_captured)
            else:
                scores = qk

            if phase == 0:
                mask_keep = MASK_FN(batch, head, q_idx, kv_idx, *mask_captured)
                if CHECK_KV_BOUNDS:
                    mask_keep = mask_keep & kv_valid[None, :]
                scores = tl.where(mask_keep, scores, float("-inf"))
            elif CHECK_KV_BOUNDS:
                scores = tl.where(kv_valid[None, :], scores, float("-inf"))

            probs = tl.exp2(tl.fma(scores, scores_to_log2, -shift[:, None])) * inverse_sum[:, None]  # [M, N]
            dp = tl.dot(do_tile, tl.trans(v_tile), input_precision=DOT_PRECISION)
            if DROPOUT:
                # dP of the dropped product: (dO V^T) * keep / (1 - p), with the forward's keep decisions.
                dp = tl.where(dropout_keep(seed, dropout_p, row_base, q_idx, kv_idx, kv_len), dp * keep_scale, 0.0)
            dz = probs * (dp - delta[:, None])

            if SCORE_GRAD_FN is not None:
                # P == 0 (masked, padded, underflowed) means dZ == 0; the derivative there may be inf/NaN.
                ds = tl.where(probs > 0.0, dz * dscore, 0.0)
            else:
                ds = dz * SCORE_GRAD_CONSTANT

            dq_acc = tl.dot(ds.to(k_tile.dtype), tl.trans(k_tile), dq_acc, input_precision=DOT_PRECISION)
            kv_block = tl.load(block_list + (step + 1) // KV_TILES_PER_BLOCK, mask=step + 1 < num_steps, other=0)

    dq_acc = dq_acc * score_scale
    dq_ptrs = (DQ + batch.to(tl.int64) * stride_dqb + head.to(tl.int64) * stride_dqh
               + q_pos[:, None] * stride_dqm + offs_d[None, :] * stride_dqd)
    tl.store(dq_ptrs, dq_acc.to(DQ.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])
