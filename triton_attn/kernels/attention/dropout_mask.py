"""Attention dropout's keep-mask, materialized: the kernel and its launch.

The attention kernels never store their dropout mask: each regenerates it from the seed and the
element's position (``blocks.dropout_keep``). ``dropout_keep_mask`` writes the same decisions to a
dense bool tensor, for tests (the mask a reference applies) and for ``return_dropout_mask=True``
(debugging). It calls the very helper the attention kernels call, so it is their mask by construction.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import triton
import triton.language as tl

from ...dropout import Dropout
from ..jit.modules import launch
from .blocks import batch_head_program, dropout_keep
from .configs import cdiv
from .tiling import batch_head_axes, folds_batch_heads

MASK_BLOCK_M, MASK_BLOCK_N = 32, 128   # one program's tile of (query rows, keys)
MASK_WARPS = 4


@triton.jit(do_not_specialize=["q_len", "kv_len", "batch_heads"])
def dropout_mask_kernel(
    Keep, dropout_p, dropout_seed,
    q_len, kv_len, key_tiles, batch_heads,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FOLD_BATCH_HEADS: tl.constexpr,
):
    """``Keep[b, h, i, j] = dropout_keep(...)`` as uint8 (1: kept) for one ``[BLOCK_M, BLOCK_N]`` tile.

    Keep: uint8 [B, Hq, Lq, Lkv] contiguous, so an element's offset is its dropout counter
    ``((b * Hq + h) * Lq + i) * Lkv + j``. dropout_p: float; dropout_seed: int64 [1].
    Grid ``(query tiles * key_tiles, B * Hq)``, the (batch, head) pairs folded over axes 1 and 2 past one
    axis' limit (``tiling.batch_head_axes``; ``batch_heads`` = B * Hq)."""
    batch_head = batch_head_program(FOLD_BATCH_HEADS)
    if FOLD_BATCH_HEADS:
        if batch_head >= batch_heads:  # a spare program of the folded grid
            return
    tile = tl.program_id(0)
    rows = (tile // key_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    keys = (tile % key_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_base = batch_head.to(tl.int64) * q_len
    seed = tl.load(dropout_seed)
    keep = dropout_keep(seed, dropout_p, row_base, rows[:, None], keys[None, :], kv_len)
    offsets = (row_base + rows[:, None]) * kv_len + keys[None, :]
    tl.store(Keep + offsets, keep.to(tl.uint8), mask=(rows < q_len)[:, None] & (keys < kv_len)[None, :])


def mask_arguments(keep: torch.Tensor, dropout: Dropout) -> Dict[str, object]:
    """The runtime arguments of ``dropout_mask_kernel`` for ``keep`` uint8 [B, Hq, Lq, Lkv] (contiguous)."""
    batch, q_heads, q_len, kv_len = keep.shape
    return dict(Keep=keep, dropout_p=float(dropout.p), dropout_seed=dropout.seed, q_len=q_len, kv_len=kv_len,
                key_tiles=cdiv(kv_len, MASK_BLOCK_N), batch_heads=batch * q_heads)


def mask_constexprs(batch_heads: int) -> Dict[str, object]:
    """The constexprs of ``dropout_mask_kernel`` for ``batch_heads`` = B * Hq pairs."""
    return dict(BLOCK_M=MASK_BLOCK_M, BLOCK_N=MASK_BLOCK_N, FOLD_BATCH_HEADS=folds_batch_heads(batch_heads))


def mask_grid(batch: int, q_heads: int, q_len: int, kv_len: int) -> Tuple[int, int, int]:
    """(row tiles x key tiles, *batch_head_axes(B * Hq))."""
    return (cdiv(q_len, MASK_BLOCK_M) * cdiv(kv_len, MASK_BLOCK_N), *batch_head_axes(batch * q_heads))


def dropout_keep_mask(dropout: Dropout, batch: int, q_heads: int, q_len: int, kv_len: int, *,
                      device: torch.device, interpret: bool) -> torch.Tensor:
    """The keep-mask of ``dropout`` for a call of these sizes: bool [B, Hq, Lq, Lkv], True where the attention
    kernels keep the probability of (batch, query head, query row, key). ``device``: where the mask is
    made (the seed's device); ``interpret``: run the kernel under the Triton interpreter (CPU tensors)."""
    keep = torch.empty(batch, q_heads, q_len, kv_len, dtype=torch.uint8, device=device)
    if keep.numel() == 0:
        return keep.view(torch.bool)
    launch(dropout_mask_kernel, mask_grid(batch, q_heads, q_len, kv_len),
           {**mask_arguments(keep, dropout), **mask_constexprs(batch * q_heads)},
           interpret=interpret, device=device, num_warps=MASK_WARPS)
    return keep.view(torch.bool)
