"""Host-side helpers every launcher shares (prefill forward and backward, decode, paged, the AOT builds).

- How the user's mods reach a kernel: ``plan_mask`` (generated predicate, bitmask fallback, or none)
  and ``trace_score`` / ``score_captured`` (the traced score_mod and its captured tuple).
- Named kernel arguments: ``strides`` and ``layout_arguments`` (a BlockMask's block lists).
- Launch decisions read from the inputs: ``needs_64bit_rows`` (row offsets past int32),
  ``needs_64bit_offsets`` / ``needs_64bit_layout`` (block-layout offsets past int32) and ``fast_tanh``
  (the hardware tanh in score functions).

This module imports no launcher and no kernel source: launchers and AOT builds import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from ..masks.block_mask import BlockMask
from ..masks.evaluate import mod_name
from ..masks.tracing import TracedMod, UntraceableModError, trace_mask_mod, trace_score_mod
from .attention import fallback
from .jit import functions

# Offsets at or past this need 64 bits.
INT32_LIMIT = 2 ** 31


def new_softmax_stats(query: torch.Tensor) -> torch.Tensor:
    """An empty float32 [B, Hq, Lq, 2] for the forward's softmax statistics (shift, 1 / sum per row), which
    the prefill forward fills when a Triton backward will recompute P from them."""
    return torch.empty(*query.shape[:3], 2, dtype=torch.float32, device=query.device)


@dataclass
class MaskPlan:
    """How the predicate reaches the kernels: the mask mode, the traced mask_mod (traced mode only),
    and a function that builds the predicate's captured tuple for a device."""

    mode: str
    traced: Optional[TracedMod]
    captured: Callable[[torch.device], tuple]


def plan_mask(block_mask: BlockMask) -> MaskPlan:
    """Inline the mask_mod when it traces and compiles; else the exact bitmask fallback (warns once)."""
    if not block_mask.launch_plan.has_partial_blocks:
        # No partial block anywhere: the predicate would never run. (The plan was computed when the
        # mask was built: reading it here does not sync with the device.)
        return MaskPlan(functions.MASK_NONE, None, lambda device: ())
    mask_mod = block_mask.mask_mod
    try:
        traced = trace_mask_mod(mask_mod)
        functions.check_graph(traced)
    except (UntraceableModError, functions.CodegenError) as error:
        fallback.warn_fallback(mask_mod, getattr(error, "operation", str(error)))
        return MaskPlan(functions.MASK_BITMASK, None, lambda device: fallback.bitmask_captured(block_mask, device))
    return traced_mask_plan(traced)


def traced_mask_plan(traced: TracedMod) -> MaskPlan:
    """The plan of a mask_mod already traced (and known to compile): its generated predicate."""
    return MaskPlan(functions.MASK_TRACED, traced, lambda device: functions.captured_tuple(traced.captured, device))


def scaled_scores(score, b, h, q_idx, kv_idx):
    """The identity score_mod: stands in for "no score_mod" when the scale is not positive."""
    return score


def trace_score(score_mod: Optional[Callable], scale: float = 1.0) -> Optional[TracedMod]:
    """The traced score_mod (None for none); a score_mod has no fallback, so failing raises.

    Without a score_mod the kernels take the row max of the raw ``Q K^T`` and scale afterwards,
    which needs ``scale > 0``; for ``scale <= 0`` they get the identity score_mod instead."""
    if score_mod is None:
        if scale > 0:
            return None
        score_mod = scaled_scores
    try:
        traced = trace_score_mod(score_mod)
        functions.check_graph(traced)
    except (UntraceableModError, functions.CodegenError) as error:
        raise TypeError(f"score_mod {mod_name(score_mod)!r} cannot be compiled into the Triton kernel: {error}. "
                        "Rewrite it with tensor operators and torch functions on its arguments, or use "
                        "backend='torch'.") from error
    return traced


def score_captured(score: Optional[TracedMod], device: torch.device) -> tuple:
    """The score function's captured tuple (empty without a score_mod)."""
    return functions.captured_tuple(score.captured, device) if score is not None else ()


def layout_arguments(num_blocks: torch.Tensor, indices: torch.Tensor, full_num_blocks: torch.Tensor,
                     full_indices: torch.Tensor, device: torch.device, names: Tuple[str, str, str, str], row: str
                     ) -> Dict[str, object]:
    """One block layout as named kernel arguments: int32 contiguous lists, strides 0 on broadcast dims.

    ``names``: the four list parameters; ``row``: the stride suffix of the walked dim ("m" or "n"). The index
    lists may be narrower than the block grid (the kernels read a row's first ``num`` entries by its stride),
    but the partial and the full ones must have one shape: the kernels read both with the partial ones' strides.
    """
    tensors = [t.to(device=device, dtype=torch.int32).contiguous()
               for t in (num_blocks, indices, full_num_blocks, full_indices)]
    counts, index = tensors[0], tensors[1]
    if counts.shape != tensors[2].shape or index.shape != tensors[3].shape:
        raise ValueError(f"block lists {names[0]} {tuple(counts.shape)} / {names[1]} {tuple(index.shape)} and "
                         f"{names[2]} {tuple(tensors[2].shape)} / {names[3]} {tuple(tensors[3].shape)} must have "
                         "the same shapes (the kernels read them with one set of strides)")
    arguments: Dict[str, object] = dict(zip(names, tensors))
    for prefix, tensor in (("layout", counts), ("index", index)):
        for dim, suffix in enumerate(("b", "h", row)):
            broadcast = dim < 2 and tensor.shape[dim] == 1
            arguments[f"stride_{prefix}_{suffix}"] = 0 if broadcast else tensor.stride(dim)
    return arguments


def strides(prefix: str, tensor: torch.Tensor, dims: str) -> Dict[str, int]:
    """``{stride_<prefix><dim>: stride}`` for a 4-D tensor, dims named by ``dims`` (e.g. "bhmd")."""
    return {f"stride_{prefix}{d}": tensor.stride(i) for i, d in enumerate(dims)}


def needs_64bit_rows(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether ``position * row stride`` can reach 2**31 in any of these [B, H, L, D] tensors: the
    largest offset inside one (batch, head) slice. Batch and head offsets are always 64-bit."""
    for tensor in tensors:
        if tensor is None or tensor.dim() != 4:
            continue
        reach = (tensor.shape[2] - 1) * abs(tensor.stride(2)) + (tensor.shape[3] - 1) * abs(tensor.stride(3))
        if reach >= INT32_LIMIT:
            return True
    return False


def needs_64bit_offsets(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether the largest element offset in any of these tensors, ``sum((size - 1) * |stride|)`` over its
    dims, reaches 2**31: then a kernel that computes it as one sum of index * stride products needs 64 bits.
    A block layout's index lists ``[Bm, Hm, NQ, NKV]`` get there with many (batch, head) pairs and blocks
    (2,048 sequences x 32 heads x 256 x 256 blocks of 128 at 32k tokens); an empty tensor never does."""
    for tensor in tensors:
        if tensor is None or tensor.numel() == 0:
            continue
        reach = sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride()))
        if reach >= INT32_LIMIT:
            return True
    return False


def needs_64bit_layout(layout: Dict[str, object]) -> bool:
    """``needs_64bit_offsets`` of the block counts and index lists a ``layout_arguments`` dict passes (the
    tensors as the kernel reads them): the launch's ``LAYOUT_OFFSETS_64``."""
    return needs_64bit_offsets(*(value for value in layout.values() if isinstance(value, torch.Tensor)))


def fast_tanh(dtype: torch.dtype, interpret: bool, target=None) -> bool:
    """Whether score functions use the hardware ``tanh.approx.f32`` (inline PTX): compiled for NVIDIA,
    16-bit inputs. ``target``: the ``kernels.targets.Target`` compiled for (None: this process's GPU vendor)."""
    nvidia = torch.version.hip is None if target is None else not target.is_amd
    return bool(not interpret and dtype in (torch.float16, torch.bfloat16) and nvidia)
