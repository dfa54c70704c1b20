"""Ahead-of-time compilation of generated kernels for NVIDIA targets, without a GPU.

``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32))``
runs Triton's whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin through the bundled
``ptxas``) on any machine. CI uses it to prove that every config of the table compiles for
sm_80 and sm_90, that the sm_90 build uses Hopper's ``wgmma`` tensor-core instructions, and
that the main configs do not spill registers (read from ``ptxas -v``).

The signature mirrors what the JIT would specialize for contiguous inputs: unit last-dim
strides are constants, pointers and the other strides are 16-divisible.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch

from ..attention import forward
from ..jit.functions import MASK_BITMASK, GeneratedKernel
from ..attention.configs import KernelConfig
from ..attention.forward_launch import kernel_constexprs

ARCHS = (80, 90)
# Largest shared memory one program may use (bytes): A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}

_TRITON_DTYPES = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
    torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8",
    torch.bool: "u8",  # bool captured tensors are passed as uint8 views
}
# Runtime parameters the JIT turns into the constant 1 for contiguous tensors.
_UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_layout_m")
_NOT_DIVISIBLE = ("q_len", "kv_len", "num_q_heads", "gqa_groups", "scale_log2", "score_scale")


@dataclass
class AotResult:
    """What one ahead-of-time build produced and what ptxas said about it."""

    arch: int
    config: KernelConfig
    head_dim: int
    dtype: torch.dtype
    ptx: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    sass_has_wgmma: Optional[bool]

    @property
    def ptx_has_wgmma(self) -> bool:
        return "wgmma.mma_async" in self.ptx

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0

    def __str__(self) -> str:
        return (f"sm_{self.arch} {self.config.name} D={self.head_dim} {self.dtype}: {self.registers} registers, "
                f"spills {self.spill_stores}/{self.spill_loads} bytes, shared {self.shared_bytes} B, "
                f"wgmma {self.ptx_has_wgmma}")


# Pointer types of the bitmask fallback's arguments (``fallback.py``; the backward adds the transposed ids).
_FALLBACK_POINTERS = {"fallback_bits": "*u8", "fallback_offsets": "*i32", "fallback_block_ids": "*i32"}


def _captured_pointer_types(kernel: GeneratedKernel) -> Dict[str, str]:
    if kernel.spec.mask_mode == MASK_BITMASK:
        return dict(_FALLBACK_POINTERS)
    types = {}
    for prefix, traced in (("mask_cap", kernel.spec.mask), ("score_cap", kernel.spec.score)):
        if traced is None:
            continue
        for slot, tensor in enumerate(traced.captured):
            types[f"{prefix}{slot}"] = "*" + _TRITON_DTYPES[tensor.dtype]
    return types


def build_signature(kernel: GeneratedKernel, dtype: torch.dtype, constexprs: Dict[str, object], *,
                    runtime_params: Sequence[Tuple[str, str]] = forward.RUNTIME_PARAMS,
                    unit_strides: Iterable[str] = _UNIT_STRIDES, not_divisible: Iterable[str] = _NOT_DIVISIBLE):
    """(signature, constexprs, attrs) for ``ASTSource``, in the kernel's parameter order, as the JIT
    specializes contiguous inputs: unit strides become the constant 1, pointers and strides get
    the divisibility-by-16 hint. ``runtime_params``: the kernel family's (name, kind) list."""
    pointer_types = {"ptr:in": "*" + _TRITON_DTYPES[dtype], "ptr:f32": "*fp32", "ptr:i32": "*i32"}
    runtime_types = dict(runtime_params)
    unit_strides, not_divisible = set(unit_strides), set(not_divisible)
    captured_pointers = _captured_pointer_types(kernel)
    signature, all_constexprs, attrs = {}, dict(constexprs), {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name in unit_strides:
            signature[name], all_constexprs[name] = "constexpr", 1
            continue
        if name in runtime_types:
            signature[name] = pointer_types.get(runtime_types[name], runtime_types[name])
        else:  # a captured tensor's pointer, or its size or stride
            signature[name] = captured_pointers.get(name, "i32")
        if signature[name].startswith("*") or (signature[name] == "i32" and name.startswith("stride_")
                                               and name not in not_divisible):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, all_constexprs, attrs


def ptxas_path(arch: int) -> str:
    """The ptxas Triton itself uses for ``sm_{arch}`` (newer Triton bundles a second one for sm_90+)."""
    if os.environ.get("TRITON_PTXAS_PATH"):
        return os.environ["TRITON_PTXAS_PATH"]
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except (ImportError, AttributeError, TypeError):
        import triton

        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def ptxas_report(ptx: str, arch: int) -> Tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ``ptxas -v`` on ``ptx``."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "kernel.ptx")
        with open(source, "w") as stream:
            stream.write(ptx)
        result = subprocess.run([ptxas_path(arch), "-v", f"--gpu-name={gpu}", source, "-o", os.path.join(tmp, "k.cubin")],
                                capture_output=True, text=True)
    text = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"ptxas failed for {gpu}: {text.strip()}")
    registers = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return registers, int(spills.group(1)), int(spills.group(2))


def sass_has_wgmma(cubin: bytes) -> Optional[bool]:
    """Whether the SASS (``cuobjdump -sass``) holds ``HGMMA`` (wgmma) instructions; None if no cuobjdump."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as stream:
            stream.write(cubin)
        result = subprocess.run([tool, "-sass", path], capture_output=True, text=True)
    if result.returncode != 0:
        return None
    return "HGMMA" in result.stdout


def compile_kernel(kernel: GeneratedKernel, signature: Dict[str, str], constexprs: Dict[str, object], attrs: dict,
                   tiles: KernelConfig, *, arch: int, dtype: torch.dtype, head_dim: int,
                   inspect_sass: bool = False) -> AotResult:
    """``triton.compile`` one generated kernel for ``sm_{arch}`` and read what ptxas says about it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    compiled = triton.compile(ASTSource(kernel.jit(), signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": tiles.num_warps, "num_stages": tiles.num_stages})
    ptx = compiled.asm["ptx"]
    registers, spill_stores, spill_loads = ptxas_report(ptx, arch)
    shared = int(getattr(compiled.metadata, "shared", 0))
    wgmma = sass_has_wgmma(compiled.asm["cubin"]) if inspect_sass else None
    return AotResult(arch, tiles, head_dim, dtype, ptx, registers, spill_stores, spill_loads, shared, wgmma)


def compile_forward(kernel: GeneratedKernel, config: KernelConfig, *, arch: int, dtype: torch.dtype = torch.bfloat16,
                    head_dim: int = 128, head_dim_v: Optional[int] = None, block_size: Tuple[int, int] = (128, 128),
                    kv_len: int = 4096, inspect_sass: bool = False) -> AotResult:
    """Compile ``kernel`` with ``config`` for ``sm_{arch}`` and report registers, spills, wgmma."""
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    constexprs = kernel_constexprs(head_dim=head_dim, head_dim_v=head_dim_v, dtype=dtype, block_size=block_size,
                                   config=config, kv_len=kv_len, interpret=False)
    signature, all_constexprs, attrs = build_signature(kernel, dtype, constexprs)
    return compile_kernel(kernel, signature, all_constexprs, attrs, config, arch=arch, dtype=dtype, head_dim=head_dim,
                          inspect_sass=inspect_sass)


def compile_table(kernel: GeneratedKernel, configs: Sequence[KernelConfig], archs: Sequence[int] = ARCHS,
                  **kwargs) -> list:
    """``compile_forward`` for every (config, arch) pair."""
    return [compile_forward(kernel, config, arch=arch, **kwargs) for config in configs for arch in archs]
