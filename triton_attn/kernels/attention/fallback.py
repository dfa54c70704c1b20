"""The exact fallback for mask_mods that cannot be traced (or compiled to Triton).

Such a mask_mod is evaluated eagerly, in PyTorch, on the elements of the BlockMask's *partial*
blocks only (full blocks need no predicate, empty ones are skipped), and the kernel reads the
resulting bits instead of an inlined predicate. Memory: one byte per element of each partial
block, e.g. 32 diagonal blocks of 128 x 128 for a causal-like mask at 4k tokens (512 KiB).

Layout handed to the kernel:

- ``bits``: uint8 ``[P, Q_BS, KV_BS]``, one slab per partial block, in the order
  ``(b, h, row, slot)`` of ``kv_indices``;
- ``offsets``: int32 ``[Bm, Hm, NQ]`` (same shape as ``kv_num_blocks``), the index in ``bits`` of
  the row's first partial block;
- ``block_ids``: int32 ``[Bm, Hm, NQ, NKV]``, the index in ``bits`` of block (row, column), -1 where
  the block is not partial. The kernels read bits through ``jit.predicates.bitmask_keep`` with the
  tuple of ``bitmask_captured``, the same way from every kernel (forward, dQ, transposed dK/dV).

The bits are cached per BlockMask object (weakly), so repeated calls do not re-evaluate.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Callable, Set, Tuple

import torch

from ...masks.block_mask import BlockMask
from ...masks.evaluate import call_mask_mod, mod_name

# Elements evaluated per eager call of the mask_mod (bounds the temporaries, ~256 MB of int64).
ELEMENT_BUDGET = 1 << 22

_WARNED: Set[Tuple[str, str]] = set()
_CACHE: "weakref.WeakKeyDictionary[BlockMask, Tuple[Callable, torch.Tensor, torch.Tensor]]" = (
    weakref.WeakKeyDictionary())
_IDS: "weakref.WeakKeyDictionary[BlockMask, Tuple[torch.Tensor, torch.Tensor]]" = weakref.WeakKeyDictionary()


class UntraceableMaskWarning(UserWarning):
    """A mask_mod could not be inlined into the kernel; the exact bitmask fallback is used."""


def warn_fallback(mask_mod: Callable, operation: str) -> None:
    """Warn once per (mask_mod name, operation) that the bitmask fallback is in use."""
    key = (mod_name(mask_mod), operation)
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(
        f"mask_mod {key[0]!r} cannot be inlined into the Triton kernel ({operation}); using the exact "
        "but slower per-block bitmask fallback. Use tensor operators (&, |, ~, torch.where, indexing "
        "captured tensors) to get the fused path.", UntraceableMaskWarning, stacklevel=6)  # the caller of attention()


def partial_block_bits(block_mask: BlockMask) -> Tuple[torch.Tensor, torch.Tensor]:
    """(bits uint8 ``[P, Q_BS, KV_BS]``, offsets int32 ``[Bm, Hm, NQ]``) for ``block_mask``'s partial blocks."""
    cached = _CACHE.get(block_mask)
    if cached is not None and cached[0] is block_mask.mask_mod:
        return cached[1], cached[2]
    bits, offsets = _compute_bits(block_mask)
    _CACHE[block_mask] = (block_mask.mask_mod, bits, offsets)
    return bits, offsets


def partial_block_ids(block_mask: BlockMask, offsets: torch.Tensor) -> torch.Tensor:
    """int32 ``[Bm, Hm, NQ, NKV]``: the index in ``bits`` of each partial block, -1 elsewhere.

    ``offsets`` [Bm, Hm, NQ]: the index in ``bits`` of each row's first partial block.
    """
    counts, indices = block_mask.kv_num_blocks.long(), block_mask.kv_indices.long()
    num_kv_blocks = block_mask.num_blocks[1]
    slots = torch.arange(indices.shape[-1], device=indices.device)
    valid = slots < counts.unsqueeze(-1)                                            # [Bm, Hm, NQ, S]
    ids = torch.full((*counts.shape, num_kv_blocks + 1), -1, dtype=torch.long, device=indices.device)
    # Slots past the row's count go to the spare last column, which is dropped.
    ids.scatter_(-1, torch.where(valid, indices, num_kv_blocks),
                 torch.where(valid, offsets.long().unsqueeze(-1) + slots, -1))
    return ids[..., :num_kv_blocks].to(torch.int32).contiguous()


def bitmask_captured(block_mask: BlockMask, device: torch.device) -> tuple:
    """The captured tuple of ``jit.predicates.bitmask_keep`` for ``block_mask`` (bits evaluated once)."""
    bits, offsets = partial_block_bits(block_mask)
    cached = _IDS.get(block_mask)
    if cached is None or cached[0] is not bits:
        cached = (bits, partial_block_ids(block_mask, offsets))
        _IDS[block_mask] = cached
    ids = cached[1]
    # int8 view of the 0/1 bits: Triton 3.4's compiler rejects a uint8 pointer inside a tuple argument.
    bits, ids = bits.view(torch.int8).to(device), ids.to(device)
    q_bs, kv_bs = block_mask.BLOCK_SIZE
    strides = [0 if ids.shape[d] == 1 else ids.stride(d) for d in range(3)]
    return (bits, ids, *strides, ids.shape[2], ids.shape[3], q_bs, kv_bs)


def example_bitmask_captured(num_q_blocks: int, num_kv_blocks: int, block_size: Tuple[int, int],
                             device: torch.device) -> tuple:
    """A tuple shaped like ``bitmask_captured``'s for a broadcast mask (ahead-of-time builds, ``meta`` tensors)."""
    q_bs, kv_bs = block_size
    bits = torch.empty(num_q_blocks, q_bs, kv_bs, dtype=torch.int8, device=device)
    ids = torch.empty(1, 1, num_q_blocks, num_kv_blocks, dtype=torch.int32, device=device)
    return (bits, ids, 0, 0, ids.stride(2), num_q_blocks, num_kv_blocks, q_bs, kv_bs)


def _compute_bits(block_mask: BlockMask) -> Tuple[torch.Tensor, torch.Tensor]:
    device = block_mask.device
    q_bs, kv_bs = block_mask.BLOCK_SIZE
    q_len, kv_len = block_mask.seq_lengths
    counts = block_mask.kv_num_blocks.to(torch.int64)                       # [Bm, Hm, NQ]
    starts = torch.cumsum(counts.flatten(), 0) - counts.flatten()
    offsets = starts.view(counts.shape).to(torch.int32).contiguous()
    total = int(counts.sum())
    bits = torch.zeros(max(total, 1), q_bs, kv_bs, dtype=torch.uint8, device=device)
    if total == 0:
        return bits, offsets
    # Every (b, h, row, slot) with slot < kv_num_blocks, in row-major order = the order of ``starts``.
    slots = torch.arange(block_mask.kv_indices.shape[-1], device=device)
    b, h, row, slot = torch.nonzero(slots < counts.unsqueeze(-1), as_tuple=True)
    column = block_mask.kv_indices[b, h, row, slot].to(torch.int64)
    q_offsets = torch.arange(q_bs, device=device)
    kv_offsets = torch.arange(kv_bs, device=device)
    per_chunk = max(1, ELEMENT_BUDGET // (q_bs * kv_bs))
    for first in range(0, total, per_chunk):
        last = min(total, first + per_chunk)
        # Positions past the sequence end are clamped to a valid index (so captured-tensor
        # lookups stay in range); the kernel bound-checks those positions anyway.
        q_idx = (row[first:last, None] * q_bs + q_offsets).clamp(max=q_len - 1)[:, :, None]
        kv_idx = (column[first:last, None] * kv_bs + kv_offsets).clamp(max=kv_len - 1)[:, None, :]
        chunk = call_mask_mod(block_mask.mask_mod, b[first:last, None, None], h[first:last, None, None],
                              q_idx, kv_idx, (last - first, q_bs, kv_bs))
        bits[first:last] = chunk.to(torch.uint8)
    return bits, offsets
