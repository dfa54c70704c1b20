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
def tile_positions(block, sub_tile, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, length):
    """Sub-tile ``sub_tile`` of mask block ``block``: (offsets in the block, positions, valid) ``[TILE]``.

    A position is valid inside the sequence (``< length``) and inside its mask block (the last
    sub-tile of an odd block size overhangs it).
    """
    in_block = sub_tile * TILE + tl.arange(0, TILE)
    positions = block * BLOCK_SIZE + in_block
    valid = (positions < length) & (in_block < BLOCK_SIZE)
    return in_block, positions, valid
