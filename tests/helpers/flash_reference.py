"""FlashAttention-2's semantics, computed directly in float64: the golden result of the flash_attn_* tests.

Written from FlashAttention-2's documented semantics (its interface docstrings and the reference its own
tests use), not from our kernels or masks: q ``[B, Lq, H, D]``, k/v ``[B, Lk, Hkv, D]`` (MQA/GQA: query
head h reads key head ``h // (H // Hkv)``); query i sits at key position ``i + Lk_b - Lq`` (bottom-right
aligned, ``Lk_b`` the batch's key length); causal keeps keys up to it; ``window=(left, right)`` keeps
``[diag - left, diag + right]`` (-1 unbounded); softcap before the mask and ALiBi; ALiBi
``- slope[b, h] * |diag - j|``; dropout multiplies the normalized probabilities by ``keep / (1 - p)``.
A row that sees no key gives output 0 and lse -inf.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch


def flash_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    window: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                    kv_lens: Optional[Sequence[int]] = None, key_start: Optional[Sequence[int]] = None,
                    keep: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                    compute_dtype: torch.dtype = torch.float64) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out ``[B, Lq, H, Dv]``, lse ``[B, H, Lq]``) in ``compute_dtype`` (float64: the golden result; the input
    dtype: the numerics rule's baseline), differentiable in q, k, v.

    kv_lens: per batch the number of keys that exist (keys ``>= kv_lens[b]`` are not there; default Lk);
    key_start: per batch the first key that exists (``cache_leftpad``). keep: bool ``[B, H, Lq, Lk]``, the
    dropout keep-mask (with ``dropout_p``)."""
    batch, q_len, heads, dim = q.shape
    k_len, kv_heads = k.shape[1], k.shape[2]
    scale = dim ** -0.5 if scale is None else scale
    qf, kf, vf = (t.to(compute_dtype) for t in (q, k, v))
    kf = kf.repeat_interleave(heads // kv_heads, dim=2)
    vf = vf.repeat_interleave(heads // kv_heads, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", qf, kf) * scale
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    lens = torch.tensor([k_len] * batch if kv_lens is None else [int(n) for n in kv_lens], dtype=torch.int64)
    starts = torch.tensor([0] * batch if key_start is None else [int(n) for n in key_start], dtype=torch.int64)
    i = torch.arange(q_len).view(1, 1, -1, 1)
    j = torch.arange(k_len).view(1, 1, 1, -1)
    diag = i + lens.view(-1, 1, 1, 1) - q_len
    visible = (j < lens.view(-1, 1, 1, 1)) & (j >= starts.view(-1, 1, 1, 1))
    left, right = window
    if causal:
        right = 0
    if left >= 0:
        visible = visible & (j >= diag - left)
    if right >= 0:
        visible = visible & (j <= diag + right)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(compute_dtype)
        slopes = slopes.view(1, heads).expand(batch, heads) if slopes.dim() == 1 else slopes
        scores = scores - slopes.view(batch, heads, 1, 1) * (diag - j).abs().to(compute_dtype)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    any_visible = visible.any(dim=-1, keepdim=True)
    probs = torch.where(any_visible, torch.softmax(scores.masked_fill(~any_visible, 0.0), dim=-1),
                        torch.zeros_like(scores))
    if keep is not None and dropout_p > 0:
        probs = probs * keep.to(compute_dtype) / (1.0 - dropout_p)
    out = torch.einsum("bhij,bjhd->bihd", probs, vf)
    return out, lse


def flash_varlen_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, *, keeps: Optional[List[torch.Tensor]] = None,
                           **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
    """Packed q ``[total_q, H, D]``, k/v ``[total_k, Hkv, D]``: every sequence on its own (``flash_reference``,
    ALiBi slopes ``[B, H]`` read at its row). Returns (out ``[total_q, H, Dv]``, lse ``[H, total_q]``), float64.
    keeps: per sequence its bool keep-mask ``[1, H, Lq_s, Lk_s]``."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    slopes = kwargs.pop("alibi_slopes", None)
    outs, lses = [], []
    for s in range(len(cq) - 1):
        qs, ks, vs = q[cq[s]:cq[s + 1]], k[ck[s]:ck[s + 1]], v[ck[s]:ck[s + 1]]
        seq_slopes = None
        if slopes is not None:
            seq_slopes = slopes if slopes.dim() == 1 else slopes[s]
        keep = None if keeps is None else keeps[s]
        out, lse = flash_reference(qs[None], ks[None], vs[None], alibi_slopes=seq_slopes, keep=keep, **kwargs)
        outs.append(out[0])
        lses.append(lse[0])
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1)
