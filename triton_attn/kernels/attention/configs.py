"""Launch configurations of the forward kernel: a small table and the rule that picks one.

A ``KernelConfig`` is the tile shape (``BLOCK_M`` query rows x ``BLOCK_N`` keys per step) plus the
``num_warps`` / ``num_stages`` Triton compiles with. ``FORWARD_CONFIGS`` is the table the
ahead-of-time tests compile and the autotuner searches; ``default_config`` is the heuristic used
when nothing was tuned.

Tiles must fit the BlockMask: a query tile must lie inside one row of mask blocks and a key tile
inside one mask block, because the kernel looks up the block layout once per tile. So the
chosen ``BLOCK_M`` divides ``Q_BLOCK_SIZE`` and ``BLOCK_N`` divides ``KV_BLOCK_SIZE`` whenever
the block size is a multiple of 16 (``tl.dot`` needs tiles of at least 16). For odd block sizes
(say 24) the kernel instead walks ``ceil(block / tile)`` sub-tiles and masks the overhang.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

import torch

MIN_TILE = 16  # smallest tile tl.dot accepts on every target


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration of the forward kernel.

    BLOCK_M: query rows per program; BLOCK_N: keys per inner-loop step; num_warps and
    num_stages: Triton compile options (warps per program, software-pipelining depth).
    max_head_dim: the largest (padded) head_dim this config is meant for: beyond it the tiles
    no longer fit in registers / shared memory (checked ahead of time by tests/kernels/test_aot.py).
    """

    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int
    max_head_dim: int = 256

    def __post_init__(self):
        for name in ("BLOCK_M", "BLOCK_N"):
            value = getattr(self, name)
            if value < MIN_TILE or value & (value - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two >= {MIN_TILE}, got {value}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"KernelConfig.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"KernelConfig.num_stages must be >= 1, got {self.num_stages}")

    @property
    def name(self) -> str:
        return f"m{self.BLOCK_M}_n{self.BLOCK_N}_w{self.num_warps}_s{self.num_stages}"

    def fitted(self, q_block_size: int, kv_block_size: int, q_len: Optional[int] = None) -> "KernelConfig":
        """This config with tiles shrunk to fit the BlockMask's ``(Q_BS, KV_BS)`` and a short ``q_len``."""
        block_m = fit_tile(self.BLOCK_M, q_block_size)
        if q_len is not None:
            # Decode-like shapes (Lq = 1..15): a 128-row tile would be almost all padding.
            block_m = min(block_m, max(MIN_TILE, next_power_of_two(q_len)))
        return replace(self, BLOCK_M=block_m, BLOCK_N=fit_tile(self.BLOCK_N, kv_block_size))


# The table. Order matters only for readability; ``default_config`` names its picks explicitly.
# Register budget (255 per thread): the fp32 accumulator takes BLOCK_M * BLOCK_DV / (32 * warps)
# registers per thread, the Q tile about as many again at half width, hence 8 warps for
# head_dim 128 and 64-row tiles for head_dim 256.
FORWARD_CONFIGS: List[KernelConfig] = [
    KernelConfig(128, 64, 4, 3, max_head_dim=64),    # one warp group per 128 rows (near 255 registers)
    KernelConfig(128, 64, 8, 3, max_head_dim=128),   # main config, head_dim <= 128, 16-bit inputs
    KernelConfig(128, 128, 8, 3, max_head_dim=64),   # larger KV steps (spills at head_dim 128 on sm_80)
    KernelConfig(64, 64, 4, 3, max_head_dim=128),    # short query blocks
    KernelConfig(64, 32, 4, 2, max_head_dim=256),    # main config for head_dim 256
    KernelConfig(64, 32, 8, 2, max_head_dim=256),    # head_dim 256 with more warps (autotuning candidate)
    KernelConfig(32, 64, 4, 2, max_head_dim=256),    # short query blocks
    KernelConfig(16, 64, 4, 2, max_head_dim=256),    # decode: Lq < 16
]
# The heuristic's picks for 16-bit inputs, by padded head_dim. 8 warps even at head_dim 64:
# with 4 warps the 128-row tile sits at 255 registers and mask predicates push it into spills.
MAIN_CONFIGS = {64: FORWARD_CONFIGS[1], 128: FORWARD_CONFIGS[1], 256: FORWARD_CONFIGS[4]}
# float32 inputs run 3xTF32 dots (three tensor-core products per dot, for float32 accuracy):
# about three times the registers, hence smaller tiles. Small spills remain beyond head_dim 64;
# float32 is the accuracy path, not the fast one.
FLOAT32_CONFIGS = {64: KernelConfig(64, 32, 4, 2, max_head_dim=64),
                   128: KernelConfig(32, 32, 4, 2, max_head_dim=128),
                   256: KernelConfig(16, 32, 4, 1, max_head_dim=256)}


def next_power_of_two(value: int) -> int:
    """The smallest power of two >= ``value`` (1 for values <= 1)."""
    return 1 << max(0, int(value) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive integers."""
    return -(-a // b)


def fit_tile(preferred: int, block_size: int) -> int:
    """The largest power-of-two tile <= ``preferred`` (and >= 16) dividing ``block_size``.

    When the block size is not a multiple of 16 no such tile exists; then the tile is the
    smallest power of two covering the block (capped at ``preferred``) and the kernel masks
    the overhang of the last sub-tile.
    """
    tile = preferred
    while tile > MIN_TILE and block_size % tile:
        tile //= 2
    if block_size % tile:
        tile = max(MIN_TILE, min(preferred, next_power_of_two(block_size)))
    return tile


def padded_head_dim(head_dim: int) -> int:
    """The power-of-two width (>= 16) the kernel loads a head_dim of ``head_dim`` into."""
    return max(MIN_TILE, next_power_of_two(head_dim))


def default_config(head_dim: int, head_dim_v: int, dtype: torch.dtype, block_size: Tuple[int, int],
                   q_len: Optional[int] = None) -> KernelConfig:
    """The heuristic config for these shapes, already fitted to ``block_size = (Q_BS, KV_BS)``.

    head_dim / head_dim_v: D and Dv; dtype: the input dtype; q_len: Lq (small values shrink BLOCK_M).
    """
    width = max(padded_head_dim(head_dim), padded_head_dim(head_dim_v))
    table = FLOAT32_CONFIGS if dtype == torch.float32 else MAIN_CONFIGS
    base = table[min(size for size in table if size >= width)]
    return base.fitted(block_size[0], block_size[1], q_len)
