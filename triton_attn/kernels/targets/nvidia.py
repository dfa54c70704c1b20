"""NVIDIA targets: Ampere (sm_80, sm_86), Ada (sm_89), Hopper (sm_90), Blackwell (sm_100, sm_120).

Limits from the CUDA programming guide (opt-in shared memory per block, 255 registers per thread);
tensor-core instructions as Triton 3.9 emits them for ``tl.dot`` (read from the PTX of the AOT builds:
``tests/kernels/test_targets_aot.py``). The config tables: sm_80's are the library's base tables
(``attention/configs.py``, ``decode/configs.py``); other targets differ where their builds said so.
"""

from __future__ import annotations

from ..attention.configs import (
    FLOAT32_BACKWARD_CONFIGS,
    FLOAT32_CONFIGS,
    HOPPER_BACKWARD_CONFIGS,
    MAIN_BACKWARD_CONFIGS,
    MAIN_CONFIGS,
)
from ..decode.configs import DECODE_PICKS
from .target import KernelTables, KnownSpill, Target

NVIDIA_PRECISIONS = ("tf32", "tf32x3", "ieee", "bf16x3", "bf16x6")
MAX_REGISTERS = 255

BASE_TABLES = KernelTables(forward=MAIN_CONFIGS, forward_float32=FLOAT32_CONFIGS, backward=MAIN_BACKWARD_CONFIGS,
                           backward_float32=FLOAT32_BACKWARD_CONFIGS, decode=DECODE_PICKS)
HOPPER_TABLES = KernelTables(forward=MAIN_CONFIGS, forward_float32=FLOAT32_CONFIGS, backward=HOPPER_BACKWARD_CONFIGS,
                             backward_float32=FLOAT32_BACKWARD_CONFIGS, decode=DECODE_PICKS)
# float32 backward at D = 256: correct, slower (``attention/configs.SPILLING_CONFIGS``).
FLOAT32_WIDE_SPILLS = (
    KnownSpill("dkdv", 256, "float32", 4096, "3xTF32 operand splits of 16-wide tiles at D = 256 (the accuracy path)"),
    KnownSpill("dq", 256, "float32", 4096, "3xTF32 operand splits of 16-wide tiles at D = 256 (the accuracy path)"),
)


def _nvidia(name: str, capability: int, generation: str, devices: str, shared_memory: int, instructions: str,
            sm_count: int, tables: KernelTables = BASE_TABLES, known_spills=FLOAT32_WIDE_SPILLS,
            deep_pipelines: bool = False) -> Target:
    return Target(name=name, backend="cuda", arch=capability, capability=capability, generation=generation,
                  devices=devices, warp_size=32, shared_memory=shared_memory, max_registers=MAX_REGISTERS,
                  tensor_instructions=instructions, dot_precisions=NVIDIA_PRECISIONS, float32_dot="tf32x3",
                  sm_count=sm_count, tables=tables, known_spills=tuple(known_spills), deep_pipelines=deep_pipelines)


NVIDIA_TARGETS = (
    _nvidia("sm_80", 80, "Ampere (data center)", "A100, A30", 166912, "mma.sync", 108),
    _nvidia("sm_86", 86, "Ampere (consumer, workstation)", "RTX 3090, RTX A6000, A10, A40", 101376, "mma.sync", 84),
    _nvidia("sm_89", 89, "Ada Lovelace", "RTX 4090, RTX 6000 Ada, L40S, L4", 101376, "mma.sync", 128),
    _nvidia("sm_90", 90, "Hopper", "H100, H200, GH200", 232448, "wgmma", 132, tables=HOPPER_TABLES,
            deep_pipelines=True),
    _nvidia("sm_100", 100, "Blackwell (data center)", "B200, GB200", 232448, "tcgen05", 148, tables=HOPPER_TABLES,
            deep_pipelines=True),
    _nvidia("sm_120", 120, "Blackwell (consumer, workstation)", "RTX 5090, RTX PRO 6000", 101376, "mma.sync", 170),
)
