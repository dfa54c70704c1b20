"""Calling a mask_mod / score_mod on index tensors, with errors that say what went wrong.

A mod is first called once with broadcastable index tensors (``b`` ``[B, 1, 1, 1]``, ``q_idx``
``[1, 1, Q, 1]``, ...), which is fast and right for every elementwise mod. FlexAttention calls mods
per element instead (under ``torch.vmap``, each index a 0-d tensor), and mods written for that
(``bias[b][q_idx]``, ``(q_idx == special).any()``, ``torch.dot(u[q_idx], u[kv_idx])``) either fail
on broadcast tensors or return a value of the wrong rank. Those are called per element, as Flex
does, so every mod that runs under FlexAttention runs here with the same result.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch


def mod_name(mod: Callable) -> str:
    return getattr(mod, "__name__", type(mod).__name__)


def per_element(mod: Callable, args: List[torch.Tensor]) -> torch.Tensor:
    """``mod`` applied to each element of the broadcast of ``args``, as FlexAttention calls it.

    One ``torch.vmap`` level per dimension, batched only over the arguments that vary along it,
    so ``q_idx`` ``[1, 1, Q, 1]`` and ``kv_idx`` ``[1, 1, 1, K]`` still do ``Q * K`` work, not more.
    Returns a tensor of the broadcast shape (followed by any trailing dims of the mod's result).
    """
    ndim = max(a.dim() for a in args)
    device = args[0].device
    args = [a.reshape((1,) * (ndim - a.dim()) + tuple(a.shape)) for a in args]

    def call(level: int, *values):
        if level == ndim:
            result = mod(*values)
            return result if isinstance(result, torch.Tensor) else torch.tensor(result, device=device)
        batched = tuple(0 if v.shape[0] != 1 else None for v in values)
        values = [v if d == 0 else v[0] for v, d in zip(values, batched)]
        if all(d is None for d in batched):
            return call(level + 1, *values).unsqueeze(0)
        return torch.vmap(lambda *inner: call(level + 1, *inner), in_dims=batched)(*values)

    return call(0, *args)


def _fits(result, shape: Sequence[int], dtype_ok) -> bool:
    """A broadcast call's result is usable: a tensor of the right dtype and rank that broadcasts."""
    if not isinstance(result, torch.Tensor) or not dtype_ok(result.dtype) or result.dim() != len(shape):
        return False
    return all(r in (1, s) for r, s in zip(result.shape, shape))


def _per_element_result(mod: Callable, args: List[torch.Tensor], shape: Sequence[int],
                        dtype_ok) -> Optional[torch.Tensor]:
    """The per-element result squeezed to ``shape``'s rank, or None when that call fails too."""
    try:
        result = per_element(mod, args)
    except Exception:  # the mod runs neither way: the caller reports the broadcast call's error
        return None
    while result.dim() > len(shape) and result.shape[-1] == 1:
        result = result.squeeze(-1)
    return result if _fits(result, shape, dtype_ok) else None


def _is_bool(dtype: torch.dtype) -> bool:
    return dtype == torch.bool


def call_mask_mod(mask_mod: Callable, b, h, q_idx, kv_idx, shape: Sequence[int]) -> torch.Tensor:
    """``mask_mod(b, h, q_idx, kv_idx)`` broadcast to ``shape``; checked to be a bool tensor.

    Called on the broadcast index tensors, or per element when that fails or returns a result of the
    wrong rank (see the module docstring)."""
    try:
        result = mask_mod(b, h, q_idx, kv_idx)
        failure = None
    except Exception as error:
        result, failure = None, error
    if failure is not None or not _fits(result, shape, _is_bool):
        retried = _per_element_result(mask_mod, [b, h, q_idx, kv_idx], shape, _is_bool)
        if retried is not None:
            return retried.broadcast_to(shape)
    if failure is not None:
        error = failure  # re-raised with the mod's name and the arguments it got
        raise ValueError(
            f"mask_mod {mod_name(mask_mod)!r} raised {type(error).__name__}: {error} "
            f"(it is called with broadcastable int64 index tensors b {tuple(b.shape)}, h {tuple(h.shape)}, "
            f"q_idx {tuple(q_idx.shape)}, kv_idx {tuple(kv_idx.shape)})") from failure
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
    """``score_mod(score, b, h, q_idx, kv_idx)``; checked to keep ``score``'s shape, float result.

    Called on the broadcast tensors, or per element when that fails or returns the wrong rank."""
    def is_float(dtype):
        return dtype.is_floating_point

    try:
        result = score_mod(score, b, h, q_idx, kv_idx)
        failure = None
    except Exception as error:
        result, failure = None, error
    if failure is not None or not _fits(result, score.shape, is_float):
        retried = _per_element_result(score_mod, [score, b, h, q_idx, kv_idx], score.shape, is_float)
        if retried is not None:
            return retried.broadcast_to(score.shape).to(score.dtype)
    if failure is not None:
        error = failure
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
