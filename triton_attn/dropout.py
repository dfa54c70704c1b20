"""Attention dropout: what one call's dropout is, shared by every backend.

A call with ``dropout_p > 0`` draws one ``Dropout``: the probability and a seed. Every backend decides
whether the probability of (batch b, query head h, query row i, key j) is kept from that seed and the
element's position alone, never from the order in which tiles are visited, so a backward pass can
regenerate the forward's keep-mask instead of storing it (the Triton kernels always do; the torch backend's
dense route keeps it, one bit per probability, when that fits a budget), and ``torch.manual_seed`` makes a
call reproducible (the seed is drawn from the inputs' device generator).

Semantics (FlashAttention-2's and ``torch.nn.functional.dropout``'s): the normalized probabilities
``P = softmax(scores)`` are multiplied by ``keep / (1 - p)`` before ``P @ V``; the lse is that of the
softmax without dropout. A row with no visible key stays 0.

- Triton backends: Philox (``tl.rand(seed, counter)``), counter ``((b * Hq + h) * Lq + i) * Lkv + j``
  in 64 bits; kept when the uniform draw is ``>= p``.
- torch backend: its own stream (``backends/torch/dropout.py``: numpy's SFC64 per (seed, key chunk, row
  chunk)), also a function of (seed, position).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Dropout", "draw_dropout", "check_dropout_p"]

SEED_LIMIT = 1 << 62  # seeds drawn in [0, 2**62): non-negative int64, any bit pattern Philox takes


@dataclass(frozen=True, eq=False)
class Dropout:
    """One call's dropout. ``p``: the probability of dropping, ``0 < p < 1``. ``seed``: int64 ``[1]`` on the
    inputs' device (a tensor, so the kernels read it from memory: a captured CUDA graph or a compiled
    graph draws a fresh one on every replay instead of baking a constant in)."""

    p: float
    seed: torch.Tensor

    @property
    def keep_scale(self) -> float:
        """The factor a kept probability is multiplied by: ``1 / (1 - p)``."""
        return 1.0 / (1.0 - self.p)


def check_dropout_p(dropout_p) -> float:
    """``dropout_p`` as a float in ``[0, 1)``, or a ValueError naming it."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {type(dropout_p).__name__}")
    value = float(dropout_p)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    return value


def draw_dropout(dropout_p: float, device: torch.device) -> "Dropout | None":
    """The ``Dropout`` of a call with probability ``dropout_p`` on ``device`` (None for 0): a fresh seed from
    that device's default generator, so ``torch.manual_seed`` fixes it."""
    p = check_dropout_p(dropout_p)
    if p == 0.0:
        return None
    seed = torch.randint(0, SEED_LIMIT, (1,), dtype=torch.int64, device=device)
    return Dropout(p, seed)
