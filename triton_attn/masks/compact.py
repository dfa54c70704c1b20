"""A compact BlockMask for long sequences: compressed rows (CSR), memory in O(non-empty tiles).

FlexAttention's fields are dense in the tile grid: ``kv_indices`` alone is ``[B, H, NQ, NKV]``
int32, 268 MB for one 1M-token mask with 128-blocks, and four such tensors make a BlockMask.
``CompactBlockMask`` stores, for partial and for full tiles, one CSR structure:

- ``ptr``: int64 ``[L * NQ + 1]``, row ``l * NQ + i`` of layout ``l`` spans ``cols[ptr[r]:ptr[r + 1]]``;
- ``cols``: int32 ``[nnz]``, the kv block indices of that query block row, ascending.

A *layout* is one distinct (b, h) pattern: the mask stores ``Bl x Hl`` layouts with ``Bl`` 1 or
``B`` and ``Hl`` 1 or ``H`` (1 where the mask_mod does not depend on b / h), and (b, h) reads layout
``(b if Bl > 1 else 0) * Hl + (h if Hl > 1 else 0)``.

It *is* a ``BlockMask``: every FlexAttention field (``kv_num_blocks``, ``kv_indices``, ...,
``full_q_indices``) is still there, materialized on first access (and cached; ``release_dense()``
drops them), as are ``shape``, ``sparsity()``, ``to_string()``, ``to()``, slicing, ``to_flex()``.
Consumers that care about memory use the CSR accessors instead: ``kv_csr()``, ``q_csr()`` (the
transposed layout for the backward pass, built on first use), ``row_layout(row)`` (one query block
row in the padded form the torch backend walks), and ``nbytes()``.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from .block_mask import (
    BlockMask,
    LaunchPlan,
    batch_head_maps,
    normalize_block_size,
    raise_problems,
    sliced_mask_mod,
    values_unknown,
)
from .pictures import picture_grid, render_block_pictures

__all__ = ["CompactBlockMask", "CSRBuilder", "ordered_from_dense_fast", "dense_fields_from_maps"]


def ordered_from_dense_fast(dense_blocks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Same result as ``block_mask.ordered_from_dense`` (set indices ascending, then the unset ones
    ascending), in O(n) per row with a cumulative sum and a scatter instead of a sort."""
    n = dense_blocks.shape[-1]
    counts = dense_blocks.to(torch.int32).cumsum(-1, dtype=torch.int32)
    if n == 0:
        return torch.zeros(dense_blocks.shape[:-1], dtype=torch.int32, device=dense_blocks.device), \
            torch.zeros(dense_blocks.shape, dtype=torch.int32, device=dense_blocks.device)
    num = counts[..., -1].contiguous()
    column = torch.arange(n, dtype=torch.int32, device=dense_blocks.device)
    position = torch.where(dense_blocks, counts - 1, num.unsqueeze(-1) + column - counts)
    indices = torch.empty(dense_blocks.shape, dtype=torch.int32, device=dense_blocks.device)
    indices.scatter_(-1, position.long(), column.expand(dense_blocks.shape))
    return num, indices


def dense_fields_from_maps(partial: torch.Tensor, full: torch.Tensor, batch: int,
                           heads: int) -> Dict[str, torch.Tensor]:
    """The eight FlexAttention fields from bool maps ``[Bl, Hl, NQ, NKV]``, expanded to ``[batch, heads]``."""
    fields = {}
    for prefix, blocks in (("", partial), ("full_", full)):
        for axis, view in (("kv", blocks), ("q", blocks.transpose(-1, -2).contiguous())):
            num, idx = ordered_from_dense_fast(view)
            fields[f"{prefix}{axis}_num_blocks"] = num.expand(batch, heads, *num.shape[2:]).contiguous()
            fields[f"{prefix}{axis}_indices"] = idx.expand(batch, heads, *idx.shape[2:]).contiguous()
    return fields


class CSRBuilder:
    """Collects block maps chunk by chunk, in row order, into (ptr, cols)."""

    def __init__(self, device):
        self.device = device
        self.counts: List[torch.Tensor] = []
        self.cols: List[torch.Tensor] = []

    def add(self, blocks: torch.Tensor) -> None:
        """``blocks``: bool ``[..., rows, NKV]``, the next rows of the CSR (flattened in order)."""
        nkv = blocks.shape[-1]
        rows = blocks.numel() // nkv if nkv else 0
        hits = torch.nonzero(blocks.reshape(-1)).squeeze(-1)   # flat positions, ascending
        row_of = torch.div(hits, nkv, rounding_mode="floor")
        self.counts.append(torch.bincount(row_of, minlength=rows))
        self.cols.append((hits - row_of * nkv).to(torch.int32))

    def add_rows(self, counts: torch.Tensor, cols: torch.Tensor) -> None:
        """Rows given directly: ``counts`` int64 ``[rows]`` and their ``cols`` int32, ascending per row."""
        self.counts.append(counts.to(torch.int64))
        self.cols.append(cols.to(torch.int32))

    def finish(self) -> Tuple[torch.Tensor, torch.Tensor]:
        counts = torch.cat(self.counts) if self.counts else torch.zeros(0, dtype=torch.int64, device=self.device)
        ptr = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=self.device)
        torch.cumsum(counts, 0, out=ptr[1:])
        cols = torch.cat(self.cols) if len(self.cols) != 1 else self.cols[0]
        self.counts, self.cols = [], []
        return ptr, cols if cols.numel() else torch.zeros(0, dtype=torch.int32, device=self.device)


def _csr_from_map(blocks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    builder = CSRBuilder(blocks.device)
    builder.add(blocks)
    return builder.finish()


def _map_from_csr(ptr: torch.Tensor, cols: torch.Tensor, rows: int, num_cols: int) -> torch.Tensor:
    """Bool ``[rows, num_cols]`` from a CSR."""
    out = torch.zeros(rows * num_cols, dtype=torch.bool, device=cols.device)
    if cols.numel():
        row_of = torch.repeat_interleave(torch.arange(rows, device=cols.device), ptr.diff())
        out[row_of * num_cols + cols.long()] = True
    return out.view(rows, num_cols)


# Entries a transposition sorts at once (bounds its memory to a few bytes per entry of one batch).
TRANSPOSE_BATCH = 1 << 22


def _transpose_csr(ptr: torch.Tensor, cols: torch.Tensor, layouts: int, nq: int, nkv: int):
    """CSR of the transposed layouts: rows are kv blocks, cols query blocks (int32).

    Per layout, in batches of kv block columns holding about ``TRANSPOSE_BATCH`` entries: pick the
    batch's entries and sort them stably by column, so query blocks stay ascending in each row.
    """
    device = cols.device
    new_ptr = torch.zeros(layouts * nkv + 1, dtype=torch.int64, device=device)
    if cols.numel() == 0:
        return new_ptr, cols
    out = torch.empty(cols.numel(), dtype=torch.int32, device=device)
    filled = 0
    batch = max(1, TRANSPOSE_BATCH)
    for layout in range(layouts):
        start, stop = int(ptr[layout * nq]), int(ptr[(layout + 1) * nq])
        seg = cols[start:stop]
        if seg.numel() == 0:
            continue
        per_col = torch.bincount(seg, minlength=nkv)
        new_ptr[layout * nkv + 1:(layout + 1) * nkv + 1] = per_col
        row_of = torch.repeat_interleave(torch.arange(nq, dtype=torch.int32, device=device),
                                         ptr[layout * nq:(layout + 1) * nq + 1].diff())
        # Column batches: boundaries where the running entry count crosses multiples of `batch`.
        ends = torch.cumsum(per_col, 0)
        total = int(ends[-1])
        bounds = torch.searchsorted(ends, torch.arange(batch, max(batch, total), batch, device=device), right=True)
        edges = [0] + sorted(set(int(x) for x in bounds.tolist() if 0 < int(x) < nkv)) + [nkv]
        for c0, c1 in zip(edges[:-1], edges[1:]):
            if len(edges) == 2:
                picked, picked_cols = None, seg
            else:
                picked = torch.nonzero((seg >= c0) & (seg < c1)).squeeze(-1)
                picked_cols = seg[picked]
            order = torch.sort(picked_cols, stable=True).indices
            rows = row_of[order] if picked is None else row_of[picked[order]]
            out[filled:filled + rows.numel()] = rows
            filled += rows.numel()
    torch.cumsum(new_ptr[1:], 0, out=new_ptr[1:])
    return new_ptr, out


class CompactBlockMask(BlockMask):
    """A ``BlockMask`` stored as compressed rows; see the module docstring."""

    _KINDS = ("partial", "full")

    def __init__(self, *, csr: Dict[str, Tuple[torch.Tensor, torch.Tensor]], layout_shape: Tuple[int, int],
                 batch_heads: Tuple[int, int], num_blocks: Tuple[int, int], BLOCK_SIZE, seq_lengths,
                 mask_mod: Optional[Callable]):
        # BlockMask.__init__ is not called: its fields are properties here.
        self._csr = dict(csr)                    # kind -> (ptr, cols), kv-major
        self._csr_t: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}   # kind -> q-major, lazily
        self._dense: Dict[str, torch.Tensor] = {}
        self.layout_shape = (int(layout_shape[0]), int(layout_shape[1]))
        self._batch_heads = (int(batch_heads[0]), int(batch_heads[1]))
        self._num_blocks = (int(num_blocks[0]), int(num_blocks[1]))
        self.BLOCK_SIZE = normalize_block_size(BLOCK_SIZE)
        self.seq_lengths = (int(seq_lengths[0]), int(seq_lengths[1]))
        from .library import full_mask
        self.mask_mod = mask_mod if mask_mod is not None else full_mask
        for kind in self._KINDS:
            ptr, _ = self._csr[kind]
            if ptr.numel() != self.num_layouts * self._num_blocks[0] + 1:
                raise ValueError(f"{kind} CSR has {ptr.numel() - 1} rows, expected "
                                 f"{self.num_layouts} layouts x {self._num_blocks[0]} query blocks")

        self._launch_plan = self.compute_launch_plan()

    def compute_launch_plan(self) -> LaunchPlan:
        """Row maxima from the CSR row pointers; the transposed maxima are bounded by the query block
        count (the transposed CSR is built only when a backward pass asks for it)."""
        nq, nkv = self._num_blocks
        ptrs = [self._csr[kind][0] for kind in self._KINDS]
        if any(values_unknown(ptr) for ptr in ptrs):
            return LaunchPlan.upper_bound(self._num_blocks)
        maxima = torch.stack([ptr.diff().max() if ptr.numel() > 1 else ptr.new_zeros(()) for ptr in ptrs]).tolist()
        return LaunchPlan(int(maxima[0]), int(maxima[1]), nq, nq, exact=False)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_block_maps(cls, partial: torch.Tensor, full: torch.Tensor, *, BLOCK_SIZE, seq_lengths,
                        mask_mod: Optional[Callable]) -> "CompactBlockMask":
        """From bool maps ``[B, H, NQ, NKV]`` (B/H of 1 = broadcast)."""
        if partial.shape != full.shape or partial.dim() != 4:
            raise ValueError(f"block maps must both be [B, H, NQ, NKV], got {tuple(partial.shape)} and "
                             f"{tuple(full.shape)}")
        if bool((partial & full).any()):
            raise ValueError("a block cannot be both partial and full")
        batch, heads, nq, nkv = partial.shape
        return cls(csr={"partial": _csr_from_map(partial), "full": _csr_from_map(full)},
                   layout_shape=(batch, heads), batch_heads=(batch, heads), num_blocks=(nq, nkv),
                   BLOCK_SIZE=BLOCK_SIZE, seq_lengths=seq_lengths, mask_mod=mask_mod).trusted()

    @classmethod
    def from_block_mask(cls, block_mask: BlockMask) -> "CompactBlockMask":
        """The compact form of any ``BlockMask`` (one layout per (b, h) it stores)."""
        if isinstance(block_mask, CompactBlockMask):
            return block_mask
        return cls.from_block_maps(block_mask.partial_blocks(), block_mask.full_blocks(),
                                   BLOCK_SIZE=block_mask.BLOCK_SIZE, seq_lengths=block_mask.seq_lengths,
                                   mask_mod=block_mask.mask_mod)

    def to_block_mask(self) -> BlockMask:
        """A plain ``BlockMask`` with the dense FlexAttention fields (``[B, H, NQ, NKV]`` each)."""
        return BlockMask(**{name: getattr(self, name) for name in self._TENSOR_FIELDS},
                         BLOCK_SIZE=self.BLOCK_SIZE, seq_lengths=self.seq_lengths, mask_mod=self.mask_mod)

    # -- validation -----------------------------------------------------------------------------
    def layout_signature(self) -> tuple:
        return tuple((id(t), t._version) for pair in self._csr.values() for t in pair)

    def _check_block_lists(self) -> None:
        """``BlockMask.validate`` for compressed rows: the grid covers ``seq_lengths``, each
        ``ptr`` runs from 0 to ``len(cols)`` without decreasing, every column is inside the grid and
        ascending within its row, and no tile is both partial and full. O(nnz), no dense field."""
        (q_len, kv_len), (q_bs, kv_bs) = self.seq_lengths, self.BLOCK_SIZE
        nq, nkv = -(-q_len // q_bs), -(-kv_len // kv_bs)
        if self._num_blocks != (nq, nkv):
            raise ValueError(f"block_mask has a {self._num_blocks[0]} x {self._num_blocks[1]} block grid but "
                             f"seq_lengths {self.seq_lengths} with BLOCK_SIZE {self.BLOCK_SIZE} needs {nq} x {nkv}; "
                             "rebuild it with create_block_mask")
        if getattr(self, "_trusted", None) == self.layout_signature() or self.device.type == "meta":
            return
        problems, keys = [], []
        for kind in self._KINDS:
            ptr, cols = self._csr[kind]
            counts = ptr.diff()
            row_of = torch.repeat_interleave(torch.arange(counts.numel(), device=ptr.device), counts.clamp(min=0))
            same_row = row_of[1:] == row_of[:-1] if row_of.numel() == cols.numel() else None
            problems += [
                ((ptr[0] != 0) | (ptr[-1] != cols.numel()) | (counts < 0).any(),
                 f"block_mask {kind} CSR ptr must start at 0, never decrease, and end at len(cols)={cols.numel()}"),
                (((cols < 0) | (cols >= nkv)).any() if cols.numel() else torch.tensor(False),
                 f"block_mask {kind} CSR lists a KV block outside [0, {nkv}) (it would read outside K/V)"),
            ]
            if same_row is not None and cols.numel() > 1:
                problems.append((((cols[1:] <= cols[:-1]) & same_row).any(),
                                 f"block_mask {kind} CSR columns must be ascending and distinct within a row"))
            if row_of.numel() == cols.numel():
                keys.append(row_of * nkv + cols.long())
        if len(keys) == 2 and keys[0].numel() and keys[1].numel():
            problems.append((torch.isin(keys[0], keys[1]).any(),
                             "block_mask lists a block as both partial and full"))
        raise_problems(problems)

    # -- CSR access -----------------------------------------------------------------------------
    @property
    def num_layouts(self) -> int:
        return self.layout_shape[0] * self.layout_shape[1]

    def layout_index(self, b: int, h: int) -> int:
        """Which stored layout (b, h) uses."""
        bl, hl = self.layout_shape
        return (b if bl > 1 else 0) * hl + (h if hl > 1 else 0)

    def kv_csr(self, full: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """(ptr int64 ``[L * NQ + 1]``, cols int32): kv blocks of each (layout, query block row)."""
        return self._csr["full" if full else "partial"]

    def q_csr(self, full: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """(ptr int64 ``[L * NKV + 1]``, rows int32): query blocks of each (layout, kv block column),
        the transposed layout for the backward pass; built on first use (O(nnz log nnz))."""
        kind = "full" if full else "partial"
        if kind not in self._csr_t:
            ptr, cols = self._csr[kind]
            self._csr_t[kind] = _transpose_csr(ptr, cols, self.num_layouts, *self._num_blocks)
        return self._csr_t[kind]

    def row_layout(self, row: int, device=None):
        """One query block row as ``((num, indices), (full_num, full_indices))`` with ``num``
        ``[Bl, Hl]`` and ``indices`` ``[Bl, Hl, n]`` (n = the row's longest; padding is 0), the
        form ``BlockMask.row_layout`` returns, broadcastable over ``[B, H]``."""
        bl, hl = self.layout_shape
        nq = self._num_blocks[0]
        out = []
        for kind in self._KINDS:
            ptr, cols = self._csr[kind]
            rows = torch.arange(self.num_layouts, device=ptr.device) * nq + row
            start, stop = ptr[rows], ptr[rows + 1]
            num = (stop - start)
            width = int(num.max()) if num.numel() else 0
            offsets = start.unsqueeze(-1) + torch.arange(width, device=ptr.device)
            valid = offsets < stop.unsqueeze(-1)
            picked = cols[offsets.clamp(max=max(cols.numel() - 1, 0))] if cols.numel() else \
                torch.zeros(offsets.shape, dtype=torch.int32, device=ptr.device)
            picked = torch.where(valid, picked, torch.zeros_like(picked))
            num, picked = num.to(torch.int32).view(bl, hl), picked.view(bl, hl, width)
            if device is not None:
                num, picked = num.to(device), picked.to(device)
            out.append((num, picked))
        return tuple(out)

    def nbytes(self, include_transposed: bool = False) -> int:
        """Bytes of the CSR storage (kv-major; with ``include_transposed`` also the q-major CSR,
        built if needed). Materialized dense fields are not counted."""
        tensors = [t for pair in self._csr.values() for t in pair]
        if include_transposed:
            tensors += [t for full in (False, True) for t in self.q_csr(full)]
        return sum(t.numel() * t.element_size() for t in tensors)

    # -- the FlexAttention fields, on demand ----------------------------------------------------
    def _field(self, name: str) -> torch.Tensor:
        if name not in self._dense:
            batch, heads = self._batch_heads
            bl, hl = self.layout_shape
            nq, nkv = self._num_blocks
            maps = [_map_from_csr(*self._csr[kind], self.num_layouts * nq, nkv).view(bl, hl, nq, nkv)
                    for kind in self._KINDS]
            self._dense.update(dense_fields_from_maps(maps[0], maps[1], batch, heads))
        return self._dense[name]

    def release_dense(self) -> None:
        """Drop the materialized dense fields (they are rebuilt on the next access)."""
        self._dense.clear()

    kv_num_blocks = property(lambda self: self._field("kv_num_blocks"))
    kv_indices = property(lambda self: self._field("kv_indices"))
    full_kv_num_blocks = property(lambda self: self._field("full_kv_num_blocks"))
    full_kv_indices = property(lambda self: self._field("full_kv_indices"))
    q_num_blocks = property(lambda self: self._field("q_num_blocks"))
    q_indices = property(lambda self: self._field("q_indices"))
    full_q_num_blocks = property(lambda self: self._field("full_q_num_blocks"))
    full_q_indices = property(lambda self: self._field("full_q_indices"))

    # -- views (without materializing) ----------------------------------------------------------
    @property
    def shape(self) -> Tuple[int, int, int, int]:
        return self._batch_heads + self.seq_lengths

    @property
    def num_blocks(self) -> Tuple[int, int]:
        return self._num_blocks

    @property
    def device(self) -> torch.device:
        return self._csr["partial"][0].device

    def _maps(self, kind: str) -> torch.Tensor:
        bl, hl = self.layout_shape
        nq, nkv = self._num_blocks
        blocks = _map_from_csr(*self._csr[kind], self.num_layouts * nq, nkv).view(bl, hl, nq, nkv)
        return blocks.expand(*self._batch_heads, nq, nkv)

    def partial_blocks(self) -> torch.Tensor:
        return self._maps("partial")

    def full_blocks(self) -> torch.Tensor:
        return self._maps("full")

    def sparsity(self) -> float:
        batch, heads = self._batch_heads
        copies = batch * heads // self.num_layouts
        computed = sum(int(self._csr[kind][1].numel()) for kind in self._KINDS) * copies
        total = batch * heads * self._num_blocks[0] * self._num_blocks[1]
        return 100.0 * (1.0 - computed / total) if total else 0.0

    def to_string(self, grid_size: Union[int, Tuple[int, int]] = (20, 20), limit: int = 4) -> str:
        """As ``BlockMask.to_string``, computed from the CSR (no dense map)."""
        nq, _ = self._num_blocks
        row_step, col_step, group_size = picture_grid(self._num_blocks, grid_size)
        grid_rows, grid_cols = group_size.shape
        tallies = {}
        for kind in self._KINDS:
            ptr, cols = (t.cpu() for t in self._csr[kind])
            row_of = torch.repeat_interleave(torch.arange(self.num_layouts * nq), ptr.diff())
            layout, row = row_of // nq, row_of % nq
            group = (layout * grid_rows + row // row_step) * grid_cols + cols.long() // col_step
            tallies[kind] = torch.bincount(group, minlength=self.num_layouts * grid_rows * grid_cols).view(
                self.num_layouts, grid_rows, grid_cols)

        def counts(b: int, h: int):
            layout = self.layout_index(b, h)
            return tallies["full"][layout], tallies["partial"][layout]

        return render_block_pictures(counts, group_size, *self._batch_heads, limit)

    def __repr__(self) -> str:
        name = getattr(self.mask_mod, "__name__", "mask_mod")
        return (f"CompactBlockMask(shape={self.shape}, BLOCK_SIZE={self.BLOCK_SIZE}, sparsity={self.sparsity():.2f}%, "
                f"layouts={self.layout_shape}, nbytes={self.nbytes()}, mask_mod={name}, device={self.device})")

    def to(self, device: Union[str, torch.device]) -> "CompactBlockMask":
        csr = {kind: (ptr.to(device), cols.to(device)) for kind, (ptr, cols) in self._csr.items()}
        copy = CompactBlockMask(csr=csr, layout_shape=self.layout_shape, batch_heads=self._batch_heads,
                                num_blocks=self._num_blocks, BLOCK_SIZE=self.BLOCK_SIZE,
                                seq_lengths=self.seq_lengths, mask_mod=self.mask_mod)
        copy.exact_layout = self.exact_layout  # the same layout
        return copy.trusted() if self.is_trusted() else copy

    def __getitem__(self, index) -> "CompactBlockMask":
        """Select batches / heads like ``BlockMask.__getitem__``; stays compact."""
        batch_map, head_map = batch_head_maps(index, self._batch_heads)
        bl, hl = self.layout_shape
        new_bl = batch_map.numel() if bl > 1 else 1
        new_hl = head_map.numel() if hl > 1 else 1
        src_b = batch_map if bl > 1 else torch.zeros(1, dtype=torch.long)
        src_h = head_map if hl > 1 else torch.zeros(1, dtype=torch.long)
        source = (src_b.view(-1, 1) * hl + src_h.view(1, -1)).reshape(-1)   # old layout of each new one
        nq = self._num_blocks[0]
        csr = {}
        for kind in self._KINDS:
            ptr, cols = self._csr[kind]
            rows = (source.to(ptr.device).view(-1, 1) * nq + torch.arange(nq, device=ptr.device)).reshape(-1)
            start, counts = ptr[rows], ptr[rows + 1] - ptr[rows]
            new_ptr = torch.zeros(rows.numel() + 1, dtype=torch.int64, device=ptr.device)
            torch.cumsum(counts, 0, out=new_ptr[1:])
            total = int(new_ptr[-1])
            within = torch.arange(total, device=ptr.device) - torch.repeat_interleave(new_ptr[:-1], counts)
            gather = torch.repeat_interleave(start, counts) + within
            csr[kind] = (new_ptr, cols[gather])
        sliced = CompactBlockMask(csr=csr, layout_shape=(new_bl, new_hl),
                                  batch_heads=(batch_map.numel(), head_map.numel()), num_blocks=self._num_blocks,
                                  BLOCK_SIZE=self.BLOCK_SIZE, seq_lengths=self.seq_lengths,
                                  mask_mod=sliced_mask_mod(self.mask_mod, batch_map, head_map))
        return sliced.trusted() if self.is_trusted() else sliced
