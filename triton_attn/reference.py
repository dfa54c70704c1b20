"""Pure-PyTorch attention: the readable specification of what every backend computes.

``dense_attention`` is the eager definition over the whole score matrix. Run in float64 it is the
golden result the kernels are checked against; run in the input dtype it is the "plain PyTorch"
baseline of the numerics rule. The backends (``backends/``, ``kernels/``) compute the same thing
without ever holding the score matrix.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch

from .masks.evaluate import call_mask_mod, call_score_mod


def index_grids(batch: int, heads: int, device):
    """Batch and head index grids ``[B, 1, 1, 1]`` and ``[1, H, 1, 1]`` for evaluating mods."""
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, -1, 1, 1)
    return b, h


def dense_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                    mask: Optional[torch.Tensor] = None, mask_mod: Optional[Callable] = None,
                    score_mod: Optional[Callable] = None, scale: Optional[float] = None,
                    compute_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eager attention over the full score matrix.

    query: [B, Hq, Lq, D]; key: [B, Hkv, Lkv, D]; value: [B, Hkv, Lkv, Dv] (Hq a multiple of Hkv).
    mask: bool, broadcastable to [B, Hq, Lq, Lkv]; or mask_mod evaluated densely. True = attend.
    compute_dtype: dtype of every step (default: the input dtype; float64 for a golden result).
    Returns (out [B, Hq, Lq, Dv] in compute_dtype, lse [B, Hq, Lq] natural log, float32 -- float64 for
    float64 inputs); rows with no allowed key give 0 and -inf.
    """
    compute_dtype = compute_dtype or query.dtype
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = q_heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    q = query.to(compute_dtype)
    k = key.to(compute_dtype).repeat_interleave(groups, dim=1)
    v = value.to(compute_dtype).repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    b, h = index_grids(batch, q_heads, query.device)
    q_idx = torch.arange(q_len, device=query.device).view(1, 1, -1, 1)
    kv_idx = torch.arange(kv_len, device=query.device).view(1, 1, 1, -1)
    if score_mod is not None:
        scores = call_score_mod(score_mod, scores, b, h, q_idx, kv_idx)
    keep = torch.ones((), dtype=torch.bool, device=query.device)
    if mask is not None:
        keep = keep & mask
    if mask_mod is not None:
        keep = keep & call_mask_mod(mask_mod, b, h, q_idx, kv_idx, scores.shape)
    keep = keep.broadcast_to(scores.shape)
    scores = scores.masked_fill(~keep, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    weights = torch.exp(scores - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    attended = total > 0
    safe_total = torch.where(attended, total, torch.ones_like(total))
    out = (weights / safe_total) @ v
    lse = torch.where(attended, row_max + torch.log(safe_total), torch.full_like(total, float("-inf")))
    return out, lse.squeeze(-1).to(lse_dtype(query.dtype))


def lse_dtype(input_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the returned lse: float32, float64 for float64 inputs (as FlexAttention's)."""
    return torch.float64 if input_dtype == torch.float64 else torch.float32


def accumulation_dtype(input_dtype: torch.dtype) -> torch.dtype:
    """What the torch backend accumulates in: float64 for float64 inputs, else float32."""
    return torch.float64 if input_dtype == torch.float64 else torch.float32
