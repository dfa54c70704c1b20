"""Calling a mask_mod / score_mod on index tensors, with errors that say what went wrong."""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def mod_name(mod: Callable) -> str:
    return getattr(mod, "__name__", type(mod).__name__)


def call_mask_mod(mask_mod: Callable, b, h, q_idx, kv_idx, shape: Sequence[int]) -> torch.Tensor:
    """``mask_mod(b, h, q_idx, kv_idx)`` broadcast to ``shape``; checked to be a bool tensor."""
    try:
        result = mask_mod(b, h, q_idx, kv_idx)
    except Exception as error:  # re-raised with the mod's name and the arguments it got
        raise ValueError(
            f"mask_mod {mod_name(mask_mod)!r} raised {type(error).__name__}: {error} "
            f"(it is called with broadcastable int64 index tensors b {tuple(b.shape)}, h {tuple(h.shape)}, "
            f"q_idx {tuple(q_idx.shape)}, kv_idx {tuple(kv_idx.shape)})") from error
    if isinstance(result, bool):
        result = torch.tensor(result, device=q_idx.device)
    if not isinstance(result, torch.Tensor):
        raise TypeError(f"mask_mod {mod_name(mask_mod)!r} must return a bool tensor, got {type(result).__name__}")
    if result.dtype != torch.bool:
        raise TypeError(f"mask_mod {mod_name(mask_mod)!r} must return a bool tensor, got dtype {result.dtype}")
    try:
        return result.broadcast_to(shape)
    except RuntimeError as error:
        raise ValueError(f"mask_mod {mod_name(mask_mod)!r} returned shape {tuple(result.shape)}, which does not "
                         f"broadcast to the index shape {tuple(shape)}") from error


def call_score_mod(score_mod: Callable, score: torch.Tensor, b, h, q_idx, kv_idx) -> torch.Tensor:
    """``score_mod(score, b, h, q_idx, kv_idx)``; checked to keep ``score``'s shape, float result."""
    try:
        result = score_mod(score, b, h, q_idx, kv_idx)
    except Exception as error:
        raise ValueError(f"score_mod {mod_name(score_mod)!r} raised {type(error).__name__}: {error} "
                         f"(score {tuple(score.shape)}, index tensors b {tuple(b.shape)}, h {tuple(h.shape)}, "
                         f"q_idx {tuple(q_idx.shape)}, kv_idx {tuple(kv_idx.shape)})") from error
    if not isinstance(result, torch.Tensor) or not result.dtype.is_floating_point:
        got = f"dtype {result.dtype}" if isinstance(result, torch.Tensor) else type(result).__name__
        raise TypeError(f"score_mod {mod_name(score_mod)!r} must return a floating-point tensor, got {got}")
    if result.shape != score.shape:
        try:
            result = result.broadcast_to(score.shape)
        except RuntimeError as error:
            raise ValueError(f"score_mod {mod_name(score_mod)!r} returned shape {tuple(result.shape)}, "
                             f"expected the score's shape {tuple(score.shape)}") from error
    return result.to(score.dtype)
