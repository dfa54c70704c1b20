"""The backward attention kernels, as Triton source templates that ``backward_codegen`` specializes.

Given the forward's ``Out`` and ``Lse`` and the incoming gradient ``dOut`` (and optionally ``dLse``),
with ``S = scale * Q K^T``, ``Z = score_mod(S)``, ``P = exp(Z - lse)``:

    dV = P^T dO        dP = dO V^T        delta = rowsum(dO * O) - dLse
    dZ = P * (dP - delta)                 dS = dZ * score_mod'(S)
    dQ = scale * dS K                     dK = scale * dS^T Q

Three kernels:

1. ``attention_backward_preprocess`` (plain, not templated): ``delta`` [B, Hq, Lq] float32.
2. The dK/dV kernel (``DKDV_TEMPLATE``): one program per ``BLOCK_N`` keys of one (batch, KV
   head). It holds its K/V tile and the dK/dV accumulators and walks the *transposed* layout
   (``q_num_blocks``/``q_indices`` partial, with the predicate; ``full_q_*`` without), once per
   query head of its GQA group. So dK/dV are summed over the group inside one program: no
   atomics (deterministic), and K/V are read once, never repeated per query head.
3. The dQ kernel (``DQ_TEMPLATE``): one program per ``BLOCK_M`` query rows of one (batch, query
   head), walking the forward layout (``kv_num_blocks``/``kv_indices``, ``full_kv_*``), like the
   forward kernel. Each dQ row is owned by exactly one program: no atomics.

Splitting dQ from dK/dV recomputes ``P`` twice (FlashAttention-2's choice for determinism) but
needs no atomic adds and no dQ accumulator in global memory.

Markers pasted by ``backward_codegen`` (same emitted expressions as the forward kernel):

- ``# @@CAPTURED_ARGS@@``: pointers, sizes and strides of captured tensors.
- ``# @@MASK_PREDICATE@@``: statements ending with ``mask_keep = <bool tile>``.
- ``# @@SCORE@@``: the forward's statements defining ``scores`` and, when the score_mod's
  derivative varies, ``dscore = <d score_mod / d score tile>``; ``# @@SCORE_UNITS@@`` the
  forward's unit factors. ``P = exp2((scores * scores_to_natural - lse) * log2(e))``.
- ``# @@SCORE_GRAD@@``: ``ds = dz * dscore`` (or ``ds = dz`` with no score_mod).

Index shapes: in the dQ kernel (query rows x keys) ``q_idx`` is ``[BLOCK_M, 1]`` and ``kv_idx``
``[1, BLOCK_N]``, as in the forward; in the dK/dV kernel the tile is transposed (keys x query
rows): ``kv_idx`` is ``[BLOCK_N, 1]`` and ``q_idx`` ``[1, BLOCK_M]``. The emitted expressions only
broadcast, so the same text works for both.

Rows that attend to nothing have ``lse = -inf``; padding rows past ``q_len`` read no ``lse``. Both
use ``lse = +inf`` here, so ``P = exp2(logits - inf) = 0`` exactly and their gradients are 0, not NaN.
"""

from __future__ import annotations

import triton.language as tl

# Bump when a template changes: it is part of the generated modules' cache key.
TEMPLATE_VERSION = 3
LOG2_E = 1.4426950408889634


def attention_backward_preprocess(
    Out, DOut, DLse, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dlse_b, stride_dlse_h,
    q_len, num_q_heads,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    """``Delta[b, h, i] = sum_d dOut * Out - dLse`` in float32.

    Out, DOut [B, Hq, Lq, Dv] (input dtype), DLse [B, Hq, Lq] float32 (unused unless HAS_DLSE),
    Delta [B, Hq, Lq] float32, contiguous. Grid ``(cdiv(Lq, BLOCK_M), B * Hq)``.
    Kept undecorated: ``backward_launch`` wraps it in a JITFunction or an interpreter function.
    """
    batch_head = tl.program_id(1)
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


DKDV_TEMPLATE = '''
def @@KERNEL_NAME@@(
    Q, K, V, DOut, Lse, Delta, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    q_num_blocks, q_indices, full_q_num_blocks, full_q_indices,
    stride_layout_b, stride_layout_h, stride_layout_n,
    stride_index_b, stride_index_h, stride_index_n,
    q_len, kv_len, num_kv_heads, gqa_groups,
    scale_log2, score_scale,
    # @@CAPTURED_ARGS@@
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    Q_BLOCK_SIZE: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr,
    Q_TILES_PER_BLOCK: tl.constexpr, KV_TILES_PER_BLOCK: tl.constexpr,
    CHECK_Q_BOUNDS: tl.constexpr, CHECK_KV_BOUNDS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ROW_OFFSETS_64: tl.constexpr, HEAVY_TILES_LAST: tl.constexpr, FAST_TANH: tl.constexpr,
):
    # Q [B, Hq, Lq, D], DOut [B, Hq, Lq, Dv]; K, DK [B, Hkv, Lkv, D]; V, DV [B, Hkv, Lkv, Dv];
    # Lse, Delta [B, Hq, Lq] float32 contiguous. Grid: (kv tiles, B * Hkv). Key tiles run in order
    # (HEAVY_TILES_LAST is about query tiles: under a causal-like mask the first key tiles are the
    # heaviest already).
    tile_id = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // num_kv_heads
    kv_head = batch_head % num_kv_heads
    num_q_heads = num_kv_heads * gqa_groups

    # This program's keys all lie in mask block column ``mask_col``; keys are the tile's rows.
    mask_col = tile_id // KV_TILES_PER_BLOCK
    cols_in_block = (tile_id % KV_TILES_PER_BLOCK) * BLOCK_N + tl.arange(0, BLOCK_N)
    kv_pos = mask_col * KV_BLOCK_SIZE + cols_in_block                        # [BLOCK_N]
    kv_valid = (kv_pos < kv_len) & (cols_in_block < KV_BLOCK_SIZE)
    kv_idx = kv_pos[:, None]                                                # [BLOCK_N, 1]

    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_valid = offs_d < HEAD_DIM
    dv_valid = offs_dv < HEAD_DIM_V
    if ROW_OFFSETS_64:
        # position * row stride can reach 2**31 (see the forward kernel).
        stride_qm = stride_qm.to(tl.int64)
        stride_kn = stride_kn.to(tl.int64)
        stride_vn = stride_vn.to(tl.int64)
        stride_dom = stride_dom.to(tl.int64)
        stride_dkn = stride_dkn.to(tl.int64)
        stride_dvn = stride_dvn.to(tl.int64)

    k_tile = tl.load(K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
                     + kv_pos[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                     mask=kv_valid[:, None] & d_valid[None, :], other=0.0)        # [BLOCK_N, BLOCK_D]
    v_tile = tl.load(V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
                     + kv_pos[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                     mask=kv_valid[:, None] & dv_valid[None, :], other=0.0)       # [BLOCK_N, BLOCK_DV]
    if UPCAST_DOT:
        k_tile = k_tile.to(tl.float32)
        v_tile = v_tile.to(tl.float32)
    dk_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    # @@SCORE_UNITS@@

    # GQA: the query heads sharing this KV head are summed here, in a fixed order (deterministic).
    for group_member in range(0, gqa_groups):
        head = kv_head * gqa_groups + group_member
        q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
        do_base = DOut + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
        row_base = (batch * num_q_heads + head).to(tl.int64) * q_len     # Lse / Delta are contiguous
        layout_offset = batch * stride_layout_b + head * stride_layout_h + mask_col * stride_layout_n
        index_offset = batch * stride_index_b + head * stride_index_h + mask_col * stride_index_n
        for phase in tl.static_range(2):
            # phase 0: partial query blocks of this column, predicate applied; phase 1: full ones.
            if phase == 0:
                block_count = tl.load(q_num_blocks + layout_offset)
                block_list = q_indices + index_offset
            else:
                block_count = tl.load(full_q_num_blocks + layout_offset)
                block_list = full_q_indices + index_offset
            # The block index is loaded one step ahead and carried (see the forward kernel): Q/dO
            # addresses depend on no load of their own step, so they pipeline num_stages - 1 deep.
            num_steps = block_count * Q_TILES_PER_BLOCK
            q_block = tl.load(block_list, mask=num_steps > 0, other=0)
            for step in range(0, num_steps):
                slot = step // Q_TILES_PER_BLOCK
                rows_in_block = (step % Q_TILES_PER_BLOCK) * BLOCK_M + tl.arange(0, BLOCK_M)
                q_pos = q_block * Q_BLOCK_SIZE + rows_in_block                 # [BLOCK_M]
                row_valid = (q_pos < q_len) & (rows_in_block < Q_BLOCK_SIZE)
                q_idx = q_pos[None, :]                                         # [1, BLOCK_M]

                q_ptrs = q_base + q_pos[:, None] * stride_qm + offs_d[None, :] * stride_qd
                do_ptrs = do_base + q_pos[:, None] * stride_dom + offs_dv[None, :] * stride_dod
                if CHECK_Q_BOUNDS:
                    q_tile = tl.load(q_ptrs, mask=row_valid[:, None] & d_valid[None, :], other=0.0)
                    do_tile = tl.load(do_ptrs, mask=row_valid[:, None] & dv_valid[None, :], other=0.0)
                    lse = tl.load(Lse + row_base + q_pos, mask=row_valid, other=float("inf"))
                    delta = tl.load(Delta + row_base + q_pos, mask=row_valid, other=0.0)
                else:
                    q_tile = tl.load(q_ptrs, mask=d_valid[None, :], other=0.0)
                    do_tile = tl.load(do_ptrs, mask=dv_valid[None, :], other=0.0)
                    lse = tl.load(Lse + row_base + q_pos)
                    delta = tl.load(Delta + row_base + q_pos)
                if UPCAST_DOT:
                    q_tile = q_tile.to(tl.float32)
                    do_tile = do_tile.to(tl.float32)
                # Rows that attended to nothing (lse = -inf) get lse = +inf: P = 0, not NaN.
                lse = tl.where(lse == float("-inf"), float("inf"), lse)

                qk = tl.dot(k_tile, tl.trans(q_tile), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]

                # @@SCORE@@

                if phase == 0:
                    # @@MASK_PREDICATE@@
                    if CHECK_KV_BOUNDS:
                        mask_keep = mask_keep & kv_valid[:, None]
                    scores = tl.where(mask_keep, scores, float("-inf"))
                elif CHECK_KV_BOUNDS:
                    scores = tl.where(kv_valid[:, None], scores, float("-inf"))

                # scores - lse in natural units first (one FMA), then to base 2: the large terms
                # cancel before any rounding at their magnitude (amplifying score_mods).
                probs = tl.exp2((scores * scores_to_natural - lse[None, :]) * 1.4426950408889634)  # P^T
                dv_acc = tl.dot(probs.to(do_tile.dtype), do_tile, dv_acc, input_precision=DOT_PRECISION)
                dp = tl.dot(v_tile, tl.trans(do_tile), input_precision=DOT_PRECISION)  # dP^T
                dz = probs * (dp - delta[None, :])

                # @@SCORE_GRAD@@

                dk_acc = tl.dot(ds.to(q_tile.dtype), q_tile, dk_acc, input_precision=DOT_PRECISION)
                q_block = tl.load(block_list + (step + 1) // Q_TILES_PER_BLOCK, mask=step + 1 < num_steps, other=0)

    # dK = scale * dS^T Q: the scale is applied once here, not per tile.
    dk_acc = dk_acc * score_scale
    dk_ptrs = (DK + batch.to(tl.int64) * stride_dkb + kv_head.to(tl.int64) * stride_dkh
               + kv_pos[:, None] * stride_dkn + offs_d[None, :] * stride_dkd)
    tl.store(dk_ptrs, dk_acc.to(DK.dtype.element_ty), mask=kv_valid[:, None] & d_valid[None, :])
    dv_ptrs = (DV + batch.to(tl.int64) * stride_dvb + kv_head.to(tl.int64) * stride_dvh
               + kv_pos[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd)
    tl.store(dv_ptrs, dv_acc.to(DV.dtype.element_ty), mask=kv_valid[:, None] & dv_valid[None, :])
'''


DQ_TEMPLATE = '''
def @@KERNEL_NAME@@(
    Q, K, V, DOut, Lse, Delta, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
    stride_layout_b, stride_layout_h, stride_layout_m,
    stride_index_b, stride_index_h, stride_index_m,
    q_len, kv_len, num_q_heads, gqa_groups,
    scale_log2, score_scale,
    # @@CAPTURED_ARGS@@
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    Q_BLOCK_SIZE: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr,
    Q_TILES_PER_BLOCK: tl.constexpr, KV_TILES_PER_BLOCK: tl.constexpr,
    CHECK_KV_BOUNDS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ROW_OFFSETS_64: tl.constexpr, HEAVY_TILES_LAST: tl.constexpr, FAST_TANH: tl.constexpr,
):
    # Q, DQ [B, Hq, Lq, D], DOut [B, Hq, Lq, Dv], K [B, Hkv, Lkv, D], V [B, Hkv, Lkv, Dv];
    # Lse, Delta [B, Hq, Lq] float32 contiguous. Grid: (query tiles, B * Hq), as the forward.
    if HEAVY_TILES_LAST:
        tile_id = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        tile_id = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // num_q_heads
    head = batch_head % num_q_heads
    kv_head = head // gqa_groups

    mask_row = tile_id // Q_TILES_PER_BLOCK
    rows_in_block = (tile_id % Q_TILES_PER_BLOCK) * BLOCK_M + tl.arange(0, BLOCK_M)
    q_pos = mask_row * Q_BLOCK_SIZE + rows_in_block                         # [BLOCK_M]
    row_valid = (q_pos < q_len) & (rows_in_block < Q_BLOCK_SIZE)
    q_idx = q_pos[:, None]                                                  # [BLOCK_M, 1]

    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_valid = offs_d < HEAD_DIM
    dv_valid = offs_dv < HEAD_DIM_V
    if ROW_OFFSETS_64:
        stride_qm = stride_qm.to(tl.int64)
        stride_kn = stride_kn.to(tl.int64)
        stride_vn = stride_vn.to(tl.int64)
        stride_dom = stride_dom.to(tl.int64)
        stride_dqm = stride_dqm.to(tl.int64)

    q_tile = tl.load(Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
                     + q_pos[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                     mask=row_valid[:, None] & d_valid[None, :], other=0.0)       # [BLOCK_M, BLOCK_D]
    do_tile = tl.load(DOut + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
                      + q_pos[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                      mask=row_valid[:, None] & dv_valid[None, :], other=0.0)     # [BLOCK_M, BLOCK_DV]
    if UPCAST_DOT:
        q_tile = q_tile.to(tl.float32)
        do_tile = do_tile.to(tl.float32)
    row_base = batch_head.to(tl.int64) * q_len                              # Lse / Delta are contiguous
    lse = tl.load(Lse + row_base + q_pos, mask=row_valid, other=float("inf"))
    delta = tl.load(Delta + row_base + q_pos, mask=row_valid, other=0.0)
    # Rows that attended to nothing (lse = -inf) get lse = +inf: P = 0, not NaN.
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    dq_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # @@SCORE_UNITS@@

    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    layout_offset = batch * stride_layout_b + head * stride_layout_h + mask_row * stride_layout_m
    index_offset = batch * stride_index_b + head * stride_index_h + mask_row * stride_index_m
    for phase in tl.static_range(2):
        if phase == 0:
            block_count = tl.load(kv_num_blocks + layout_offset)
            block_list = kv_indices + index_offset
        else:
            block_count = tl.load(full_kv_num_blocks + layout_offset)
            block_list = full_kv_indices + index_offset
        num_steps = block_count * KV_TILES_PER_BLOCK
        kv_block = tl.load(block_list, mask=num_steps > 0, other=0)
        for step in range(0, num_steps):
            slot = step // KV_TILES_PER_BLOCK
            cols_in_block = (step % KV_TILES_PER_BLOCK) * BLOCK_N + tl.arange(0, BLOCK_N)
            kv_pos = kv_block * KV_BLOCK_SIZE + cols_in_block                   # [BLOCK_N]
            kv_valid = (kv_pos < kv_len) & (cols_in_block < KV_BLOCK_SIZE)
            kv_idx = kv_pos[None, :]                                            # [1, BLOCK_N]

            k_ptrs = k_base + kv_pos[:, None] * stride_kn + offs_d[None, :] * stride_kd
            v_ptrs = v_base + kv_pos[:, None] * stride_vn + offs_dv[None, :] * stride_vd
            if CHECK_KV_BOUNDS:
                k_tile = tl.load(k_ptrs, mask=kv_valid[:, None] & d_valid[None, :], other=0.0)
                v_tile = tl.load(v_ptrs, mask=kv_valid[:, None] & dv_valid[None, :], other=0.0)
            else:
                k_tile = tl.load(k_ptrs, mask=d_valid[None, :], other=0.0)
                v_tile = tl.load(v_ptrs, mask=dv_valid[None, :], other=0.0)
            if UPCAST_DOT:
                k_tile = k_tile.to(tl.float32)
                v_tile = v_tile.to(tl.float32)
            qk = tl.dot(q_tile, tl.trans(k_tile), input_precision=DOT_PRECISION)   # [BLOCK_M, BLOCK_N]

            # @@SCORE@@

            if phase == 0:
                # @@MASK_PREDICATE@@
                if CHECK_KV_BOUNDS:
                    mask_keep = mask_keep & kv_valid[None, :]
                scores = tl.where(mask_keep, scores, float("-inf"))
            elif CHECK_KV_BOUNDS:
                scores = tl.where(kv_valid[None, :], scores, float("-inf"))

            probs = tl.exp2((scores * scores_to_natural - lse[:, None]) * 1.4426950408889634)  # [BLOCK_M, BLOCK_N]
            dp = tl.dot(do_tile, tl.trans(v_tile), input_precision=DOT_PRECISION)
            dz = probs * (dp - delta[:, None])

            # @@SCORE_GRAD@@

            dq_acc = tl.dot(ds.to(k_tile.dtype), k_tile, dq_acc, input_precision=DOT_PRECISION)
            kv_block = tl.load(block_list + (step + 1) // KV_TILES_PER_BLOCK, mask=step + 1 < num_steps, other=0)

    dq_acc = dq_acc * score_scale
    dq_ptrs = (DQ + batch.to(tl.int64) * stride_dqb + head.to(tl.int64) * stride_dqh
               + q_pos[:, None] * stride_dqm + offs_d[None, :] * stride_dqd)
    tl.store(dq_ptrs, dq_acc.to(DQ.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])
'''

# Constexpr parameters of each template, in signature order (``backward_launch`` fills them).
DKDV_CONSTEXPR_NAMES = (
    "HEAD_DIM", "HEAD_DIM_V", "BLOCK_D", "BLOCK_DV", "BLOCK_M", "BLOCK_N",
    "Q_BLOCK_SIZE", "KV_BLOCK_SIZE", "Q_TILES_PER_BLOCK", "KV_TILES_PER_BLOCK",
    "CHECK_Q_BOUNDS", "CHECK_KV_BOUNDS", "DOT_PRECISION", "UPCAST_DOT",
    "ROW_OFFSETS_64", "HEAVY_TILES_LAST", "FAST_TANH",
)
DQ_CONSTEXPR_NAMES = tuple(name for name in DKDV_CONSTEXPR_NAMES if name != "CHECK_Q_BOUNDS")


def _strides(tensor: str, dims: str):
    return [(f"stride_{tensor}{d}", "i32") for d in dims]


# Runtime parameters before the captured tensors, with their Triton type ("ptr:in" = a pointer of
# the input dtype, "ptr:f32", "ptr:i32", "i32", "fp32"): the ahead-of-time compiler builds its
# signature from these.
_COMMON_HEAD = [(name, "ptr:in") for name in ("Q", "K", "V", "DOut")] + [("Lse", "ptr:f32"), ("Delta", "ptr:f32")]
_IO_STRIDES = _strides("q", "bhmd") + _strides("k", "bhnd") + _strides("v", "bhnd") + _strides("do", "bhmd")
_TAIL = [("q_len", "i32"), ("kv_len", "i32"), ("num_kv_heads", "i32"), ("num_q_heads", "i32"),
         ("gqa_groups", "i32"), ("scale_log2", "fp32"), ("score_scale", "fp32")]
DKDV_RUNTIME_PARAMS = (
    _COMMON_HEAD + [("DK", "ptr:in"), ("DV", "ptr:in")] + _IO_STRIDES + _strides("dk", "bhnd") + _strides("dv", "bhnd")
    + [(name, "ptr:i32") for name in ("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")]
    + [(f"stride_{kind}_{d}", "i32") for kind in ("layout", "index") for d in "bhn"] + _TAIL)
DQ_RUNTIME_PARAMS = (
    _COMMON_HEAD + [("DQ", "ptr:in")] + _IO_STRIDES + _strides("dq", "bhmd")
    + [(name, "ptr:i32") for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")]
    + [(f"stride_{kind}_{d}", "i32") for kind in ("layout", "index") for d in "bhm"] + _TAIL)
