"""AMD Instinct targets: CDNA2 (gfx90a), CDNA3 (gfx942), CDNA4 (gfx950).

Limits: 64-wide wavefronts, LDS per workgroup (64 KiB on CDNA2/3, 160 KiB on CDNA4), 512 VGPRs per
lane (architectural and accumulation registers together). Triton's AMD backend does not check LDS at
compile time (a launch over the limit fails at run time), so the AOT matrix compares it with
``shared_memory`` itself. Every CDNA target computes float32 products exactly on the MFMA units
("ieee"); ``tf32`` exists on gfx942 only and ``tf32x3`` nowhere.

The config tables were chosen from the AOT builds (``kernels/matrix.py``: Triton 3.9, D = 64/128/256,
fp16/bf16/fp32, masks none/causal/document/softcap; numbers below are the range over those). How a
SIMD's 512 VGPRs turn into occupancy: a workgroup of 4 waves (256 threads) puts one wave on each of
the CU's 4 SIMDs, 8 waves put two, and a SIMD holds ``512 // VGPRs`` waves. So 8 warps cap a build at
256 VGPRs (the compiler spills beyond), ``waves_per_eu=2`` asks the same of 4 warps (two workgroups
per CU), and 4 warps without it may use all 512 (one wave per SIMD: for the float32 backward only).
``matrix_instr_nonkdim=16`` (16x16 MFMA) needs as few or fewer VGPRs and LDS than the compiler's default
in every build compared, so every entry sets it. ``num_stages`` 2 is Triton's stream pipeliner (one tile
load ahead); the backward kernels run 1, which their registers need. No default build spills on any of
the three targets (``known_spills`` is empty).
"""

from __future__ import annotations

from dataclasses import replace

from ..attention.configs import BackwardConfig, KernelConfig
from .target import KernelTables, Target

MAX_VGPRS = 512


def _tiles(block_m: int, block_n: int, warps: int, stages: int, width: int, waves: int = 0) -> KernelConfig:
    """One AMD entry: 16x16 MFMA, ``waves`` waves per EU (0: the compiler's default)."""
    return KernelConfig(block_m, block_n, warps, stages, max_head_dim=width, waves_per_eu=waves,
                        matrix_instr_nonkdim=16)


# -- CDNA3 (gfx942: MI300X, MI300A, MI325X), 64 KiB LDS ------------------------------------------------------
# Forward, 16-bit. LDS / VGPRs over the four masks, bf16 and fp16.
CDNA3_FORWARD = {
    # 128 x 64 on 4 warps, 2 waves/EU (AMD's usual shape): 16 KiB, 200-254 VGPRs. The same tile at D = 128
    # spills 4-107 VGPRs under waves_per_eu=2 (s1 or s2) and needs 264-367 (one wave/EU) without it.
    64: _tiles(128, 64, 4, 2, 64, waves=2),
    # 128 x 64 on 8 warps (16 rows a wave): 32 KiB, 190-250 VGPRs, two waves/EU. sm_80's 8-warp s3 pipeline
    # needs 80 KiB (> 64 KiB); without nonkdim 16 the s2 build needs 48 KiB and spills 252 B (document).
    128: _tiles(128, 64, 8, 2, 128),
    # 64 x 32 on 4 warps, 2 waves/EU: 32 KiB, 228-252 VGPRs (128-row tiles need the whole 64 KiB).
    256: _tiles(64, 32, 4, 2, 256, waves=2),
}
# Forward, float32 (native fp32 MFMA, "ieee"): twice the operand bytes of 16-bit.
CDNA3_FORWARD_FLOAT32 = {
    64: _tiles(128, 32, 4, 2, 64, waves=2),    # 32 KiB, 204-240 VGPRs; 64 x 64 spills 12 B
    128: _tiles(64, 32, 4, 1, 128, waves=2),   # 32 KiB, 160-178 VGPRs; s2 spills 52 B under waves_per_eu=2
    256: _tiles(32, 16, 4, 1, 256, waves=2),   # 32 KiB, 186-198 VGPRs; 32 x 32 spills 56 B
}
# Backward, 16-bit: dK/dV (BLOCK_N keys held, BLOCK_M query rows a step) and dQ.
CDNA3_BACKWARD = {
    # dK/dV 128 keys x 32 rows, 8 warps: 16 KiB, 145-167 VGPRs. dQ 128 x 64, 8 warps: 16 KiB, 184-226.
    64: BackwardConfig(_tiles(32, 128, 8, 1, 64), _tiles(128, 64, 8, 1, 64), max_head_dim=64),
    # dK/dV 64 keys x 32 rows, 8 warps: 16 KiB, 152-198 VGPRs (sm_80's s2 build spills 396 B; 128 keys
    # reach 256 VGPRs and spill 28 B with fp16 + document). dQ 128 x 32, 8 warps, s1: 32 KiB, 226-246
    # (s2 spills 56 B with the document mask, as does every 64-key dQ tile).
    128: BackwardConfig(_tiles(32, 64, 8, 1, 128), _tiles(128, 32, 8, 1, 128), max_head_dim=128),
    # dK/dV 64 keys x 16 rows: 32 KiB, 211-246 VGPRs. dQ 64 x 16: 32 KiB, 226-240 (64 x 32 spills 172 B).
    256: BackwardConfig(_tiles(16, 64, 8, 1, 256), _tiles(64, 16, 8, 1, 256), max_head_dim=256),
}
# Backward, float32: its scores are Q K^T (not keys first) and its operands twice as wide; beyond D = 64 the
# dK/dV program and the D = 256 dQ need more than 256 VGPRs: 4 warps without waves_per_eu (one wave/EU).
CDNA3_BACKWARD_FLOAT32 = {
    # dK/dV 32 x 32, 4 warps, 2 waves/EU: 8 KiB, 209-245 VGPRs. dQ 128 x 32, 8 warps: 32 KiB, 188-216.
    64: BackwardConfig(_tiles(32, 32, 4, 1, 64, waves=2), _tiles(128, 32, 8, 1, 64), max_head_dim=64),
    # dK/dV 32 x 32, 4 warps: 16 KiB, 344-382 VGPRs (every 256-VGPR variant tried spills 56-916 B, split
    # dK/dV too). dQ 64 x 16, 8 warps: 32 KiB, 220-232.
    128: BackwardConfig(_tiles(32, 32, 4, 1, 128), _tiles(64, 16, 8, 1, 128), max_head_dim=128),
    # dK/dV 16 x 16, 4 warps: 16 KiB, 414-428 VGPRs (8 warps spill 292 B). dQ 32 x 16, 4 warps: 32 KiB,
    # 370-429 (16 x 16 on 8 warps spills 188 B).
    256: BackwardConfig(_tiles(16, 16, 4, 1, 256), _tiles(32, 16, 4, 1, 256), max_head_dim=256),
}
# Decode (BLOCK_M: the most packed rows; the launch shrinks it to the rows it has). Numbers at the full BLOCK_M.
CDNA3_DECODE = {
    "few_rows": _tiles(16, 64, 4, 2, 128),       # D <= 128: 32 KiB, 168-196 VGPRs
    "packed": _tiles(64, 32, 4, 2, 128),         # 64 rows: 16 KiB, 150-172 VGPRs (64 x 64: 253-338, 1 wave/EU)
    "wide_packed": _tiles(64, 32, 8, 2, 256),    # D = 256, 64 rows: 36 KiB, 200-212 VGPRs (default MFMA spills)
    # D = 256 with few rows, and float32: 16 keys a step. 32-key steps need 67,584 B at fp32 D = 256.
    "wide": _tiles(16, 16, 4, 2, 256),           # fp32 D = 256: 33 KiB, 224-229 VGPRs; bf16 D = 256: 16 KiB
}
CDNA3_TABLES = KernelTables(forward=CDNA3_FORWARD, forward_float32=CDNA3_FORWARD_FLOAT32, backward=CDNA3_BACKWARD,
                            backward_float32=CDNA3_BACKWARD_FLOAT32, decode=CDNA3_DECODE,
                            combine_warps=(1, 2), preprocess_warps=2)  # 64 and 128 threads, as on NVIDIA


# -- CDNA2 (gfx90a: MI210, MI250, MI250X), 64 KiB LDS ---------------------------------------------------------
# The CDNA3 tables but for two 4-warp forwards, whose stream-pipelined (s2) builds spill here at 2 waves/EU
# (D = 64: 16-44 B with the document mask; D = 256: 8-32 B): one stage keeps the tile and the occupancy.
CDNA2_FORWARD = {
    **CDNA3_FORWARD,
    64: _tiles(128, 64, 4, 1, 64, waves=2),     # 16 KiB, 181-205 VGPRs
    256: _tiles(64, 32, 4, 1, 256, waves=2),    # 32 KiB, 208-225 VGPRs
}
CDNA2_TABLES = replace(CDNA3_TABLES, forward=CDNA2_FORWARD)

# -- CDNA4 (gfx950: MI350X, MI355X), 160 KiB LDS ---------------------------------------------------------------
# Same register file as CDNA3; its builds use about twice the LDS of gfx942's (the D = 128 forward: 67,520 B
# against 32,768 B) and fewer VGPRs (152-185 against 190-250), so the CDNA3 tables pass with room to spare.
# D = 256 takes 128-row forward tiles, which need all of gfx942's 64 KiB: 67,520 B of 160 KiB, 196-203
# VGPRs (half the K/V reads of the 64-row tiles). Larger score tiles still spill (128 x 128 at D = 128:
# 76 B; 64 x 64 on 4 warps at D = 256: 140 B), so the rest stays.
CDNA4_FORWARD = {**CDNA3_FORWARD, 256: _tiles(128, 32, 8, 2, 256)}
CDNA4_TABLES = replace(CDNA3_TABLES, forward=CDNA4_FORWARD)


def _amd(name: str, capability: int, generation: str, devices: str, lds: int, precisions, compute_units: int,
         tables: KernelTables, known_spills=()) -> Target:
    return Target(name=name, backend="hip", arch=name, capability=capability, generation=generation, devices=devices,
                  warp_size=64, shared_memory=lds, max_registers=MAX_VGPRS, tensor_instructions="mfma",
                  dot_precisions=tuple(precisions), float32_dot="ieee", sm_count=compute_units, tables=tables,
                  known_spills=tuple(known_spills))


AMD_TARGETS = (
    _amd("gfx90a", 90, "CDNA2", "MI210, MI250, MI250X", 65536, ("ieee", "bf16x3", "bf16x6"), 104, CDNA2_TABLES),
    _amd("gfx942", 94, "CDNA3", "MI300X, MI300A, MI325X", 65536, ("ieee", "tf32", "bf16x3", "bf16x6"), 304,
         CDNA3_TABLES),
    _amd("gfx950", 95, "CDNA4", "MI350X, MI355X", 163840, ("ieee", "bf16x3", "bf16x6"), 256, CDNA4_TABLES),
)
