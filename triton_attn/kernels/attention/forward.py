"""The forward attention kernel, as a Triton source template that ``codegen`` specializes.

The kernel is the same for every mask; only three things differ per (mask_mod, score_mod) and
are pasted in by ``codegen.py`` at the ``# @@...@@`` marker lines:

- ``# @@CAPTURED_ARGS@@``: one pointer argument (plus sizes and strides) per captured tensor.
- ``# @@MASK_PREDICATE@@``: statements that end with ``mask_keep = <bool tile>``, the mask_mod
  evaluated on ``(batch, head, q_idx [BLOCK_M, 1], kv_idx [1, BLOCK_N])``.
- ``# @@SCORE@@``: statements that define ``scores`` (float32 tile): without a score_mod the raw
  ``qk`` (unscaled), with one ``score_mod(qk * scale, ...)``.
- ``# @@SCORE_UNITS@@`` (before the loops): the positive factors ``scores_to_log2`` and
  ``scores_to_natural`` from ``scores`` to base-2 logits and to natural units (``scale * log2(e)``
  and ``scale`` for raw scores, ``log2(e)`` and 1 after a score_mod).

Why a text template and not a ``@triton.jit`` function taking the mask as an argument: the
predicate must be inlined into the inner loop (no dense mask is ever read), captured tensors
vary in number and rank, and Triton's JIT reads kernel source through ``inspect``, so the
specialized kernel has to exist as real source in a module file (see ``codegen.py``).

Algorithm (one program = one tile of ``BLOCK_M`` query rows of one (batch, query head)):

1. Load the Q tile once ``[BLOCK_M, BLOCK_D]`` (head_dim zero-padded to a power of two).
2. Phase 0 walks the *partial* KV blocks of this query block row (``kv_num_blocks`` /
   ``kv_indices``) and applies the predicate; phase 1 walks the *full* blocks
   (``full_kv_num_blocks`` / ``full_kv_indices``) without it. Empty blocks are never visited.
   Each mask block is walked in ``KV_TILES_PER_BLOCK`` steps of ``BLOCK_N`` keys.
3. Online softmax in base 2 on raw scores: the row max is taken before scaling and the scale
   (folded into ``log2(e)``) enters once, as one FMA per score before ``exp2``; running max / sum /
   accumulator stay in float32. The next block index is loaded at the end of each step and
   carried, so no K/V address depends on a load made in the same step: the software pipeliner
   then keeps ``num_stages - 1`` K/V tiles in flight in both loops.
4. Rows that never saw an allowed key end with ``running_sum == 0``: they store 0 and an LSE of
   ``-inf`` instead of 0/0.

Tensor arguments (all strides in elements; ``Bm``/``Hm`` are the BlockMask's own batch/head
sizes and their strides are 0 when the mask broadcasts):

- ``Q`` [B, Hq, Lq, D], ``K`` [B, Hkv, Lkv, D], ``V`` [B, Hkv, Lkv, Dv], ``Out`` [B, Hq, Lq, Dv]
  (input dtype), ``Lse`` [B, Hq, Lq] float32, natural log.
- ``kv_num_blocks`` / ``full_kv_num_blocks`` int32 [Bm, Hm, NQ] (strides ``stride_layout_*``),
  ``kv_indices`` / ``full_kv_indices`` int32 [Bm, Hm, NQ, NKV] (strides ``stride_index_*``).

Grid: ``(NQ * Q_TILES_PER_BLOCK, B * Hq)``.
"""

from __future__ import annotations

# Bump when the template changes: it is part of the generated modules' cache key.
TEMPLATE_VERSION = 5

KERNEL_TEMPLATE = '''
def @@KERNEL_NAME@@(
    Q, K, V, Out, Lse,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lse_b, stride_lse_h,
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
    if HEAVY_TILES_LAST:
        # Causal-like masks: the last query tiles see the most keys. Launch them first, so the
        # light tiles fill the gaps at the end instead of one long tile finishing alone.
        tile_id = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        tile_id = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // num_q_heads
    head = batch_head % num_q_heads
    # GQA: query heads [g * groups, (g + 1) * groups) share key/value head g; nothing is copied.
    kv_head = head // gqa_groups

    # This program's query rows all lie in mask block row ``mask_row``.
    mask_row = tile_id // Q_TILES_PER_BLOCK
    rows_in_block = (tile_id % Q_TILES_PER_BLOCK) * BLOCK_M + tl.arange(0, BLOCK_M)
    q_pos = mask_row * Q_BLOCK_SIZE + rows_in_block                         # [BLOCK_M]
    row_valid = (q_pos < q_len) & (rows_in_block < Q_BLOCK_SIZE)
    q_idx = q_pos[:, None]                                                  # [BLOCK_M, 1]

    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_valid = offs_d < HEAD_DIM          # all True unless head_dim was padded (80 -> 128)
    dv_valid = offs_dv < HEAD_DIM_V

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

    # @@SCORE_UNITS@@
    running_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    accumulator = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # Where this (batch, head, mask_row) finds its block lists; stride 0 where the mask broadcasts.
    layout_offset = batch * stride_layout_b + head * stride_layout_h + mask_row * stride_layout_m
    index_offset = batch * stride_index_b + head * stride_index_h + mask_row * stride_index_m
    for phase in tl.static_range(2):
        # phase 0: partial blocks, predicate applied; phase 1: full blocks, no predicate.
        if phase == 0:
            block_count = tl.load(kv_num_blocks + layout_offset)
            block_list = kv_indices + index_offset
        else:
            block_count = tl.load(full_kv_num_blocks + layout_offset)
            block_list = full_kv_indices + index_offset
        # One flat loop over (block, sub-tile) pairs: a single pipelined loop instead of two nested ones.
        num_steps = block_count * KV_TILES_PER_BLOCK
        kv_block = tl.load(block_list, mask=num_steps > 0, other=0)
        for step in range(0, num_steps):
            slot = step // KV_TILES_PER_BLOCK
            cols_in_block = (step % KV_TILES_PER_BLOCK) * BLOCK_N + tl.arange(0, BLOCK_N)
            kv_pos = kv_block * KV_BLOCK_SIZE + cols_in_block                   # [BLOCK_N]
            kv_valid = (kv_pos < kv_len) & (cols_in_block < KV_BLOCK_SIZE)
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

            # @@SCORE@@

            if phase == 0:
                # @@MASK_PREDICATE@@
                if CHECK_KV_BOUNDS:
                    mask_keep = mask_keep & kv_valid[None, :]
                scores = tl.where(mask_keep, scores, float("-inf"))
            elif CHECK_KV_BOUNDS:
                scores = tl.where(kv_valid[None, :], scores, float("-inf"))

            # Online softmax on the raw scores: the row max is taken before scaling (the factor is
            # positive, so it commutes with max) and the scale enters once, in one FMA per score.
            # A row that has only seen masked keys keeps running_max == -inf; shifting it by 0
            # instead makes its probabilities exp2(-inf) = 0 rather than NaN.
            new_max = tl.maximum(running_max, tl.max(scores, 1))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max * scores_to_log2)
            correction = tl.exp2(running_max * scores_to_log2 - shift)
            probs = tl.exp2(scores * scores_to_log2 - shift[:, None])
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
            accumulator = tl.dot(probs.to(v_tile.dtype), v_tile, accumulator, input_precision=DOT_PRECISION)
            running_max = new_max
            # The next step's block index, loaded now and carried: K/V addresses then depend on no
            # load inside the step, so the pipeliner keeps num_stages - 1 K/V tiles in flight.
            kv_block = tl.load(block_list + (step + 1) // KV_TILES_PER_BLOCK, mask=step + 1 < num_steps, other=0)

    attended = running_sum > 0.0
    safe_sum = tl.where(attended, running_sum, 1.0)
    out_tile = accumulator / safe_sum[:, None]
    # LSE in natural log: max * (natural units per raw unit) + ln(sum); the backward subtracts it
    # from its scores in natural units too (see backward.py), so both passes round alike.
    lse = tl.where(attended, running_max * scores_to_natural + tl.log2(safe_sum) * 0.6931471805599453,
                   float("-inf"))

    out_ptrs = (Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
                + q_pos[:, None] * stride_om + offs_dv[None, :] * stride_od)
    tl.store(out_ptrs, out_tile.to(Out.dtype.element_ty), mask=row_valid[:, None] & dv_valid[None, :])
    lse_ptrs = Lse + batch.to(tl.int64) * stride_lse_b + head.to(tl.int64) * stride_lse_h + q_pos
    tl.store(lse_ptrs, lse, mask=row_valid)
'''

# Constexpr parameters of the template, in signature order (``launch.py`` fills them).
CONSTEXPR_NAMES = (
    "HEAD_DIM", "HEAD_DIM_V", "BLOCK_D", "BLOCK_DV", "BLOCK_M", "BLOCK_N",
    "Q_BLOCK_SIZE", "KV_BLOCK_SIZE", "Q_TILES_PER_BLOCK", "KV_TILES_PER_BLOCK",
    "CHECK_KV_BOUNDS", "DOT_PRECISION", "UPCAST_DOT", "ROW_OFFSETS_64", "HEAVY_TILES_LAST", "FAST_TANH",
)

# Runtime parameters before the captured tensors, in signature order, with their Triton type
# ("ptr:q" = a pointer of the input dtype, "ptr:f32", "ptr:i32", "i32", "fp32"). The ahead-of-time
# compiler builds its signature from this.
RUNTIME_PARAMS = (
    [("Q", "ptr:in"), ("K", "ptr:in"), ("V", "ptr:in"), ("Out", "ptr:in"), ("Lse", "ptr:f32")]
    + [(f"stride_{t}{d}", "i32") for t in "qkvo" for d in ("b", "h", "m" if t in "qo" else "n", "d")]
    + [("stride_lse_b", "i32"), ("stride_lse_h", "i32")]
    + [(name, "ptr:i32") for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")]
    + [(f"stride_{kind}_{d}", "i32") for kind in ("layout", "index") for d in "bhm"]
    + [("q_len", "i32"), ("kv_len", "i32"), ("num_q_heads", "i32"), ("gqa_groups", "i32"),
       ("scale_log2", "fp32"), ("score_scale", "fp32")]
)
