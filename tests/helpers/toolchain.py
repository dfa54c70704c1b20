"""Whether the ahead-of-time compile tests can run here: Triton's NVIDIA backend and its ptxas."""

from __future__ import annotations

import os


def nvidia_toolchain_available(*archs: int) -> bool:
    """True when Triton's NVIDIA backend imports and the ptxas for every ``sm_{arch}`` is on disk."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        return False
    from triton_attn.kernels.tuning import aot

    return all(os.path.exists(aot.ptxas_path(arch)) for arch in archs)
