"""The torch backend's dropout stream: whether probability (b, h, i, j) of a call is kept, from the seed alone.

A call's ``Dropout`` (``triton_attn/dropout.py``) has a probability ``p`` and a seed. On the torch backend the
decision for batch entry ``b``, query head ``h``, query row ``i`` and key ``j`` of a call with ``B`` batch
entries and ``Hq`` query heads is drawn as follows.

- The query rows are cut into chunks of ``CHUNK_ROWS`` rows and the keys into chunks of ``CHUNK_COLS``;
  chunk ``(qc, kc) = (i // CHUNK_ROWS, j // CHUNK_COLS)`` holds every (b, h) of those rows and keys.
- A chunk is one draw of ``B * Hq * CHUNK_ROWS * CHUNK_COLS / 4`` 64-bit words from numpy's SFC64 seeded
  with ``SeedSequence(seed, spawn_key=(kc, qc))`` (numpy's way to derive independent streams from one seed),
  read as int16 ``[B, Hq, CHUNK_ROWS, CHUNK_COLS]`` (each word's four 16-bit fields low first: the machine's
  little-endian byte order, as on x86 and ARM).
- A field ``v`` (signed) stands for the uniform integer ``u = v + 32768`` in ``[0, 65536)``; the probability
  is kept when ``u >= round(p * 65536)``, i.e. when ``v >= DropoutStream.threshold``. So the drop
  probability is ``p`` to 16 bits (within ``2**-17``); kept probabilities are scaled by ``1 / (1 - p)``.

The decision depends on (seed, b, h, i, j) and the call's (B, Hq) only: not on the tiles, their order, the
BlockMask's block sizes or how a route chunks the rows, so the blockwise loop, its recomputed backward, the
dense route and ``keep_mask`` (the whole ``[B, Hq, Lq, Lkv]`` mask, for ``return_dropout_mask``) agree.
Rows and keys past the call's lengths are drawn and never used, so a decision does not depend on Lq / Lkv.

Why a seeded numpy generator per chunk rather than a ``torch.Generator``: torch's CPU generator (mt19937)
keeps only 32 bits of a seed, so two chunks of one call could share a pattern, and it cannot skip ahead; a
chunk seeded from (seed, position) is drawn on its own from the whole 62-bit seed. It is also cheap: the 25M
16-bit fields of B=8, Hq=12, L=512 took 15 ms from SFC64 (seeding included), 27 ms from numpy's Philox4x64
(counter-based, the first version of this stream), 30 ms from ``torch.Tensor.random_`` (int32, two fields a
draw) and 110 ms from ``torch.rand`` (float32), on one core of the 2-core x86 machine the benchmarks ran on.
The comparison with the threshold runs in numpy (~10x faster than torch's on int16). The Triton kernels'
stream (Philox4x32 per element, ``tl.rand``) is a different one: the same seed gives other masks on the two
backend families.

A route may store a call's mask from its forward for its backward instead of drawing it twice
(``DropoutStream.packed``: one bit a probability, at most ``KEEP_BUDGET_BYTES``; the dense route does, the
blockwise loop draws again per query block).

Chunks are drawn on the CPU; on CUDA tensors (the torch backend's fallback there) they are copied to the
device, and reading the seed waits for the device once per call.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ...dropout import Dropout

__all__ = ["CHUNK_ROWS", "CHUNK_COLS", "KEEP_BUDGET_BYTES", "DropoutStream", "keep_mask", "unpack"]

CHUNK_ROWS = 16  # query rows per chunk: the smallest query block a BlockMask has in practice
CHUNK_COLS = 64  # keys per chunk: no waste for 64- and 128-key tiles
RANGE = 1 << 16  # the 16-bit draws
# The most bytes a packed keep mask (``DropoutStream.packed``, one bit a probability) stored from a forward for its
# backward may take: B=8, Hq=16, L=2048 fits; beyond it the backward draws the mask again.
KEEP_BUDGET_BYTES = 64 << 20


class DropoutStream:
    """The keep decisions of one call's ``Dropout`` for ``batch`` x ``q_heads`` (module docstring).

    ``kept(q_start, rows, kv_idx, dtype)`` / ``kept_span(...)``: ``[B, Hq, rows, L]`` of ``dtype``, 1 where the
    probability is kept and 0 where it is dropped, so applying it is one in-place float multiply (several times
    cheaper than ``masked_fill`` or a multiply by a bool tensor, which PyTorch converts first); ``torch.bool``
    gives the mask itself. ``packed(Lq, Lkv)``: the whole mask, one bit a probability, for a route to store from
    its forward (``unpack`` reads it back). Holds the seed as a Python int (read once) and nothing drawn."""

    def __init__(self, dropout: Dropout, batch: int, q_heads: int):
        self.p = dropout.p
        self.keep_scale = dropout.keep_scale
        self.seed = int(dropout.seed.reshape(-1)[0])
        self.batch, self.q_heads = batch, q_heads
        # Kept where u = v + 32768 >= round(p * 65536), v the signed int16 field.
        self.threshold = int(round(self.p * RANGE)) - RANGE // 2

    def _chunk(self, qc: int, kc: int) -> np.ndarray:
        """int16 [B, Hq, CHUNK_ROWS, CHUNK_COLS]: chunk (qc, kc)'s fields."""
        words = self.batch * self.q_heads * CHUNK_ROWS * CHUNK_COLS // 4
        generator = np.random.SFC64(np.random.SeedSequence(self.seed, spawn_key=(kc, qc)))
        raw = generator.random_raw(words)
        return raw.view(np.int16).reshape(self.batch, self.q_heads, CHUNK_ROWS, CHUNK_COLS)

    def _pieces(self, q_start: int, rows: int, columns: Sequence[Tuple[int, int, int]]):
        """(chunk's int16 fields [B, Hq, r, c], output rows slice, output columns slice) covering query rows
        [q_start, q_start + rows) against runs of keys (``_kept_columns``)."""
        for qc in range(q_start // CHUNK_ROWS, (q_start + rows - 1) // CHUNK_ROWS + 1):
            first_row = max(q_start, qc * CHUNK_ROWS)
            last_row = min(q_start + rows, (qc + 1) * CHUNK_ROWS)
            row_offset = first_row - qc * CHUNK_ROWS
            for first_key, count, column in columns:
                kc = first_key // CHUNK_COLS
                key_offset = first_key - kc * CHUNK_COLS
                values = self._chunk(qc, kc)[:, :, row_offset:row_offset + last_row - first_row,
                                             key_offset:key_offset + count]
                yield values, slice(first_row - q_start, last_row - q_start), slice(column, column + count)

    def _kept_columns(self, q_start: int, rows: int, columns: Sequence[Tuple[int, int, int]],
                      dtype: torch.dtype) -> torch.Tensor:
        """[B, Hq, rows, W] of ``dtype`` (CPU), 1 where kept: query rows [q_start, q_start + rows) against runs of
        keys side by side; ``columns``: (first key, keys, first output column) per run, each inside one key chunk.
        The comparison runs in numpy into a bool array (~10x faster than torch's int16 comparison), which reaches
        a float dtype through its uint8 view (~10x faster than torch's bool -> float conversion)."""
        width = max((column + count for _, count, column in columns), default=0)
        kept = np.empty((self.batch, self.q_heads, rows, width), dtype=np.bool_)
        for values, row_slice, column_slice in self._pieces(q_start, rows, columns):
            np.greater_equal(values, self.threshold, out=kept[:, :, row_slice, column_slice])
        kept_bool = torch.from_numpy(kept)
        return kept_bool if dtype == torch.bool else kept_bool.view(torch.uint8).to(dtype)

    def fits(self, q_len: int, kv_len: int) -> bool:
        """Whether the packed mask of Lq x Lkv (``packed``) takes at most ``KEEP_BUDGET_BYTES``."""
        return self.batch * self.q_heads * q_len * -(-kv_len // 8) <= KEEP_BUDGET_BYTES

    def packed(self, q_len: int, kv_len: int, chunk_keys: Optional[Sequence[int]] = None) -> np.ndarray:
        """uint8 [B, Hq, Lq, ceil(Lkv / 8)]: the whole keep mask, eight keys a byte (low bit first): what a route
        stores from its forward for its backward (``unpack`` reads it back), drawn once a training step instead
        of twice. ``chunk_keys``: per ``CHUNK_ROWS`` query rows, the keys [0, n) any of them can see (None: all);
        the bits of the others are 0, never drawn (a causal mask's upper half)."""
        columns = -(-kv_len // 8)
        packed = np.zeros((self.batch, self.q_heads, q_len, columns), dtype=np.uint8)
        for qc in range(-(-q_len // CHUNK_ROWS)):
            rows = slice(qc * CHUNK_ROWS, min(q_len, (qc + 1) * CHUNK_ROWS))
            keys = kv_len if chunk_keys is None else min(kv_len, chunk_keys[qc])
            for kc in range(-(-keys // CHUNK_COLS)):
                count = min(keys, (kc + 1) * CHUNK_COLS) - kc * CHUNK_COLS
                kept = self._chunk(qc, kc)[:, :, :rows.stop - rows.start, :count] >= self.threshold
                if count == CHUNK_COLS:  # whole bytes a row: packing the flat array is ~4x faster than by rows
                    bits = np.packbits(kept.reshape(-1), bitorder="little").reshape(*kept.shape[:-1], -1)
                else:
                    bits = np.packbits(kept, axis=-1, bitorder="little")
                packed[:, :, rows, kc * CHUNK_COLS // 8:kc * CHUNK_COLS // 8 + bits.shape[-1]] = bits
        return packed

    def kept_span(self, q_start: int, rows: int, kv_start: int, kv_stop: int, *, dtype: torch.dtype,
                  device: Optional[torch.device] = None) -> torch.Tensor:
        """[B, Hq, rows, kv_stop - kv_start] of ``dtype``: 1 where kept, for query rows [q_start, q_start + rows)
        and the keys [kv_start, kv_stop)."""
        columns = [(first, min(kv_stop, (first // CHUNK_COLS + 1) * CHUNK_COLS) - first, first - kv_start)
                   for first in [kv_start] + list(range((kv_start // CHUNK_COLS + 1) * CHUNK_COLS, kv_stop,
                                                        CHUNK_COLS))]
        kept = self._kept_columns(q_start, rows, columns if kv_stop > kv_start else [], dtype)
        return kept if device is None else kept.to(device, non_blocking=True)

    def kept(self, q_start: int, rows: int, kv_idx: torch.Tensor, *, dtype: torch.dtype) -> torch.Tensor:
        """[B, Hq, rows, L] of ``dtype``: 1 where kept, for query rows [q_start, q_start + rows) and the keys
        ``kv_idx`` (int ``[Bm, Hm, 1, L]``, ``Bm`` 1 or B, ``Hm`` 1 or Hq: the positions a blockwise tile holds)."""
        device = kv_idx.device
        length = kv_idx.shape[-1]
        if kv_idx.shape[0] == 1 and kv_idx.shape[1] == 1:
            first = int(kv_idx.reshape(-1)[0])
            consecutive = torch.arange(first, first + length, device=device)
            if bool(torch.equal(kv_idx.reshape(-1), consecutive)):  # one span: no gather
                return self.kept_span(q_start, rows, first, first + length, dtype=dtype, device=device).expand(
                    self.batch, self.q_heads, rows, length)
        positions = kv_idx.to("cpu", torch.long)
        chunk_of = positions // CHUNK_COLS
        col_chunks: List[int] = torch.unique(chunk_of).tolist()   # sorted
        columns = [(kc * CHUNK_COLS, CHUNK_COLS, slot * CHUNK_COLS) for slot, kc in enumerate(col_chunks)]
        region = self._kept_columns(q_start, rows, columns, dtype)
        slots = torch.searchsorted(torch.tensor(col_chunks), chunk_of) * CHUNK_COLS + positions % CHUNK_COLS
        picked = region.gather(3, slots.expand(self.batch, self.q_heads, rows, length))
        return picked.to(device, non_blocking=True)


def keep_mask(dropout: Optional[Dropout], batch: int, q_heads: int, q_len: int, kv_len: int, *,
              device: torch.device) -> torch.Tensor:
    """bool [B, Hq, Lq, Lkv]: True where the torch backend keeps the probability (all True for None), the
    mask ``attention(..., return_dropout_mask=True)`` returns."""
    if dropout is None or q_len == 0 or kv_len == 0 or batch == 0 or q_heads == 0:
        return torch.ones(batch, q_heads, q_len, kv_len, dtype=torch.bool, device=device)
    return DropoutStream(dropout, batch, q_heads).kept_span(0, q_len, 0, kv_len, dtype=torch.bool, device=device)


def unpack(packed: np.ndarray, batch: slice, q_start: int, rows: int, keys: int, *,
           out: torch.Tensor) -> torch.Tensor:
    """``out`` (float [b, Hq, rows, keys], any device) set to 1 where kept, 0 where dropped: query rows
    [q_start, q_start + rows) and keys [0, keys) of the batch entries ``batch`` of ``DropoutStream.packed``'s
    mask. Filling a buffer the caller reuses is cheaper than a fresh tensor a chunk (page faults)."""
    bits = np.unpackbits(packed[batch, :, q_start:q_start + rows], axis=-1, count=keys, bitorder="little")
    return out.copy_(torch.from_numpy(bits), non_blocking=True)
