"""The public entry points: ``attention`` (``attention.py``), ``flex_attention`` (``flex.py``, FlexAttention's
conventions), ``paged_attention`` (``paged.py``); ``checks.py`` holds the argument checks they share.

Each validates its arguments, asks ``dispatch`` for the call's route once, and runs it. Importing this
package also gives the mask compiler its GPU tile refiner (below): ``masks/`` knows no Triton, so the
choice is made at the API level.
"""

from __future__ import annotations

from .. import settings
from ..dispatch import BACKENDS, ScoreModFallbackWarning, choose_backend
from ..masks import compiler
from ..versions import require_triton
from .attention import attention, explain
from .flex import flex_attention
from .paged import PagedDecodePlan, paged_attention, plan_paged, write_paged_kv

__all__ = ["attention", "explain", "flex_attention", "paged_attention", "plan_paged", "PagedDecodePlan",
           "write_paged_kv", "choose_backend", "BACKENDS",
           "ScoreModFallbackWarning"]


def cuda_tile_refiner(*args):
    """The mask compiler's refiner for CUDA tiles: the Triton kernel of ``kernels/refine.py``.

    Imported on first use, so ``import triton_attn`` does not import Triton; None (eager
    refinement) when Triton is not usable here or ``TRITON_ATTN_GPU_REFINE=0`` (read per call).
    """
    if not settings.gpu_refine():
        return None
    try:
        require_triton()
        from ..kernels import refine
    except ImportError:
        return None
    return refine.cuda_refiner(*args)


compiler.TILE_REFINERS.setdefault("cuda", cuda_tile_refiner)
