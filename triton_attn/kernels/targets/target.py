"""What the library knows about one GPU target: its limits, its tensor-core instructions, its config tables.

A ``Target`` is data: the per-vendor modules (``nvidia.py``, ``amd.py``) list them, ``targets``
(the package) resolves a device to one. Nothing here imports Triton; ``gpu_target()`` does, lazily,
for ahead-of-time builds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Tuple, Union

import torch

from ..attention.configs import BackwardConfig, KernelConfig

Arch = Union[int, str]


@dataclass(frozen=True)
class KernelTables:
    """The configs a target launches with when nothing was tuned.

    forward / forward_float32 and backward / backward_float32: ``{padded head_dim: config}`` for 16-bit
    and float32 inputs (the smallest width holding D and Dv is used); decode: the four picks of
    ``decode.configs.default_decode_config`` ("few_rows", "packed", "wide_packed", "wide");
    combine_warps: warps of the decode combine kernel for Dv < 128 and Dv >= 128; preprocess_warps: warps
    of the backward's delta kernel."""

    forward: Mapping[int, KernelConfig]
    forward_float32: Mapping[int, KernelConfig]
    backward: Mapping[int, BackwardConfig]
    backward_float32: Mapping[int, BackwardConfig]
    decode: Mapping[str, KernelConfig]
    combine_warps: Tuple[int, int] = (2, 4)
    preprocess_warps: int = 4

    def combine_num_warps(self, head_dim_v: int) -> int:
        return self.combine_warps[1] if head_dim_v >= 128 else self.combine_warps[0]


@dataclass(frozen=True)
class KnownSpill:
    """A default build that spills on a target, accepted with its size and the reason (the AOT matrix
    fails on any spill not listed). kernel: "forward", "dkdv", "dk", "dv", "dq", "decode", "preprocess"; dtype:
    "float16", "bfloat16" or "float32"; spill_bytes: at most this many (ptxas spill stores + loads on
    NVIDIA, scratch bytes on AMD)."""

    kernel: str
    head_dim: int
    dtype: str
    spill_bytes: int
    why: str


@dataclass(frozen=True)
class Target:
    """One GPU target.

    name: "sm_90", "gfx942"; backend: "cuda" or "hip" (Triton's ``GPUTarget`` backend); arch: 90, or
    "gfx942"; capability: what ``torch.cuda.get_device_capability`` reports there (major * 10 + minor,
    also on ROCm); generation / devices: for people; warp_size: 32 (NVIDIA warps) or 64 (AMD wavefronts);
    shared_memory: bytes one block may use (NVIDIA's opt-in maximum; AMD's LDS per workgroup, which
    Triton's AMD backend does not check at compile time: our AOT checks do); max_registers: per thread
    (AMD: VGPRs, architectural and accumulation together); tensor_instructions: what Triton 3.9 emits
    for ``tl.dot`` there ("mma.sync", "wgmma", "tcgen05", "mfma"); dot_precisions: the
    ``input_precision`` values its compiler accepts; float32_dot: the one float32 inputs use (float32
    accuracy: 3xTF32 on NVIDIA, the native float32 MFMA on AMD); sm_count: multiprocessors (CUs) of its
    usual device, for planning without a GPU; deep_pipelines: large shared memory, so the search space
    holds deeper software pipelines."""

    name: str
    backend: str
    arch: Arch
    capability: int
    generation: str
    devices: str
    warp_size: int
    shared_memory: int
    max_registers: int
    tensor_instructions: str
    dot_precisions: Tuple[str, ...]
    float32_dot: str
    sm_count: int
    tables: KernelTables
    known_spills: Tuple[KnownSpill, ...] = field(default=())
    deep_pipelines: bool = False

    @property
    def is_amd(self) -> bool:
        return self.backend == "hip"

    def dot_precision(self, dtype: torch.dtype) -> str:
        """``tl.dot``'s ``input_precision`` for inputs of ``dtype``: float32 gets ``float32_dot``; 16-bit
        inputs the native product ("tf32" on NVIDIA, where it does not apply to them and keeps the
        compiled code as it was; "ieee" on AMD, where "tf32" is not accepted by every target)."""
        if dtype == torch.float32:
            return self.float32_dot
        return "ieee" if self.is_amd else "tf32"

    def known_spill(self, kernel: str, head_dim: int, dtype: torch.dtype):
        """The ``KnownSpill`` accepted for this build, or None."""
        name = str(dtype).replace("torch.", "")
        for spill in self.known_spills:
            if spill.kernel == kernel and spill.head_dim == head_dim and spill.dtype == name:
                return spill
        return None

    def gpu_target(self):
        """Triton's ``GPUTarget`` for ahead-of-time builds (imports Triton)."""
        from triton.backends.compiler import GPUTarget

        return GPUTarget(self.backend, self.arch, self.warp_size)

    def __str__(self) -> str:
        return self.name
