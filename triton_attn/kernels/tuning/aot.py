"""Ahead-of-time compilation for any supported target without a GPU, and what the compiler says about it.

``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget(...))`` runs Triton's
whole pipeline on any machine: for NVIDIA (TTIR -> TTGIR -> LLVM -> PTX -> cubin through the
bundled ``ptxas``) and for AMD (-> AMDGCN -> hsaco through the bundled LLVM). CI uses it to prove
that the kernels compile for every target of ``kernels.targets``, fit its shared memory (LDS), do not
spill (ptxas ``-v`` on NVIDIA; the AMDGCN metadata's VGPR spills and scratch on AMD), and use the
target's tensor-core instructions (wgmma on sm_90, tcgen05 on sm_100, mfma on AMD).

``compile_kernel`` takes the kernel's *named arguments* -- the same dict a launcher passes at run
time, built from example (e.g. ``meta``) tensors -- and derives the signature from them the way
Triton's JIT specializes a launch: pointers are 16-byte aligned, an int equal to 1 becomes the
constant 1, an int divisible by 16 gets the divisibility hint, except for the kernel's
``do_not_specialize`` parameters; a tuple argument (captured tensors) gets a tuple of types.
So a kernel's signature is written once, in its launcher. This module imports no kernel.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple, Union

import torch

from ..jit.functions import TRITON_DTYPES
from ..targets import Target
from ..targets import get as get_target

ARCHS = (80, 90)  # the targets every kernel variant is built for in the tests (the matrix covers the rest)
TENSOR_INSTRUCTIONS = {"wgmma": "wgmma.mma_async", "tcgen05": "tcgen05.mma", "mma.sync": "mma.sync.aligned",
                       "mfma": "v_mfma"}


@dataclass
class AotResult:
    """What one ahead-of-time build produced and what the compiler said about it.

    arch: the target's arch (90, "gfx942"); ptx / amdgcn: the assembly (the other one is empty);
    registers: per thread (NVIDIA) or VGPRs per lane (AMD); spill_stores / spill_loads: ptxas's spill
    bytes (NVIDIA); scratch_bytes / vgpr_spills: private memory per lane and VGPRs spilled (AMD);
    shared_bytes: shared memory (LDS) per block."""

    arch: Union[int, str]
    label: str
    ptx: str
    ttgir: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    sass_has_wgmma: Optional[bool]
    amdgcn: str = ""
    scratch_bytes: int = 0
    vgpr_spills: int = 0

    @property
    def target(self) -> Target:
        return get_target(self.arch)

    @property
    def ptx_has_wgmma(self) -> bool:
        return "wgmma.mma_async" in self.ptx

    @property
    def spills(self) -> bool:
        return self.spill_bytes > 0

    @property
    def spill_bytes(self) -> int:
        """Spilled bytes: ptxas spill stores + loads (NVIDIA), or scratch bytes per lane (AMD)."""
        return self.spill_stores + self.spill_loads + max(self.scratch_bytes, 4 * self.vgpr_spills)

    def uses(self, instructions: str) -> bool:
        """Whether the assembly holds ``instructions`` ("wgmma", "tcgen05", "mma.sync", "mfma")."""
        return TENSOR_INSTRUCTIONS[instructions] in (self.amdgcn or self.ptx)

    @property
    def async_waits(self) -> int:
        """How many ``async_wait`` ops the TTGIR has (software pipelining of the loads)."""
        return self.ttgir.count("async_wait")

    def __str__(self) -> str:
        name = self.arch if isinstance(self.arch, str) else f"sm_{self.arch}"
        if self.amdgcn:
            return (f"{name} {self.label}: {self.registers} VGPRs, spills {self.vgpr_spills} VGPRs / scratch "
                    f"{self.scratch_bytes} B, LDS {self.shared_bytes} B, mfma {self.uses('mfma')}")
        return (f"{name} {self.label}: {self.registers} registers, "
                f"spills {self.spill_stores}/{self.spill_loads} bytes, shared {self.shared_bytes} B, "
                f"wgmma {self.ptx_has_wgmma}, async_wait {self.async_waits}")


def _value_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TRITON_DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no ahead-of-time type for a kernel argument of type {type(value).__name__}")


def build_signature(kernel, arguments: Dict[str, object], constexprs: Dict[str, object]):
    """(signature, constexprs, attrs) for ``ASTSource`` from a launch's named arguments (see the module doc)."""
    do_not_specialize = set(getattr(kernel, "do_not_specialize", ()) or ())
    signature, all_constexprs, attrs = {}, dict(constexprs), {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name not in arguments:
            raise TypeError(f"{kernel.__name__}: no value for parameter {name!r}")
        value = arguments[name]
        if isinstance(value, tuple):  # captured tensors: the ints stay runtime values
            signature[name] = tuple(_value_type(item) for item in value)
            continue
        kind = _value_type(value)
        specialize = name not in do_not_specialize and index not in do_not_specialize
        if kind in ("i32", "i64") and specialize and value == 1:
            signature[name], all_constexprs[name] = "constexpr", 1
            continue
        signature[name] = kind
        if kind.startswith("*") or (kind in ("i32", "i64") and specialize and value % 16 == 0):
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
        result = subprocess.run([ptxas_path(arch), "-v", f"--gpu-name={gpu}", source,
                                 "-o", os.path.join(tmp, "k.cubin")],
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


def amdgcn_report(amdgcn: str) -> Tuple[int, int, int]:
    """(VGPRs, VGPRs spilled, scratch bytes per lane) from the metadata of an AMDGCN listing."""
    def number(pattern: str) -> int:
        found = re.findall(pattern, amdgcn)
        return max(int(value) for value in found) if found else 0

    vgprs = max(number(r"\.vgpr_count:\s+(\d+)"), number(r"; TotalNumVgprs: (\d+)"), number(r"; NumVgprs: (\d+)"))
    return vgprs, number(r"\.vgpr_spill_count:\s+(\d+)"), number(r"; ScratchSize: (\d+)")


def compile_kernel(kernel, arguments: Dict[str, object], constexprs: Dict[str, object], *,
                   arch: Union[int, str, Target], num_warps: int, num_stages: Optional[int], label: str = "",
                   inspect_sass: bool = False, options: Optional[Mapping[str, int]] = None) -> AotResult:
    """``triton.compile`` a ``@triton.jit`` kernel for the target ``arch`` (90, "sm_120", "gfx942", a
    ``Target``) with these named arguments (example tensors, e.g. on the ``meta`` device) and constexprs,
    and read what the compiler says. ``options``: extra compile options (a config's ``amd_options``)."""
    import triton
    from triton.compiler import ASTSource

    target = get_target(arch)
    signature, all_constexprs, attrs = build_signature(kernel, arguments, constexprs)
    compile_options = {"num_warps": num_warps, "enable_fp_fusion": True, **(options or {})}
    if num_stages is not None:
        compile_options["num_stages"] = num_stages
    compiled = triton.compile(ASTSource(kernel, signature, all_constexprs, attrs), target=target.gpu_target(),
                              options=compile_options)
    shared = int(getattr(compiled.metadata, "shared", 0))
    ttgir = compiled.asm.get("ttgir", "")
    if target.is_amd:
        amdgcn = compiled.asm["amdgcn"]
        vgprs, vgpr_spills, scratch = amdgcn_report(amdgcn)
        return AotResult(target.arch, label or kernel.__name__, "", ttgir, vgprs, 0, 0, shared, None, amdgcn=amdgcn,
                         scratch_bytes=scratch, vgpr_spills=vgpr_spills)
    ptx = compiled.asm["ptx"]
    registers, spill_stores, spill_loads = ptxas_report(ptx, target.arch)
    wgmma = sass_has_wgmma(compiled.asm["cubin"]) if inspect_sass else None
    return AotResult(target.arch, label or kernel.__name__, ptx, ttgir, registers, spill_stores, spill_loads, shared,
                     wgmma)
