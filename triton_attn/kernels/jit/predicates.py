"""Fixed (not generated) mask predicates with the ``MASK_FN`` calling convention of ``functions``.

- ``keep_all``: for launches whose BlockMask has no partial block (the predicate never runs, but
  the kernel still needs a function to compile its partial-block branch).
- ``bitmask_keep``: the exact fallback for mask_mods that cannot be traced. The mask_mod was
  evaluated eagerly on the elements of each partial block (``kernels/attention/fallback.py``);
  this reads those bits back. It needs no block-walk context from the kernel: the block of each
  element follows from ``q_idx // q_block_size`` and ``kv_idx // kv_block_size``, so every kernel
  (forward, dQ, the transposed dK/dV walk) calls it exactly like a generated ``mask_mod``.
  Its captured tuple (built by ``fallback.bitmask_captured``):
  ``(bits, block_ids, ids_stride_b, ids_stride_h, ids_stride_row, num_q_blocks, num_kv_blocks,
  q_block_size, kv_block_size)`` with ``bits`` 0/1 int8 ``[P, Q_BS, KV_BS]`` and ``block_ids`` int32
  ``[Bm, Hm, NQ, NKV]`` (index into ``bits``, -1 for blocks that are not partial).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def keep_all(batch, head, q_idx, kv_idx):
    return True


@triton.jit
def bitmask_keep(batch, head, q_idx, kv_idx, bits, block_ids, ids_stride_b, ids_stride_h, ids_stride_row,
                 num_q_blocks, num_kv_blocks, q_block_size, kv_block_size):
    q_block = q_idx // q_block_size
    kv_block = kv_idx // kv_block_size
    # Padding rows/columns of a tile may lie past the last block: they read "not allowed".
    inside = (q_block < num_q_blocks) & (kv_block < num_kv_blocks)
    block = tl.load(block_ids + batch * ids_stride_b + head * ids_stride_h + q_block * ids_stride_row + kv_block,
                    mask=inside, other=-1)
    offset = (block.to(tl.int64) * (q_block_size * kv_block_size)
              + (q_idx - q_block * q_block_size) * kv_block_size + (kv_idx - kv_block * kv_block_size))
    return tl.load(bits + offset, mask=block >= 0, other=0) != 0
