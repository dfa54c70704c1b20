"""What the prefill forward and backward launchers (and their AOT builds) share: tiles and grid.

``kernel_constexprs``: the shape constexprs of the forward, dK/dV and dQ kernels; ``launch_grid``:
the programs over query (or key) tiles and (batch, head) pairs (``batch_head_axes``: any number of
pairs, folded over grid axes 1 and 2 past CUDA's 65,535 per axis); ``heavy_tiles_last``: whether to
launch the tiles last-first (causal-like masks); ``dropout_arguments``: the dropout arguments the forward,
dK/dV and dQ kernels take. The decode kernels tile differently (``decode/launch.py``).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ...dropout import Dropout
from ...masks.block_mask import BlockMask
from .configs import MAX_GRID_YZ as CUDA_MAX_GRID_YZ
from .configs import KernelConfig, cdiv, padded_head_dim


def dot_precision(dtype: torch.dtype, target=None) -> str:
    """``tl.dot``'s input precision on ``target`` (``Target.dot_precision``). Without one, NVIDIA's: float32
    inputs get 3xTF32 dots, float32-accurate on tensor cores (plain TF32 would not be)."""
    if target is not None:
        return target.dot_precision(dtype)
    return "tf32x3" if dtype == torch.float32 else "tf32"


# CUDA's limit on grid axes 1 and 2 (``configs.MAX_GRID_YZ``), as a module global read at call time, so that
# tests can make it small.
MAX_GRID_YZ = CUDA_MAX_GRID_YZ
# The kernels compute ``batch * heads + head`` in 32 bits.
MAX_BATCH_HEADS = 2 ** 31 - 1


def batch_head_axes(batch_heads: int) -> Tuple[int, int]:
    """(programs on grid axis 1, programs on axis 2) for ``batch_heads`` (batch, head) pairs.

    Up to ``MAX_GRID_YZ`` pairs: all on axis 1, as the kernels read them (``program_id(1)``). Past it
    (e.g. 2,048 sequences x 32 heads) the pair index is folded over both axes, ``program_id(1) +
    program_id(2) * num_programs(1)`` (the ``FOLD_BATCH_HEADS`` constexpr): as few layers on axis 2 as the
    limit allows, each as full as it can be, so fewer than one spare program per layer (per tile) is
    launched; a spare one returns at once. Axis 0 stays the tiles of one pair, in order, as before."""
    if batch_heads > MAX_BATCH_HEADS:
        raise ValueError(f"batch * heads = {batch_heads} (batch_heads) is more than the kernels index in 32 bits "
                         f"({MAX_BATCH_HEADS}); split the batch")
    layers = max(1, cdiv(batch_heads, MAX_GRID_YZ))
    if layers > MAX_GRID_YZ:
        raise ValueError(f"batch * heads = {batch_heads} (batch_heads) needs more than {MAX_GRID_YZ} x {MAX_GRID_YZ} "
                         "programs per tile; split the batch")
    return cdiv(batch_heads, layers), layers


def folds_batch_heads(batch_heads: int) -> bool:
    """Whether the launch folds the (batch, head) index over grid axes 1 and 2 (``batch_head_axes``)."""
    return batch_head_axes(batch_heads)[1] > 1


def launch_grid(q_len: int, num_q_blocks: int, q_block_size: int, block_m: int,
                batch_heads: int) -> Tuple[int, int, int]:
    """``(query tiles, *batch_head_axes(B * Hq))``; tiles that would start past ``q_len`` are not launched.
    (The dK/dV kernel's: key tiles and B * Hkv.)"""
    tiles_per_block = cdiv(q_block_size, block_m)
    last_rows = q_len - (num_q_blocks - 1) * q_block_size
    tiles = (num_q_blocks - 1) * tiles_per_block + min(tiles_per_block, cdiv(last_rows, block_m))
    return (tiles, *batch_head_axes(batch_heads))


def heavy_tiles_last(block_mask: BlockMask) -> bool:
    """Whether later query block rows visit clearly more KV blocks than earlier ones (causal-like).

    Known from the mask's launch plan when it was built from its counts; else read once per BlockMask (a
    device sync) and remembered on it."""
    known = block_mask.launch_plan.heavy_tiles_last  # counted when the mask was built: no device read
    if known is not None:
        return known
    cached = getattr(block_mask, "_heavy_tiles_last", None)
    if cached is not None:
        return cached
    work = (block_mask.kv_num_blocks + block_mask.full_kv_num_blocks).double().flatten(0, -2).mean(0)  # [NQ]
    half = work.shape[0] // 2
    result = bool(half > 0 and float(work[-half:].sum()) > 1.25 * float(work[:half].sum()))
    try:
        block_mask._heavy_tiles_last = result
    except AttributeError:  # a class with __slots__: recompute next time
        pass
    return result


def kernel_constexprs(*, head_dim: int, head_dim_v: int, dtype: torch.dtype, block_size: Tuple[int, int],
                      config: KernelConfig, kv_len: int, interpret: bool, row_offsets_64: bool = False,
                      layout_offsets_64: bool = False, batch_heads: int = 1, reverse_tiles: bool = False,
                      target=None) -> dict:
    """The shape constexprs of the forward kernel (and of the dQ / dK/dV kernels) for these shapes.

    row_offsets_64: ``host.needs_64bit_rows``; layout_offsets_64: ``host.needs_64bit_offsets`` of the block
    layout's tensors; batch_heads: the (batch, head) pairs the grid covers (B * Hq; B * Hkv for dK/dV), which
    decide ``FOLD_BATCH_HEADS`` (``batch_head_axes``); reverse_tiles: launch query tiles last-first
    (``heavy_tiles_last``); target: the ``kernels.targets.Target`` compiled for (its dot precision;
    None: NVIDIA's, which the interpreter accepts too)."""
    q_bs, kv_bs = block_size
    return dict(
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v,
        BLOCK_D=padded_head_dim(head_dim), BLOCK_DV=padded_head_dim(head_dim_v),
        BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N,
        Q_BLOCK_SIZE=q_bs, KV_BLOCK_SIZE=kv_bs,
        Q_TILES_PER_BLOCK=cdiv(q_bs, config.BLOCK_M), KV_TILES_PER_BLOCK=cdiv(kv_bs, config.BLOCK_N),
        # Bounds checks on K/V only where a tile can overhang the sequence or its mask block.
        CHECK_KV_BOUNDS=(kv_len % kv_bs != 0) or (kv_bs % config.BLOCK_N != 0),
        DOT_PRECISION=dot_precision(dtype, target),
        # Triton 3.9's interpreter returns garbage for tl.dot on two bf16 operands.
        UPCAST_DOT=bool(interpret and dtype == torch.bfloat16),
        ROW_OFFSETS_64=bool(row_offsets_64),
        LAYOUT_OFFSETS_64=bool(layout_offsets_64),
        FOLD_BATCH_HEADS=folds_batch_heads(batch_heads),
        HEAVY_TILES_LAST=bool(reverse_tiles),
    )


def dropout_arguments(dropout: Optional[Dropout]) -> Dict[str, object]:
    """The kernels' dropout arguments (forward, dK/dV, dQ): ``dropout_p`` and ``dropout_seed`` (the int64
    ``[1]`` seed tensor, read by the kernel), both None without dropout -- Triton makes a None argument a
    constant, so a launch without dropout compiles exactly as it did before the arguments existed."""
    if dropout is None:
        return dict(dropout_p=None, dropout_seed=None)
    return dict(dropout_p=float(dropout.p), dropout_seed=dropout.seed)
