"""Ahead-of-time compilation for NVIDIA targets without a GPU, and what ptxas says about it.

``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32))``
runs Triton's whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin through the bundled
``ptxas``) on any machine. CI uses it to prove that every config compiles for sm_80 and sm_90,
that the sm_90 build uses Hopper's ``wgmma`` tensor-core instructions, and that the main configs
do not spill registers (read from ``ptxas -v``).

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
from typing import Dict, Optional, Tuple

import torch

from ..jit.functions import TRITON_DTYPES

ARCHS = (80, 90)


@dataclass
class AotResult:
    """What one ahead-of-time build produced and what ptxas said about it."""

    arch: int
    label: str
    ptx: str
    ttgir: str
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

    @property
    def async_waits(self) -> int:
        """How many ``async_wait`` ops the TTGIR has (software pipelining of the loads)."""
        return self.ttgir.count("async_wait")

    def __str__(self) -> str:
        return (f"sm_{self.arch} {self.label}: {self.registers} registers, "
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


def compile_kernel(kernel, arguments: Dict[str, object], constexprs: Dict[str, object], *, arch: int,
                   num_warps: int, num_stages: Optional[int], label: str = "", inspect_sass: bool = False) -> AotResult:
    """``triton.compile`` a ``@triton.jit`` kernel for ``sm_{arch}`` with these named arguments
    (example tensors, e.g. on the ``meta`` device) and constexprs, and read what ptxas says."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, all_constexprs, attrs = build_signature(kernel, arguments, constexprs)
    options = {"num_warps": num_warps, "enable_fp_fusion": True}
    if num_stages is not None:
        options["num_stages"] = num_stages
    compiled = triton.compile(ASTSource(kernel, signature, all_constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                              options=options)
    ptx = compiled.asm["ptx"]
    registers, spill_stores, spill_loads = ptxas_report(ptx, arch)
    shared = int(getattr(compiled.metadata, "shared", 0))
    wgmma = sass_has_wgmma(compiled.asm["cubin"]) if inspect_sass else None
    return AotResult(arch, label or kernel.__name__, ptx, compiled.asm.get("ttgir", ""), registers, spill_stores,
                     spill_loads, shared, wgmma)
