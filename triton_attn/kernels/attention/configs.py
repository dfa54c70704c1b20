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
from typing import Dict, List, Optional, Tuple

import torch

MIN_TILE = 16  # smallest tile tl.dot accepts on every target
# CUDA's grid limits: axis 0 takes 2**31 - 1 programs, axes 1 and 2 take 65,535 each.
MAX_GRID_X = 2 ** 31 - 1
MAX_GRID_YZ = 65535


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
    # AMD compile options (0: the compiler's default; ignored by NVIDIA targets, which never set them).
    # waves_per_eu: occupancy hint (waves per SIMD) that caps the VGPRs the compiler may use;
    # matrix_instr_nonkdim: the MFMA tile (16: 16x16 instructions, 32: 32x32); kpack: K elements per LDS read.
    waves_per_eu: int = 0
    matrix_instr_nonkdim: int = 0
    kpack: int = 0

    def __post_init__(self):
        for name in ("BLOCK_M", "BLOCK_N"):
            value = getattr(self, name)
            if value < MIN_TILE or value & (value - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two >= {MIN_TILE}, got {value}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"KernelConfig.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"KernelConfig.num_stages must be >= 1, got {self.num_stages}")
        if self.waves_per_eu < 0 or self.matrix_instr_nonkdim not in (0, 16, 32) or self.kpack not in (0, 1, 2):
            raise ValueError("KernelConfig: waves_per_eu must be >= 0, matrix_instr_nonkdim 0, 16 or 32, kpack 0, 1 "
                             f"or 2; got {self.waves_per_eu}, {self.matrix_instr_nonkdim}, {self.kpack}")

    @property
    def name(self) -> str:
        amd = "".join(f"_{short}{value}" for short, value in (("wpe", self.waves_per_eu),
                                                               ("nk", self.matrix_instr_nonkdim), ("kp", self.kpack))
                      if value)
        return f"m{self.BLOCK_M}_n{self.BLOCK_N}_w{self.num_warps}_s{self.num_stages}{amd}"

    @property
    def amd_options(self) -> Dict[str, int]:
        """The AMD compile options this config sets (empty for every NVIDIA config)."""
        return {name: value for name, value in (("waves_per_eu", self.waves_per_eu),
                                                ("matrix_instr_nonkdim", self.matrix_instr_nonkdim),
                                                ("kpack", self.kpack)) if value}

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


def by_width(table: Dict[int, object], head_dim: int, head_dim_v: int):
    """The entry of a ``{padded head_dim: config}`` table for D and Dv: the smallest width that holds both."""
    width = max(padded_head_dim(head_dim), padded_head_dim(head_dim_v))
    return table[min(size for size in table if size >= width)]


# Attention dropout regenerates one Philox draw (10 rounds on 4 words of state) per (query row, key) of
# every step, in registers beside the step's scores: at 32 tile elements per thread (128 x 64 on 8 warps)
# the sm_90 dK/dV kernel (one launch at D = 64, both split launches at D = 128) and the sm_80 forward at
# D = 128 under a document mask or softcap spill. A dropout launch halves its step until the tile holds at
# most ``dropout_step_budget`` elements per thread: 16 for 16-bit inputs while the kernel's float32
# accumulators span at most 128 columns (no default build with head_dim <= 128 spills on sm_80 / sm_90
# then, tests/kernels/test_dropout_aot.py, and sm_90 keeps wgmma everywhere), 8 beyond (D = 256; dK and dV
# in one launch at D = 128, which spilled on sm_100), a quarter of that for float32 (3xTF32's operand splits).
DROPOUT_STEP_ELEMENTS = 16   # per thread (of a 32-wide warp), 16-bit inputs, accumulators <= 128 columns wide


def dropout_step_budget(head_dim: int, head_dim_v: int, dtype: torch.dtype, accumulators: int = 1) -> int:
    """The most elements per thread a dropout launch's step tile holds (see ``DROPOUT_STEP_ELEMENTS``);
    ``accumulators``: the float32 accumulators the kernel holds (2 for dK and dV in one launch)."""
    budget = DROPOUT_STEP_ELEMENTS
    if accumulators * max(padded_head_dim(head_dim), padded_head_dim(head_dim_v)) > 128:
        budget //= 2
    if dtype == torch.float32:
        budget //= 4
    return budget


def dropout_step(config: KernelConfig, budget: int, *, keys: bool) -> KernelConfig:
    """``config`` for a launch with attention dropout: its step tile (``BLOCK_M x BLOCK_N``) halved until it
    holds at most ``budget`` elements per thread (``dropout_step_budget``), along the axis the kernel steps
    over -- the keys (``keys``: forward, dQ) or the query rows (dK/dV) -- never below ``MIN_TILE``."""
    axis = "BLOCK_N" if keys else "BLOCK_M"
    while config.BLOCK_M * config.BLOCK_N > budget * 32 * config.num_warps and getattr(config, axis) > MIN_TILE:
        config = replace(config, **{axis: getattr(config, axis) // 2})
    return config


def default_config(head_dim: int, head_dim_v: int, dtype: torch.dtype, block_size: Tuple[int, int],
                   q_len: Optional[int] = None, *, target=None, dropout: bool = False) -> KernelConfig:
    """The heuristic config for these shapes, already fitted to ``block_size = (Q_BS, KV_BS)``.

    head_dim / head_dim_v: D and Dv; dtype: the input dtype; q_len: Lq (small values shrink BLOCK_M);
    target: a ``kernels.targets.Target`` whose tables to read (None: sm_80's, also the interpreter's);
    dropout: a launch with attention dropout (``dropout_step``).
    """
    tables = getattr(target, "tables", None)
    if dtype == torch.float32:
        table = tables.forward_float32 if tables is not None else FLOAT32_CONFIGS
    else:
        table = tables.forward if tables is not None else MAIN_CONFIGS
    config = by_width(table, head_dim, head_dim_v)
    if dropout:
        config = dropout_step(config, dropout_step_budget(head_dim, head_dim_v, dtype), keys=True)
    return config.fitted(block_size[0], block_size[1], q_len)


# The dK/dV kernel's launches by name -> (COMPUTE_DK, COMPUTE_DV): one for both, or one each (split).
DKDV_PARTS = {"dkdv": (True, True), "dk": (True, False), "dv": (False, True)}


@dataclass(frozen=True)
class BackwardConfig:
    """Tiles of both backward kernels.

    dkdv: ``BLOCK_N`` keys per program (held with their dK/dV accumulators in registers) and
    ``BLOCK_M`` query rows per inner step. dq: ``BLOCK_M`` query rows per program and ``BLOCK_N``
    keys per inner step. max_head_dim: the largest padded head_dim the config is meant for.
    split_dkdv: compute dV and dK in two launches of the dK/dV kernel on ``dkdv``'s tiles (each holds
    one float32 accumulator, at the price of recomputing P once more), instead of one.
    """

    dkdv: KernelConfig
    dq: KernelConfig
    max_head_dim: int
    split_dkdv: bool = False

    @property
    def name(self) -> str:
        return f"{'dk_dv' if self.split_dkdv else 'dkdv'}_{self.dkdv.name}__dq_{self.dq.name}"

    @property
    def dkdv_parts(self) -> Tuple[str, ...]:
        """The dK/dV kernel's launches: ("dkdv",), or ("dv", "dk") when split."""
        return ("dv", "dk") if self.split_dkdv else ("dkdv",)

    def fitted(self, q_block_size: int, kv_block_size: int, q_len: int, kv_len: int) -> "BackwardConfig":
        """Tiles shrunk to divide the BlockMask's blocks and to not exceed short sequences."""
        dkdv_n = min(fit_tile(self.dkdv.BLOCK_N, kv_block_size), max(MIN_TILE, next_power_of_two(kv_len)))
        dkdv_m = fit_tile(self.dkdv.BLOCK_M, q_block_size)
        dkdv_n = fit_tile(dkdv_n, kv_block_size)
        return replace(self, dkdv=replace(self.dkdv, BLOCK_M=dkdv_m, BLOCK_N=dkdv_n),
                       dq=self.dq.fitted(q_block_size, kv_block_size, q_len))


# Register budget (255 per thread): the dK/dV program keeps K, V and two float32 accumulators of
# BLOCK_N x head_dim, about 3 * BLOCK_N * D / (32 * warps) registers per thread at 16 bits; the
# dQ program keeps Q, dO and one float32 accumulator. float32 inputs run 3xTF32 dots, whose
# hi/lo operand splits need far more registers: hence 16- and 32-wide tiles for them.
# Registers and spills of every entry are checked ahead of time by tests/kernels/test_backward_aot.py.
BACKWARD_CONFIGS: List[BackwardConfig] = [
    # 16-bit inputs. Narrow dK/dV steps, chosen while the dK/dV scores were Q K^T, transposed; keys
    # first (K Q^T) 64 x 64 steps at D = 128 now build for sm_80 at 172 registers without spills (untimed).
    BackwardConfig(KernelConfig(16, 64, 8, 2), KernelConfig(64, 32, 4, 2), max_head_dim=64),     # main, D <= 64
    BackwardConfig(KernelConfig(32, 64, 8, 2), KernelConfig(64, 32, 8, 2), max_head_dim=128),    # main, D <= 128
    BackwardConfig(KernelConfig(16, 32, 8, 1), KernelConfig(32, 16, 8, 1), max_head_dim=256),    # main, D <= 256
    # float32 inputs
    BackwardConfig(KernelConfig(32, 32, 4, 1), KernelConfig(32, 32, 4, 1), max_head_dim=64),     # main fp32, D <= 64
    BackwardConfig(KernelConfig(16, 16, 8, 1), KernelConfig(16, 32, 8, 1), max_head_dim=128),    # main fp32, D <= 128
    # fp32 at D = 256 still spills a few hundred bytes per thread (known; correct, slower).
    BackwardConfig(KernelConfig(16, 16, 8, 1), KernelConfig(16, 16, 8, 1), max_head_dim=256),
]
MAIN_BACKWARD_CONFIGS = {64: BACKWARD_CONFIGS[0], 128: BACKWARD_CONFIGS[1], 256: BACKWARD_CONFIGS[2]}
FLOAT32_BACKWARD_CONFIGS = {64: BACKWARD_CONFIGS[3], 128: BACKWARD_CONFIGS[4], 256: BACKWARD_CONFIGS[5]}
# Entries known to spill registers on sm_80/sm_90 (the AOT test allows these and only these).
SPILLING_CONFIGS = (BACKWARD_CONFIGS[5],)
# Hopper (sm_90), 16-bit inputs, chosen from the sm_90 builds (tests/kernels/test_efficiency_aot.py), all
# three-stage pipelines (async_wait num > 0) with wgmma N >= 64 for every product. dQ: 128 query rows x 64
# keys on two warpgroups (m64n64 / m64n128, 229 registers at D = 128, no spills). dK/dV: 128 keys x 64
# query rows per step on 8 warps; its scores are computed keys first (K Q^T, backward.py), so each
# warpgroup holds 64 keys x 64 rows (m64n64 for K Q^T and V dO^T, m64n128 / m64n64 for the dV and dK
# products at D = 128 / 64). A dot whose result feeds another dot gets warpsPerCTA = [num_warps, 1] in
# Triton 3.9: computed as Q K^T, 64 query rows were replicated in both warpgroups and spilled.
# Causal mask, bf16, ptxas registers / spill bytes (stores/loads), Triton 3.9:
#   tiles (keys x rows)          D = 128                     D = 64
#   old 128 x 32, Q K^T          248, 0 (m64n32)             196, 0 (m64n32)
#   128 x 64, Q K^T              255, 360/436                255, 4/4 (softcap 52/40)
#   128 x 64, K Q^T, one kernel  255, 108/108                235, 0 (softcap 8/8)
#   128 x 64, K Q^T, split: dV   249, 0                      229, 0
#                        dK      254, 0 (softcap 255, 0)     241, 0 (softcap 254, 0)
#   128 x 128, K Q^T, split      dV 44/60, dK 456/464
# At D = 128 the two float32 accumulators (128 registers) leave too little room for one kernel, so the
# default splits dV and dK (split_dkdv); at D = 64 one kernel fits (a softcap score_mod spills 8 bytes).
# On sm_80 these tiles spill heavily, hence a table per architecture (not in BACKWARD_CONFIGS, whose
# entries must build for sm_80 and sm_90 alike).
HOPPER_BACKWARD_CONFIGS = {
    64: BackwardConfig(KernelConfig(64, 128, 8, 3), KernelConfig(128, 64, 8, 3), max_head_dim=64),
    128: BackwardConfig(KernelConfig(64, 128, 8, 3), KernelConfig(128, 64, 8, 3), max_head_dim=128,
                        split_dkdv=True),
    # D = 256: sm_80's 16/32-row tiles are below wgmma's 64-row minimum (mma.sync on Hopper). 64 keys x 16 rows
    # per dK/dV step (keys first, so the warpgroup's M is 64 keys), split into dV and dK, and 64-row dQ tiles:
    # wgmma for every product, no spills (dV 65.7 KB / 168-204 registers, dK 98.6 KB / 214-227, dQ 131 KB /
    # 198-233; fp16 and bf16 x no mask, causal, document, softcap).
    256: BackwardConfig(KernelConfig(16, 64, 8, 2), KernelConfig(64, 32, 8, 2), max_head_dim=256, split_dkdv=True),
}


def default_backward_config(head_dim: int, head_dim_v: int, dtype: torch.dtype, block_size: Tuple[int, int],
                            q_len: int, kv_len: int, *, target=None, dropout: bool = False) -> BackwardConfig:
    """The heuristic config for these shapes, fitted to ``block_size = (Q_BS, KV_BS)``.

    target: a ``kernels.targets.Target`` whose tables to read (None: sm_80's, also the interpreter's);
    dropout: a launch with attention dropout (``dropout_step`` on both kernels' steps)."""
    tables = getattr(target, "tables", None)
    if dtype == torch.float32:
        table = tables.backward_float32 if tables is not None else FLOAT32_BACKWARD_CONFIGS
    else:
        table = tables.backward if tables is not None else MAIN_BACKWARD_CONFIGS
    config = by_width(table, head_dim, head_dim_v)
    if dropout:
        dkdv_budget = dropout_step_budget(head_dim, head_dim_v, dtype, 1 if config.split_dkdv else 2)
        config = replace(config, dkdv=dropout_step(config.dkdv, dkdv_budget, keys=False),
                         dq=dropout_step(config.dq, dropout_step_budget(head_dim, head_dim_v, dtype), keys=True))
    return config.fitted(block_size[0], block_size[1], q_len, kv_len)
