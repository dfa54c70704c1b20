"""Ahead-of-time compile tests: whether they can run here (Triton's NVIDIA backend and its ptxas), and the
traced mods of one kernel variant."""

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


def compile_mods(mask_mod=None, score_mod=None, mode=None) -> dict:
    """The traced mods of one kernel variant, as ``compile_forward`` / ``compile_backward`` keywords
    (``mask_mod`` defaults to causal, ``mode`` to a traced mask)."""
    from triton_attn.kernels.jit import functions
    from triton_attn.masks import causal_mask
    from triton_attn.masks.tracing import trace_mask_mod, trace_score_mod

    mode = functions.MASK_TRACED if mode is None else mode
    traced = trace_mask_mod(causal_mask if mask_mod is None else mask_mod) if mode == functions.MASK_TRACED else None
    score = trace_score_mod(score_mod) if score_mod is not None else None
    return dict(mask=traced, score=score, mask_mode=mode)
