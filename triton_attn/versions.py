"""Which torch / Triton / numpy releases triton-attn supports, checked when a Triton backend is first used.

The floors follow what users have: torch 2.8 pins Triton 3.4 (2.9 -> 3.5, 2.10 and 2.11 -> 3.6), so
``pip install triton-attn`` into an existing torch >= 2.8 environment changes neither torch nor
Triton. Nothing here imports torch, Triton or numpy: versions are read from the installed
distributions' metadata, so ``triton-attn info`` can report a broken pairing without tripping on it.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from importlib import metadata
from typing import Optional, Tuple

MIN_TORCH = (2, 8)
MIN_TRITON = (3, 4)
# Triton's interpreter before 3.7 turns a loop bound into a Python int with int(<1-element array>), which
# numpy 2.4 turned from a deprecation warning into a TypeError: every kernel with a runtime loop bound
# fails under TRITON_INTERPRET=1 (checked with Triton 3.4 and 3.6; fixed in 3.7).
INTERPRETER_NUMPY_FIXED_IN_TRITON = (3, 7)
INTERPRETER_BREAKING_NUMPY = (2, 4)


class UnsupportedToolchainError(ImportError):
    """Triton is missing or too old, or its interpreter cannot run with the installed numpy."""


def parse_version(text: Optional[str]) -> Optional[Tuple[int, int]]:
    """(major, minor) of a version string such as ``3.4.0``, ``2.13.0+cpu`` or ``3.6.0+git1234``."""
    match = re.match(r"\s*(\d+)\.(\d+)", text or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def installed_version(distribution: str) -> Optional[str]:
    """The installed version of ``distribution`` (from its metadata; nothing is imported), or None."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


# Triton ships under other distribution names in some torch builds (ROCm, nightlies).
TRITON_DISTRIBUTIONS = ("triton", "pytorch-triton-rocm", "pytorch-triton", "triton-xpu")


def triton_version() -> Optional[str]:
    """The installed Triton's version; ``"unknown"`` when the module exists without metadata; None when absent."""
    for name in TRITON_DISTRIBUTIONS:
        version = installed_version(name)
        if version is not None:
            return version
    return "unknown" if importlib.util.find_spec("triton") is not None else None


def _dotted(version: Tuple[int, int]) -> str:
    return ".".join(map(str, version))


def triton_problem() -> Optional[str]:
    """Why the Triton kernels cannot run here (Triton missing or older than ``MIN_TRITON``), or None."""
    version = triton_version()
    if version is None:
        return (f"Triton is not installed; the triton and interpret backends need triton>={_dotted(MIN_TRITON)} "
                f"(it comes with torch's CUDA and ROCm builds; with a CPU-only torch: "
                f"pip install 'triton>={_dotted(MIN_TRITON)}')")
    parsed = parse_version(version)
    if parsed is not None and parsed < MIN_TRITON:
        return (f"Triton {version} is too old: triton-attn needs triton>={_dotted(MIN_TRITON)} (torch 2.8 ships 3.4); "
                f"pip install 'triton>={_dotted(MIN_TRITON)}' or a newer torch")
    return None


def interpreter_problem() -> Optional[str]:
    """Why the Triton interpreter (``backend="interpret"``) will fail here, or None."""
    triton = parse_version(triton_version())
    numpy_version = installed_version("numpy")
    numpy = parse_version(numpy_version)
    if triton is None or numpy is None:
        return None
    if triton < INTERPRETER_NUMPY_FIXED_IN_TRITON and numpy >= INTERPRETER_BREAKING_NUMPY:
        return (f"the interpreter of Triton {triton_version()} fails with numpy {numpy_version} "
                f"(TypeError: only 0-dimensional arrays can be converted to Python scalars); install "
                f"numpy<{_dotted(INTERPRETER_BREAKING_NUMPY)} "
                f"(pip install 'numpy<{_dotted(INTERPRETER_BREAKING_NUMPY)}') "
                f"or triton>={_dotted(INTERPRETER_NUMPY_FIXED_IN_TRITON)}")
    return None


@functools.lru_cache(maxsize=None)
def require_triton(interpret: bool = False) -> None:
    """Raise ``UnsupportedToolchainError`` (an ImportError) with what to install when the Triton kernels
    cannot run here; with ``interpret=True`` also when the interpreter cannot. Checked once per process."""
    problem = triton_problem() or (interpreter_problem() if interpret else None)
    if problem:
        raise UnsupportedToolchainError(problem)
