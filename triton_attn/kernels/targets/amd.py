"""AMD Instinct targets: CDNA2 (gfx90a), CDNA3 (gfx942), CDNA4 (gfx950).

Limits: 64-wide wavefronts, LDS per workgroup (64 KiB on CDNA2/3, 160 KiB on CDNA4), 512 VGPRs per
lane (architectural and accumulation registers together). Triton's AMD backend does not check LDS at
compile time (a launch over the limit fails at run time), so the AOT matrix compares it with
``shared_memory`` itself. Every CDNA target computes float32 products exactly on the MFMA units
("ieee"); ``tf32`` exists on gfx942 only and ``tf32x3`` nowhere.
"""

from __future__ import annotations

from ..attention.configs import FLOAT32_BACKWARD_CONFIGS, FLOAT32_CONFIGS, MAIN_BACKWARD_CONFIGS, MAIN_CONFIGS
from ..decode.configs import DECODE_PICKS
from .target import KernelTables, Target

MAX_VGPRS = 512

AMD_TABLES = KernelTables(forward=MAIN_CONFIGS, forward_float32=FLOAT32_CONFIGS, backward=MAIN_BACKWARD_CONFIGS,
                          backward_float32=FLOAT32_BACKWARD_CONFIGS, decode=DECODE_PICKS, combine_warps=(1, 2),
                          preprocess_warps=2)


def _amd(name: str, capability: int, generation: str, devices: str, lds: int, precisions, compute_units: int,
         tables: KernelTables = AMD_TABLES, known_spills=()) -> Target:
    return Target(name=name, backend="hip", arch=name, capability=capability, generation=generation, devices=devices,
                  warp_size=64, shared_memory=lds, max_registers=MAX_VGPRS, tensor_instructions="mfma",
                  dot_precisions=tuple(precisions), float32_dot="ieee", sm_count=compute_units, tables=tables,
                  known_spills=tuple(known_spills))


AMD_TARGETS = (
    _amd("gfx90a", 90, "CDNA2", "MI210, MI250, MI250X", 65536, ("ieee", "bf16x3", "bf16x6"), 104),
    _amd("gfx942", 94, "CDNA3", "MI300X, MI300A, MI325X", 65536, ("ieee", "tf32", "bf16x3", "bf16x6"), 304),
    _amd("gfx950", 95, "CDNA4", "MI350X, MI355X", 163840, ("ieee", "bf16x3", "bf16x6"), 256),
)
