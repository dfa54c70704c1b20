"""Closed-form block layouts for the mask families a model asks for on every step.

A model's mask is one of a few families: causal, sliding window (causal and ``q - kv < window``),
bidirectional, each optionally restricted by a 2-D padding mask and by packed documents, with the
queries and keys at an offset (a decode step is one query row at the end of a long cache). For
these the tile classification has a closed form, so ``window_block_mask`` builds the BlockMask
with a handful of tensor operations on the block bounds, without tracing the mask_mod or running
the general interval analysis of ``compiler.py``. The result equals the general compiler's.

For a tile of query rows ``[q_lo, q_hi]`` and keys ``[k_lo, k_hi]`` (absolute positions):

- the keys the pattern lets *some* row of the tile see form one range: from
  ``max(k_lo, q_lo - window + 1, doc_start(q_lo))`` to ``min(k_hi, q_hi)`` (causal), since the rows'
  ranges overlap or touch; the tile is non-empty when that range holds a real (unpadded) key,
  counted with a prefix sum over the padding mask;
- the tile is full when *every* row sees every key: ``k_hi <= q_lo`` (causal),
  ``q_hi - k_lo < window``, ``k_lo >= doc_start(q_hi)`` and ``k_hi <= doc_end(q_lo)`` (documents),
  and no key of the tile is padding.

Document ids must be non-decreasing along the sequence (packed documents are contiguous), which is
what makes each row's document one range.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch

from .block_mask import BlockMask, BlockSize, normalize_block_size
from .compact import dense_fields_from_maps

__all__ = ["window_block_mask", "window_block_maps"]

Offset = Union[int, torch.Tensor]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _prefix_counts(keep: torch.Tensor) -> torch.Tensor:
    """int64 ``[Bp, S + 1]``: ``out[:, j]`` real keys among positions ``< j`` of a bool ``[Bp, S]`` mask."""
    return torch.nn.functional.pad(torch.cumsum(keep.to(torch.int64), dim=1), (1, 0))


def _document_bounds(ids: torch.Tensor, positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """First and last position of the document holding each of ``positions`` ``[Bd, n]`` (ids ``[Bd, S]``,
    non-decreasing): ``searchsorted`` finds where each id's run begins and ends."""
    at = torch.gather(ids, 1, positions.clamp(0, ids.shape[1] - 1))
    start = torch.searchsorted(ids.contiguous(), at.contiguous(), right=False)
    end = torch.searchsorted(ids.contiguous(), at.contiguous(), right=True) - 1
    return start, end


def _mask_batch(batch: int, padding: Optional[torch.Tensor], document_ids: Optional[torch.Tensor]) -> int:
    """The layout's batch size ``Bm``: that of the padding / document ids (1 without them), checked."""
    mask_batch = max([1] + [t.shape[0] for t in (padding, document_ids) if t is not None])
    if mask_batch not in (1, batch):
        raise ValueError(f"padding / document_ids have batch size {mask_batch}; expected 1 or batch={batch}")
    return mask_batch


def _device_of(device, *tensors) -> torch.device:
    """``device``, else that of the first tensor among ``tensors`` (offsets may be ints), else CPU."""
    if device is None:
        device = next((t.device for t in tensors if isinstance(t, torch.Tensor)), torch.device("cpu"))
    return torch.device(device)


def window_block_maps(batch: int, q_length: int, kv_length: int, *, q_offset: Offset = 0, kv_offset: Offset = 0,
                      causal: bool = True, window: Optional[int] = None, padding: Optional[torch.Tensor] = None,
                      document_ids: Optional[torch.Tensor] = None, block_size: BlockSize = 128,
                      device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bool (partial, full) maps ``[Bm, 1, NQ, NKV]`` of the family (see the module docstring).

    Queries are absolute positions ``q_offset + [0, q_length)``, keys ``kv_offset + [0, kv_length)``;
    the offsets may be ints or 0-d integer tensors (a static cache's position, kept on the device).
    ``padding``: bool ``[B, >= kv_offset + kv_length]`` over absolute key positions (True = real token).
    ``document_ids``: ``[B or 1, >= positions used]`` non-decreasing document id of every absolute position.
    ``Bm`` is ``batch`` when padding or documents are given, else 1.
    """
    q_bs, kv_bs = normalize_block_size(block_size)
    nq, nkv = _cdiv(q_length, q_bs), _cdiv(kv_length, kv_bs)
    _mask_batch(batch, padding, document_ids)
    device = _device_of(device, padding, document_ids, q_offset, kv_offset)
    rows = torch.arange(nq, device=device)
    cols = torch.arange(nkv, device=device)
    q_lo = (rows * q_bs + q_offset).view(1, nq, 1)
    q_hi = ((rows * q_bs + q_bs).clamp(max=q_length) - 1 + q_offset).view(1, nq, 1)
    k_lo = (cols * kv_bs + kv_offset).view(1, 1, nkv)
    k_hi = ((cols * kv_bs + kv_bs).clamp(max=kv_length) - 1 + kv_offset).view(1, 1, nkv)

    # Keys some row of the tile may see: [lower, upper]; keys every row sees: the tile when `full`.
    lower, upper = k_lo, torch.minimum(k_hi, q_hi) if causal else k_hi
    full = torch.ones((1, 1, 1), dtype=torch.bool, device=device)
    if causal:
        full = full & (k_hi <= q_lo)
    if window is not None:
        lower = torch.maximum(lower, q_lo - window + 1)
        full = full & (q_hi - k_lo < window)
    if document_ids is not None:
        ids = document_ids.to(device)
        span = torch.cat([q_lo.view(-1), q_hi.view(-1)]).view(1, -1).expand(ids.shape[0], -1)
        start, end = _document_bounds(ids, span)
        start_lo, start_hi = start[:, :nq].view(-1, nq, 1), start[:, nq:].view(-1, nq, 1)
        end_lo, end_hi = end[:, :nq].view(-1, nq, 1), end[:, nq:].view(-1, nq, 1)
        lower = torch.maximum(lower, start_lo)
        upper = torch.minimum(upper, end_hi)
        full = full & (k_lo >= start_hi) & (k_hi <= end_lo)
    if padding is not None:
        counts = _prefix_counts(padding.to(device=device, dtype=torch.bool))           # [B, S + 1]
        batch_rows = torch.arange(counts.shape[0], device=device).view(-1, 1, 1)

        def real_keys(first, last):  # real keys in [first, last] per batch entry (0 when empty)
            first, last = torch.broadcast_tensors(first, last)
            first, last = first.expand(counts.shape[0], -1, -1), last.expand(counts.shape[0], -1, -1)
            hi = counts[batch_rows, (last + 1).clamp(min=0, max=counts.shape[1] - 1)]
            lo = counts[batch_rows, first.clamp(min=0, max=counts.shape[1] - 1)]
            return torch.where(last >= first, hi - lo, torch.zeros_like(hi))

        visible = real_keys(lower, upper) > 0
        full = full & (real_keys(k_lo, k_hi) == k_hi - k_lo + 1)
    else:
        visible = upper >= lower
    shape = (max(visible.shape[0], full.shape[0]), nq, nkv)
    visible, full = visible.expand(shape), full.expand(shape) & visible.expand(shape)
    partial = visible & ~full
    return partial.unsqueeze(1), full.unsqueeze(1)


def window_block_mask(mask_mod: Callable, batch: int, q_length: int, kv_length: int, *, q_offset: Offset = 0,
                      kv_offset: Offset = 0, causal: bool = True, window: Optional[int] = None,
                      padding: Optional[torch.Tensor] = None, document_ids: Optional[torch.Tensor] = None,
                      BLOCK_SIZE: BlockSize = 128, device=None) -> BlockMask:
    """The ``BlockMask`` of a model-mask family in closed form (see ``window_block_maps`` for the arguments).

    ``mask_mod`` is the element predicate of the same mask over *local* indices (``q_idx`` 0 is
    absolute position ``q_offset``); kernels evaluate it on partial tiles only. The caller vouches
    that it is the family described by the other arguments.
    """
    block_size = normalize_block_size(BLOCK_SIZE)

    def build_fields():
        partial, full = window_block_maps(batch, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset,
                                          causal=causal, window=window, padding=padding, document_ids=document_ids,
                                          block_size=block_size, device=device)
        return dense_fields_from_maps(partial, full, partial.shape[0], 1)

    device = _device_of(device, padding, document_ids, q_offset, kv_offset)
    if device.type == "cpu" and not torch.compiler.is_compiling():
        # Built when a kernel first reads the lists; a CPU decode step never does (BlockMask.deferred).
        # The batch sizes are checked now rather than on first read.
        block_mask = BlockMask.deferred(build_fields, batch_heads=(_mask_batch(batch, padding, document_ids), 1),
                                        BLOCK_SIZE=block_size, seq_lengths=(q_length, kv_length),
                                        mask_mod=mask_mod, device=device)
    else:
        block_mask = BlockMask(**build_fields(), BLOCK_SIZE=block_size, seq_lengths=(q_length, kv_length),
                               mask_mod=mask_mod)
        # Lists derived from block maps are consistent by construction (as in BlockMask.from_block_maps):
        # trusted, so an eager decode step does not re-check them with a device read. (A compiled region
        # skips the checks anyway, and the mark's tensor versions are not known there.)
        if not torch.compiler.is_compiling():
            block_mask.trusted()
    block_mask.exact_layout = True  # closed form: the classification is exact (module docstring)
    return block_mask
