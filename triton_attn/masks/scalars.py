"""Plain Python numbers from what users pass as sizes and scales.

The public API takes ``numbers.Integral`` for sizes (``B``, ``H``, ``Q_LEN``, ``KV_LEN``,
``BLOCK_SIZE``, window lengths ...) and ``numbers.Real`` for scales, so numpy scalars
(``np.int64(8)``, ``np.float32(0.5)``) work like ``int`` / ``float``. A 0-d CPU tensor works too
(its ``.item()`` costs nothing there); a 0-d CUDA tensor is refused by name, since reading it
would wait for the GPU. ``bool`` is never a number here: ``True`` as a length is a bug.
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = ["as_int", "as_float"]


def _unwrap_tensor(value, what: str):
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{what} must be a number, got a tensor of shape {tuple(value.shape)}")
        if value.device.type != "cpu":
            raise TypeError(f"{what} must be a Python/numpy number or a 0-d CPU tensor, got a tensor on "
                            f"{value.device} (reading it would wait for the device; pass float(...) or int(...))")
        if value.dtype == torch.bool:
            raise TypeError(f"{what} must be a number, got a bool tensor")
        return value.item()
    return value


def as_int(value, what: str, *, minimum: int = 1, expected: str = "") -> int:
    """``value`` as an ``int`` >= ``minimum`` (0 or 1); ``what`` names the argument in errors and
    ``expected`` (default "a positive int" / "a non-negative int") says what it must be."""
    expected = expected or ("a positive int" if minimum >= 1 else "a non-negative int")
    number = _unwrap_tensor(value, what)
    if isinstance(number, bool) or not isinstance(number, numbers.Integral) or number < minimum:
        raise ValueError(f"{what} must be {expected}, got {value!r}")
    return int(number)


def as_float(value, what: str, *, expected: str = "a finite float") -> float:
    """``value`` as a finite ``float``; ``what`` names the argument in errors."""
    number = _unwrap_tensor(value, what)
    if isinstance(number, bool) or not isinstance(number, numbers.Real) or not math.isfinite(float(number)):
        raise TypeError(f"{what} must be {expected}, got {value!r}")
    return float(number)
