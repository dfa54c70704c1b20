"""``paged_attention()``: attention of new query rows over a paged KV cache."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..backends import run
from ..dispatch import plan_paged_call
from .checks import validate_mod_devices, validate_paged, validate_scale

__all__ = ["paged_attention"]


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    page_table: torch.Tensor, kv_lens: torch.Tensor, *, mask_mod: Optional[Callable] = None,
                    score_mod: Optional[Callable] = None, scale: Optional[float] = None,
                    return_lse: bool = False, backend: Optional[str] = None):
    """Attention of new query rows over a paged KV cache.

    query: [B, Hq, Lq, D]; key_cache: [num_pages, Hkv, page_size, D]; value_cache: [num_pages, Hkv,
    page_size, Dv]; page_table: int32 [B, max_pages] (logical page j of sequence b is physical page
    ``page_table[b, j]``); kv_lens: int32 [B], the length of each sequence including the query rows.
    Query row i of sequence b sits at logical position ``kv_lens[b] - Lq + i``; ``mask_mod(b, h, q_idx,
    kv_idx)`` and ``score_mod`` see logical positions, and mask_mod defaults to causal. Positions
    ``>= kv_lens[b]`` are never attended. GQA when Hq is a multiple of Hkv; page_size a multiple of 16.
    backend: "triton" (CUDA), "interpret" (the same kernel on CPU tensors), "torch" (gathers pages);
    None picks. Returns out [B, Hq, Lq, Dv] (and lse [B, Hq, Lq] float32 with return_lse=True).
    """
    validate_paged(query, key_cache, value_cache, page_table, kv_lens)
    scale = validate_scale(scale, query)
    route = plan_paged_call(query, key_cache, value_cache, backend=backend)
    validate_mod_devices(mask_mod, "mask_mod", query.device)
    validate_mod_devices(score_mod, "score_mod", query.device)
    out, lse = run.paged(route, query, key_cache, value_cache, page_table, kv_lens, mask_mod=mask_mod,
                         score_mod=score_mod, scale=scale)
    return (out, lse) if return_lse else out
