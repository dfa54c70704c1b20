"""NVIDIA targets: Ampere (sm_80, sm_86), Ada (sm_89), Hopper (sm_90), Blackwell (sm_100, sm_120).

Limits from the CUDA programming guide (opt-in shared memory per block, 255 registers per thread);
tensor-core instructions as Triton 3.9 emits them for ``tl.dot`` (read from the PTX of the AOT builds:
``tests/kernels/test_targets_aot.py``). The config tables: sm_80's are the library's base tables
(``attention/configs.py``, ``decode/configs.py``) and sm_90's its Hopper tables, both kept exactly (their
compiled code must not change); the other targets differ where their builds said so. Every number below
is ptxas's (shared bytes, registers per thread, spill bytes) for the AOT matrix's builds
(``kernels/matrix.py``: D = 64/128/256 x fp16/bf16/fp32 x no mask/causal/document/softcap, Triton 3.9),
as ranges over those builds; "untimed" means the pick rests on the build numbers alone.

What each target's kernels run on (the matrix's ``tensor`` column):
  sm_80/86/89/120: mma.sync everywhere.
  sm_90:  wgmma for the 16-bit forward (every D), the 16-bit backward at D <= 128 and the float32 forward at
          D = 64; mma.sync for the 16-bit backward at D = 256 (16/32-row tiles, below wgmma's 64 rows), the
          rest of float32 and decode (16-row tiles).
  sm_100: tcgen05 for the 16-bit forward and backward (every D) and the float32 forward at D = 64;
          mma.sync for the rest of float32 (16/32-row tiles) and decode (16-row tiles).
"""

from __future__ import annotations

from ..attention.configs import (
    FLOAT32_BACKWARD_CONFIGS,
    FLOAT32_CONFIGS,
    HOPPER_BACKWARD_CONFIGS,
    MAIN_BACKWARD_CONFIGS,
    MAIN_CONFIGS,
    BackwardConfig,
    KernelConfig,
)
from ..decode.configs import DECODE_PICKS
from .target import KernelTables, KnownSpill, Target

NVIDIA_PRECISIONS = ("tf32", "tf32x3", "ieee", "bf16x3", "bf16x6")
MAX_REGISTERS = 255

BASE_TABLES = KernelTables(forward=MAIN_CONFIGS, forward_float32=FLOAT32_CONFIGS, backward=MAIN_BACKWARD_CONFIGS,
                           backward_float32=FLOAT32_BACKWARD_CONFIGS, decode=DECODE_PICKS)
HOPPER_TABLES = KernelTables(forward=MAIN_CONFIGS, forward_float32=FLOAT32_CONFIGS, backward=HOPPER_BACKWARD_CONFIGS,
                             backward_float32=FLOAT32_BACKWARD_CONFIGS, decode=DECODE_PICKS)

# float32 forward without spills on sm_86, sm_89, sm_100 and sm_120 (sm_80's table spills 16-548 B there):
# 8 warps share the 3xTF32 operand splits. Registers on sm_86 (= sm_89) / sm_120 / sm_100:
SPILL_FREE_FLOAT32_CONFIGS = {
    # 49,152-49,408 B (sm_100: 32,776-33,552 B); 255 / 223-227 / 156-182 (base m64_n32_w4_s2: 16-64 B spills
    # on sm_120 and sm_100)
    64: KernelConfig(64, 32, 8, 2, max_head_dim=64),
    # 73,728-73,984 B; 232-240 on all three (base m32_n32_w4_s2: 72-200 B spills)
    128: KernelConfig(32, 32, 8, 2, max_head_dim=128),
    # 49,152 B; 250-252 / 255 / 255 (base m16_n32_w4_s1: 260-548 B spills; m16_n32_w8_s1 still spills 32-48 B
    # on sm_120 and sm_100)
    256: KernelConfig(16, 16, 8, 1, max_head_dim=256),
}

# -- sm_86 / sm_89 / sm_120: 101,376 B of shared memory per block, mma.sync ------------------------------------
# 16-bit forward: sm_80's D = 128 pick (m128_n64_w8_s3) needs 98,304-99,328 B at 255 registers, no room for a
# mod's captured tensor. sm_86 / sm_89 / sm_120 numbers:
CONSUMER_FORWARD_CONFIGS = {
    64: MAIN_CONFIGS[64],                             # 49,152-50,176 B, 173-226 registers: fits as on sm_80
    # two stages: 65,536-66,048 B (65%), 200-210 registers (three stages: 255). m64_n64_w4_s3 fits too but at
    # 90,112 B and 255 registers.
    128: KernelConfig(128, 64, 8, 2, max_head_dim=128),
    # 8 warps: 69,632-69,888 B, 178-184 registers (base m64_n32_w4_s2 spills 12-64 B on sm_120, 56 B on sm_80).
    256: KernelConfig(64, 32, 8, 2, max_head_dim=256),
}
# Backward: sm_80's tiles fit (at most 98,304 B, float32 at D = 256), except that the float32 dQ at D = 64
# (m32_n32_w4_s1) spills 8 B on sm_86 / sm_89: 16-row programs, 32,768 B, 127-132 registers on all three.
CONSUMER_FLOAT32_BACKWARD_CONFIGS = {
    **FLOAT32_BACKWARD_CONFIGS,
    64: BackwardConfig(FLOAT32_BACKWARD_CONFIGS[64].dkdv, KernelConfig(16, 32, 4, 1), max_head_dim=64),
}
# Decode. The ptxas of these targets (1,536 threads per SM, not sm_80's 2,048) trims a kernel that lands just
# above some register count (64, 80, 128, 168) down to it with a few spilled bytes: the base 16-row tiles
# spill 16-48 B at D = 128 on sm_86 / sm_89 and 8 B at D = 64 on sm_120, the D = 256 ones 8 B on sm_120.
# Measured at 4, 32 and 64 packed rows (the launcher shrinks BLOCK_M to the rows), sm_86 and sm_120 alike:
CONSUMER_DECODE_PICKS = {
    # 128-key steps: 38,912-74,752 B, 86-128 registers
    "few_rows": KernelConfig(16, 128, 4, 2, max_head_dim=128),
    # two 64-key steps in flight: 20,496-90,112 B (the most at 64 rows, D = 128), 60-196 registers;
    # m64_n64_w4_s3 spills 8 B at 64 rows, m64_n128_w4_s2 needs 99,328 B there
    "packed": KernelConfig(64, 64, 8, 3, max_head_dim=128),
    # D = 256: 25,092-67,584 B, 80-194 registers (base m64_n32_w8_s2 spills 8 B on sm_120; m64_n32_w8_s3 needs
    # 102,400 B at 64 rows)
    "wide_packed": KernelConfig(64, 16, 8, 3, max_head_dim=256),
    # float32 (every D) and 16-bit D = 256 with few rows: the base m16_n32_w4_s2 needs 102,400 B at D = 256
    # (and spills 156-200 B on sm_120). 16-key steps on 8 warps: 67,584-67,712 B, 248-252 registers at D = 256,
    # 18,432-18,560 B and 107-118 registers at D = 64; 16-bit D = 256: 25,088-25,216 B, 72-80 registers.
    "wide": KernelConfig(16, 16, 8, 2, max_head_dim=256),
}
CONSUMER_TABLES = KernelTables(forward=CONSUMER_FORWARD_CONFIGS, forward_float32=SPILL_FREE_FLOAT32_CONFIGS,
                               backward=MAIN_BACKWARD_CONFIGS, backward_float32=CONSUMER_FLOAT32_BACKWARD_CONFIGS,
                               decode=CONSUMER_DECODE_PICKS)

# -- sm_100: 232,448 B, tcgen05 (accumulators in tensor memory) ------------------------------------------------
SM100_FORWARD_CONFIGS = {
    # a fourth stage: 82,944-87,072 B, 110-174 registers at D = 64; 164,864-168,992 B, 175-203 registers at
    # D = 128 (three stages: 132,096-134,688 B, 176-209). m128_n128_w8_s3 spills 20 B at D = 128. Untimed.
    64: KernelConfig(128, 64, 8, 4, max_head_dim=64),
    128: KernelConfig(128, 64, 8, 4, max_head_dim=128),
    # a third stage: 132,096-132,640 B, 236-242 registers (two: 98,336-99,104 B, 240-245). Untimed.
    256: KernelConfig(64, 32, 4, 3, max_head_dim=256),
}
# Backward, 16-bit. The Hopper D = 128 tiles (128 keys x 64 rows, dV and dK split) spill 8 B (dV) and 324-632 B
# (dK) here; 128 keys in one kernel 116 B; 64 keys x 64 rows in one kernel (K Q^T scores) do not: 165,888-167,488
# B, 210-251 registers. D = 64 keeps Hopper's 128 x 64 (100,352-102,976 B, 195-255 registers). At D = 256
# tcgen05 wants 64-key / 64-row tiles: dQ m64_n32_w8_s2 148,480-148,784 B, 104-120 registers; dK/dV in one
# kernel spills 1,388-2,304 B, split on one stage it does not (dV 65,544 B, 128 registers; dK 98,312 B, 225-245;
# two stages: dK spills 200 B). sm_80's D = 256 tiles (16/32 rows) would run mma.sync. Untimed.
SM100_BACKWARD_CONFIGS = {
    64: HOPPER_BACKWARD_CONFIGS[64],
    128: BackwardConfig(KernelConfig(64, 64, 8, 3), KernelConfig(128, 64, 8, 3), max_head_dim=128),
    256: BackwardConfig(KernelConfig(32, 64, 8, 1), KernelConfig(64, 32, 8, 2), max_head_dim=256, split_dkdv=True),
}
# Decode: base picks (16-row tiles, mma.sync), but float32 at D = 256 spills 136-196 B with m16_n32_w4_s2;
# 8 warps: 102,400-102,656 B, 251-254 registers (D = 64: 94-96, D = 128: 178-186).
SM100_TABLES = KernelTables(forward=SM100_FORWARD_CONFIGS, forward_float32=SPILL_FREE_FLOAT32_CONFIGS,
                            backward=SM100_BACKWARD_CONFIGS, backward_float32=FLOAT32_BACKWARD_CONFIGS,
                            decode={**DECODE_PICKS, "wide": KernelConfig(16, 32, 8, 2, max_head_dim=256)})


# -- known spills: the largest spill (ptxas stores + loads, bytes) over the matrix's four masks ------------------
FLOAT32_WIDE = "3xTF32 operand splits at D = 256 on 16-wide tiles (the accuracy path; the other tiles tried spill more)"
KEPT = "sm_80's table is kept as it is (its compiled code must not change)"
KEPT_HOPPER = "sm_90's table is kept as it is (its compiled code must not change)"


def _spills(**sizes) -> tuple:
    """``KnownSpill``s from ``kernel_D_dtype=(bytes, why)`` keywords, e.g. ``dq_256_float32=(496, "...")``."""
    found = []
    for key, (size, why) in sizes.items():
        kernel, head_dim, dtype = key.split("_")
        found.append(KnownSpill(kernel, int(head_dim), dtype, size, why))
    return tuple(found)


SM80_SPILLS = _spills(
    forward_128_float32=(168, f"3xTF32 on m32_n32_w4_s2 at 255 registers; {KEPT}"),
    forward_256_float16=(56, f"the document mask's captured ids on m64_n32_w4_s2 at 255 registers; {KEPT}"),
    forward_256_bfloat16=(56, f"the document mask's captured ids on m64_n32_w4_s2 at 255 registers; {KEPT}"),
    forward_256_float32=(704, f"{FLOAT32_WIDE}; {KEPT}"),
    dkdv_64_float32=(64, f"document and softcap mods on m32_n32_w4_s1 at 255 registers; {KEPT}"),
    dkdv_256_float32=(760, FLOAT32_WIDE),
    dq_256_float32=(496, FLOAT32_WIDE),
    decode_256_float32=(36, f"3xTF32 on m16_n32_w4_s2 at D = 256; {KEPT}"),
)
SM90_SPILLS = _spills(
    forward_128_float32=(316, f"3xTF32 on m32_n32_w4_s2 at 255 registers; {KEPT_HOPPER}"),
    forward_256_float32=(536, f"{FLOAT32_WIDE}; {KEPT_HOPPER}"),
    dkdv_64_float16=(16, f"softcap's derivative on 128 keys x 64 rows (wgmma) at 255 registers; {KEPT_HOPPER}"),
    dkdv_64_bfloat16=(16, f"softcap's derivative on 128 keys x 64 rows (wgmma) at 255 registers; {KEPT_HOPPER}"),
    dkdv_256_float32=(884, FLOAT32_WIDE),
    dq_256_float32=(528, FLOAT32_WIDE),
    decode_256_float32=(96, f"3xTF32 on m16_n32_w4_s2 at D = 256; {KEPT_HOPPER}"),
)
SM86_SPILLS = _spills(dkdv_256_float32=(816, FLOAT32_WIDE), dq_256_float32=(468, FLOAT32_WIDE))  # sm_89 alike
SM100_SPILLS = _spills(
    dkdv_256_float32=(872, FLOAT32_WIDE),
    dq_256_float32=(324, FLOAT32_WIDE),
    preprocess_128_float32=(8, "ptxas trims the delta kernel (4 warps, fixed: 128 threads) to 64 registers"),
)
SM120_SPILLS = _spills(dkdv_256_float32=(1032, FLOAT32_WIDE), dq_256_float32=(344, FLOAT32_WIDE))


def _nvidia(name: str, capability: int, generation: str, devices: str, shared_memory: int, instructions: str,
            sm_count: int, tables: KernelTables = BASE_TABLES, known_spills=(),
            deep_pipelines: bool = False) -> Target:
    return Target(name=name, backend="cuda", arch=capability, capability=capability, generation=generation,
                  devices=devices, warp_size=32, shared_memory=shared_memory, max_registers=MAX_REGISTERS,
                  tensor_instructions=instructions, dot_precisions=NVIDIA_PRECISIONS, float32_dot="tf32x3",
                  sm_count=sm_count, tables=tables, known_spills=tuple(known_spills), deep_pipelines=deep_pipelines)


NVIDIA_TARGETS = (
    _nvidia("sm_80", 80, "Ampere (data center)", "A100, A30", 166912, "mma.sync", 108, known_spills=SM80_SPILLS),
    _nvidia("sm_86", 86, "Ampere (consumer, workstation)", "RTX 3090, RTX A6000, A10, A40", 101376, "mma.sync", 84,
            tables=CONSUMER_TABLES, known_spills=SM86_SPILLS),
    _nvidia("sm_89", 89, "Ada Lovelace", "RTX 4090, RTX 6000 Ada, L40S, L4", 101376, "mma.sync", 128,
            tables=CONSUMER_TABLES, known_spills=SM86_SPILLS),
    _nvidia("sm_90", 90, "Hopper", "H100, H200, GH200", 232448, "wgmma", 132, tables=HOPPER_TABLES,
            known_spills=SM90_SPILLS, deep_pipelines=True),
    _nvidia("sm_100", 100, "Blackwell (data center)", "B200, GB200", 232448, "tcgen05", 148, tables=SM100_TABLES,
            known_spills=SM100_SPILLS, deep_pipelines=True),
    _nvidia("sm_120", 120, "Blackwell (consumer, workstation)", "RTX 5090, RTX PRO 6000", 101376, "mma.sync", 170,
            tables=CONSUMER_TABLES, known_spills=SM120_SPILLS),
)
