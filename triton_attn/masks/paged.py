"""Paged attention's logical positions and the masks over them.

A paged KV cache stores keys and values in fixed-size pages, ``key_cache`` ``[num_pages, Hkv,
page_size, D]``; ``page_table[b, j]`` names the physical page that holds logical page ``j`` of
sequence ``b`` and ``kv_lens[b]`` its length. The ``Lq`` query rows of sequence ``b`` are its last
tokens: row ``i`` sits at logical position ``kv_lens[b] - Lq + i``.

Every backend computes attention over logical positions with the mask

    keep(b, h, i, kv) = kv < kv_lens[b]  and  mask_mod(b, h, kv_lens[b] - Lq + i, kv)

(``logical_mask_mod``), so a mask_mod written for contiguous attention (causal, sliding window,
documents) means the same thing here. The Triton kernels get a ``BlockMask`` of that mask over
``[B, H, Lq, max_pages * page_size]`` and read K/V through the page table; the ``torch`` backend
(``backends/torch/paged.py``) reads the pages a bounded chunk at a time and applies the same logical
mask and score_mod (with gradients: gathers them and runs the blockwise backend), so there is one
specification of attention, not two.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .block_mask import BlockMask, LaunchPlan
from .compiler import create_block_mask
from .library import causal_mask
from .tracing import Node, UntraceableModError, trace_mask_mod, trace_score_mod

# KV block size of the BlockMask a paged call builds (a multiple of every page size it meets is not
# needed: the kernels look pages up per key, so any block size works).
PAGED_KV_BLOCK_SIZE = 128


def _uses_arg(node: Node, name: str) -> bool:
    if node.op == "arg":
        return node.args[0] == name
    return any(isinstance(arg, Node) and _uses_arg(arg, name) for arg in node.args)


def depends_on_head(mod: Optional[Callable], kind: str = "mask") -> bool:
    """Whether ``mod`` reads its head index ``h`` (True when it cannot be traced: assume it does)."""
    if mod is None:
        return False
    try:
        traced = trace_mask_mod(mod) if kind == "mask" else trace_score_mod(mod)
    except UntraceableModError:
        return True
    return _uses_arg(traced.graph, "h")


def logical_mask_mod(mask_mod: Optional[Callable], kv_lens: torch.Tensor, q_len: int) -> Callable:
    """The mask over (b, h, query row, logical kv position) of a paged call (see the module docstring).

    mask_mod: sees logical positions; None means causal. kv_lens: int32 ``[B]``, captured as it is (no
    copy): a plan that refreshes it in place (``PagedDecodePlan.update``) moves the mask with it, which is
    what a CUDA graph replaying the launch reads.
    """
    user_mask = causal_mask if mask_mod is None else mask_mod

    def paged_mask(b, h, q_idx, kv_idx):
        length = kv_lens[b]
        # Past the end the result is False whatever the user's mask says; clamping the position it sees
        # keeps a mask that indexes a [B, S] tensor (documents, padding) inside that tensor.
        inside = torch.minimum(kv_idx, length - 1)
        return (kv_idx < length) & user_mask(b, h, q_idx + (length - q_len), inside)

    paged_mask.__name__ = f"paged_{getattr(user_mask, '__name__', 'mask')}"
    return paged_mask


def logical_score_mod(score_mod: Optional[Callable], kv_lens: torch.Tensor, q_len: int) -> Optional[Callable]:
    """``score_mod`` with the query row moved to its logical position (None stays None); ``kv_lens``
    captured as it is, like ``logical_mask_mod``."""
    if score_mod is None:
        return None

    def paged_score(score, b, h, q_idx, kv_idx):
        return score_mod(score, b, h, q_idx + (kv_lens[b] - q_len), kv_idx)

    paged_score.__name__ = f"paged_{getattr(score_mod, '__name__', 'score')}"
    return paged_score


def paged_block_mask(mask_mod: Optional[Callable], kv_lens: torch.Tensor, q_len: int, q_heads: int,
                     kv_capacity: int, kv_block_size: int = PAGED_KV_BLOCK_SIZE, *,
                     lengths: Optional[Sequence[int]] = None) -> BlockMask:
    """The BlockMask of ``logical_mask_mod`` over ``[B, H, q_len, kv_capacity]``.

    H is ``q_heads`` only when the mask reads ``h`` (else it broadcasts, which lets the decode kernel
    pack all query heads of a GQA group into one program). The query block covers every row up to 128.
    lengths: ``kv_lens`` as Python ints when the caller has read them (the closed form then counts its blocks).
    """
    if mask_mod is None and q_len <= kv_block_size:
        return causal_paged_block_mask(kv_lens, q_len, kv_capacity, kv_block_size, lengths=lengths)
    logical = logical_mask_mod(mask_mod, kv_lens, q_len)
    heads = q_heads if depends_on_head(mask_mod) else None
    q_block = 128 if q_len <= 128 else 64
    return create_block_mask(logical, int(kv_lens.shape[0]), heads, q_len, kv_capacity, device=kv_lens.device,
                             BLOCK_SIZE=(q_block, kv_block_size))


def causal_paged_block_mask(kv_lens: torch.Tensor, q_len: int, kv_capacity: int,
                            block_size: int = PAGED_KV_BLOCK_SIZE, *,
                            lengths: Optional[Sequence[int]] = None) -> BlockMask:
    """The BlockMask of the default (causal) paged mask in closed form: no mask compile, no device sync.

    kv_lens: int32 ``[B]``; the ``q_len <= block_size`` query rows of sequence b are its last tokens,
    in one query block. Key block j is full when the first query row (position ``kv_lens[b] - q_len``)
    sees all of it, partial when only later rows see part of it (at most two blocks), empty from
    ``kv_lens[b]`` on. The q-side fields describe the same single query-block row. lengths: ``kv_lens``
    as Python ints, when known, for the count of computed blocks (else the shapes' upper bound).
    """
    if q_len > block_size:
        raise ValueError(f"causal_paged_block_mask needs q_len <= block_size, got {q_len} > {block_size}")
    num_blocks = -(-kv_capacity // block_size)
    computed = (sum(-(-int(n) // block_size) for n in lengths) if lengths is not None
                else int(kv_lens.shape[0]) * num_blocks)
    lengths = kv_lens.long().view(-1, 1, 1)                                           # [B, 1, 1]
    blocks = torch.arange(num_blocks, device=kv_lens.device).view(1, 1, -1)           # [1, 1, NKV]
    full_count = (lengths - q_len + 1) // block_size                                  # blocks 0 .. f-1 are full
    used = (lengths + block_size - 1) // block_size
    partial_count = used - full_count
    full = blocks < full_count                                                        # [B, 1, NKV]
    partial = (blocks >= full_count) & (blocks < used)
    last = num_blocks - 1
    return BlockMask(
        kv_num_blocks=partial_count.to(torch.int32),
        kv_indices=(blocks + full_count).clamp(max=last).to(torch.int32).unsqueeze(2),
        full_kv_num_blocks=full_count.to(torch.int32),
        full_kv_indices=blocks.expand_as(full).to(torch.int32).unsqueeze(2),
        q_num_blocks=partial.to(torch.int32), q_indices=torch.zeros(*partial.shape, 1, dtype=torch.int32,
                                                                    device=kv_lens.device),
        full_q_num_blocks=full.to(torch.int32), full_q_indices=torch.zeros(*full.shape, 1, dtype=torch.int32,
                                                                           device=kv_lens.device),
        BLOCK_SIZE=(block_size, block_size), seq_lengths=(q_len, kv_capacity),
        mask_mod=logical_mask_mod(None, kv_lens, q_len),
        # Bounds from the shapes, so building the mask never reads the device: at most two partial blocks.
        launch_plan=LaunchPlan(min(2, num_blocks), num_blocks, 1, 1, exact=False, computed_blocks=computed)).trusted()
