"""The exact mask compiler: evaluate a mask_mod in bounded chunks and classify every tile.

Works for any mask_mod (traceable or not). Peak extra memory is bounded by
``ELEMENT_BUDGET`` index elements per chunk, whatever the sequence length.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Tuple, Union

import torch

from .block_mask import BlockMask, BlockSize, normalize_block_size
from .closure import captured_tensors
from .evaluate import call_mask_mod, mod_name

# Elements of the [B, H, Q, KV] grid evaluated at once. A mask_mod builds a handful of int64
# temporaries of this size, so 4M elements keeps a chunk well under ~256 MB.
ELEMENT_BUDGET = 1 << 22


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_length(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return value


def _check_count(value, what: str) -> int:
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive int or None (broadcast), got {value!r}")
    return value


def resolve_device(mask_mod: Callable, device) -> torch.device:
    """``device`` if given, else the device of the first tensor the mask_mod captured, else CPU."""
    if device is not None:
        return torch.device(device)
    for tensor in captured_tensors(mask_mod):
        return tensor.device
    return torch.device("cpu")


def _check_mask_mod(mask_mod) -> None:
    if not callable(mask_mod):
        raise TypeError(f"mask_mod must be a callable (b, h, q_idx, kv_idx) -> bool tensor, got {type(mask_mod).__name__}")


def iter_mask_chunks(mask_mod: Callable, B: int, H: int, Q_LEN: int, KV_LEN: int, device: torch.device,
                     row_multiple: int = 1, col_multiple: int = 1,
                     budget: Optional[int] = None) -> Iterator[Tuple[slice, slice, slice, slice, torch.Tensor]]:
    """Yield ``(b_slice, h_slice, q_slice, kv_slice, mask_chunk)`` covering ``[B, H, Q_LEN, KV_LEN]``.

    Chunk boundaries in q/kv fall on multiples of ``row_multiple``/``col_multiple`` so that
    every tile lies inside one chunk.
    """
    budget = ELEMENT_BUDGET if budget is None else budget  # read at call time: tests lower it
    kv_chunk = min(_cdiv(KV_LEN, col_multiple) * col_multiple, max(col_multiple, budget // row_multiple // col_multiple * col_multiple))
    q_chunk = max(row_multiple, min(_cdiv(Q_LEN, row_multiple) * row_multiple,
                                    budget // kv_chunk // row_multiple * row_multiple))
    per_bh = q_chunk * kv_chunk
    h_chunk = max(1, min(H, budget // per_bh))
    b_chunk = max(1, min(B, budget // (per_bh * h_chunk)))
    for b0 in range(0, B, b_chunk):
        b1 = min(B, b0 + b_chunk)
        b = torch.arange(b0, b1, device=device).view(-1, 1, 1, 1)
        for h0 in range(0, H, h_chunk):
            h1 = min(H, h0 + h_chunk)
            h = torch.arange(h0, h1, device=device).view(1, -1, 1, 1)
            for q0 in range(0, Q_LEN, q_chunk):
                q1 = min(Q_LEN, q0 + q_chunk)
                q_idx = torch.arange(q0, q1, device=device).view(1, 1, -1, 1)
                for k0 in range(0, KV_LEN, kv_chunk):
                    k1 = min(KV_LEN, k0 + kv_chunk)
                    kv_idx = torch.arange(k0, k1, device=device).view(1, 1, 1, -1)
                    chunk = call_mask_mod(mask_mod, b, h, q_idx, kv_idx, (b1 - b0, h1 - h0, q1 - q0, k1 - k0))
                    yield slice(b0, b1), slice(h0, h1), slice(q0, q1), slice(k0, k1), chunk


def create_mask(mask_mod: Callable, B: Optional[int], H: Optional[int], Q_LEN: int, KV_LEN: int, *,
                device=None) -> torch.Tensor:
    """Dense bool ``[B, H, Q_LEN, KV_LEN]`` (B/H of 1 when None): ``mask_mod`` at every position."""
    _check_mask_mod(mask_mod)
    B, H = _check_count(B, "B"), _check_count(H, "H")
    Q_LEN, KV_LEN = _check_length(Q_LEN, "Q_LEN"), _check_length(KV_LEN, "KV_LEN")
    device = resolve_device(mask_mod, device)
    dense = torch.empty(B, H, Q_LEN, KV_LEN, dtype=torch.bool, device=device)
    for bs, hs, qs, ks, chunk in iter_mask_chunks(mask_mod, B, H, Q_LEN, KV_LEN, device):
        dense[bs, hs, qs, ks] = chunk
    return dense


def block_counts(mask_mod: Callable, B: int, H: int, Q_LEN: int, KV_LEN: int, block_size: Tuple[int, int],
                 device: torch.device, budget: Optional[int] = None) -> torch.Tensor:
    """int32 ``[B, H, NQ, NKV]``: how many positions of each tile the mask_mod allows."""
    q_bs, kv_bs = block_size
    nq, nkv = _cdiv(Q_LEN, q_bs), _cdiv(KV_LEN, kv_bs)
    counts = torch.zeros(B, H, nq, nkv, dtype=torch.int32, device=device)
    for bs, hs, qs, ks, chunk in iter_mask_chunks(mask_mod, B, H, Q_LEN, KV_LEN, device, q_bs, kv_bs, budget):
        rows, cols = chunk.shape[-2:]
        pad_rows, pad_cols = _cdiv(rows, q_bs) * q_bs - rows, _cdiv(cols, kv_bs) * kv_bs - cols
        if pad_rows or pad_cols:
            chunk = torch.nn.functional.pad(chunk, (0, pad_cols, 0, pad_rows), value=False)
        tiles = chunk.reshape(chunk.shape[0], chunk.shape[1], chunk.shape[2] // q_bs, q_bs, chunk.shape[3] // kv_bs, kv_bs)
        tile_counts = tiles.sum(dim=(3, 5), dtype=torch.int32)
        counts[bs, hs, qs.start // q_bs:qs.start // q_bs + tile_counts.shape[2],
               ks.start // kv_bs:ks.start // kv_bs + tile_counts.shape[3]] = tile_counts
    return counts


def in_bounds_counts(Q_LEN: int, KV_LEN: int, block_size: Tuple[int, int], device) -> torch.Tensor:
    """int32 ``[NQ, NKV]``: positions of each tile inside the sequence (smaller in ragged tails)."""
    q_bs, kv_bs = block_size
    rows = (Q_LEN - torch.arange(0, Q_LEN, q_bs, device=device)).clamp(max=q_bs)
    cols = (KV_LEN - torch.arange(0, KV_LEN, kv_bs, device=device)).clamp(max=kv_bs)
    return (rows[:, None] * cols[None, :]).to(torch.int32)


def create_block_mask_exact(mask_mod: Callable, B: Optional[int], H: Optional[int], Q_LEN: int, KV_LEN: int, *,
                            device=None, BLOCK_SIZE: BlockSize = 128) -> BlockMask:
    """Evaluate ``mask_mod`` everywhere (in chunks) and classify each tile empty / partial / full."""
    _check_mask_mod(mask_mod)
    B, H = _check_count(B, "B"), _check_count(H, "H")
    Q_LEN, KV_LEN = _check_length(Q_LEN, "Q_LEN"), _check_length(KV_LEN, "KV_LEN")
    block_size = normalize_block_size(BLOCK_SIZE)
    device = resolve_device(mask_mod, device)
    counts = block_counts(mask_mod, B, H, Q_LEN, KV_LEN, block_size, device)
    capacity = in_bounds_counts(Q_LEN, KV_LEN, block_size, device)
    full = counts == capacity
    partial = (counts > 0) & ~full
    return BlockMask.from_block_maps(partial, full, BLOCK_SIZE=block_size, seq_lengths=(Q_LEN, KV_LEN),
                                     mask_mod=mask_mod)


def create_block_mask(mask_mod: Callable, B: Optional[int], H: Optional[int], Q_LEN: int, KV_LEN: int, *,
                      device=None, BLOCK_SIZE: BlockSize = 128) -> BlockMask:
    """Build the ``BlockMask`` of ``mask_mod`` over ``[B, H, Q_LEN, KV_LEN]``.

    ``B``/``H`` None: the mask does not depend on them and broadcasts. ``BLOCK_SIZE``: an int or a
    ``(Q_BLOCK_SIZE, KV_BLOCK_SIZE)`` pair. ``device``: where the index tensors live (default: the
    device of the tensors the mask_mod captured, else CPU).
    """
    return create_block_mask_exact(mask_mod, B, H, Q_LEN, KV_LEN, device=device, BLOCK_SIZE=BLOCK_SIZE)
