"""``BlockMask``: which tiles of the attention matrix are empty, full, or partial.

The fields and their meaning follow ``torch.nn.attention.flex_attention.BlockMask``:

- ``kv_num_blocks``: int32 ``[B, H, num_q_blocks]``, partial KV blocks per query block row.
- ``kv_indices``: int32 ``[B, H, num_q_blocks, num_kv_blocks]``, their column indices, ascending,
  valid entries first (the rest is padding).
- ``full_kv_num_blocks`` / ``full_kv_indices``: the same for full blocks (the mask_mod is
  known to be True on every in-bounds element, so kernels skip evaluating it).
- ``q_num_blocks`` / ``q_indices`` / ``full_q_num_blocks`` / ``full_q_indices``: the transposed
  layout (``[B, H, num_kv_blocks]`` and ``[B, H, num_kv_blocks, num_q_blocks]``) for the backward pass.

``B`` or ``H`` is 1 when the mask was built with ``B=None`` / ``H=None`` (broadcast).
A block in a ragged tail (lengths not multiples of the block size) counts as full when the
mask_mod is True on all of its in-bounds elements; kernels always bound-check the tail.
"""

from __future__ import annotations

import itertools
from typing import Callable, Optional, Tuple, Union

import torch

from .library import full_mask

BlockSize = Union[int, Tuple[int, int]]


def normalize_block_size(block_size: BlockSize) -> Tuple[int, int]:
    """``128 -> (128, 128)``; a ``(Q_BS, KV_BS)`` pair is checked and returned."""
    if isinstance(block_size, int) and not isinstance(block_size, bool):
        pair = (block_size, block_size)
    elif isinstance(block_size, (tuple, list)) and len(block_size) == 2:
        pair = (block_size[0], block_size[1])
    else:
        raise ValueError(f"BLOCK_SIZE must be an int or a (Q_BLOCK_SIZE, KV_BLOCK_SIZE) pair, got {block_size!r}")
    for value in pair:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"BLOCK_SIZE entries must be positive ints, got {block_size!r}")
    return int(pair[0]), int(pair[1])


def ordered_from_dense(dense_blocks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[..., rows, cols]`` bool -> (num_blocks ``[..., rows]``, indices ``[..., rows, cols]``) int32.

    Indices of set blocks come first in ascending order; the rest of each row is padding
    (the unset column indices, also ascending), as FlexAttention lays it out.
    """
    as_int = dense_blocks.to(torch.int32)
    num_blocks = as_int.sum(dim=-1, dtype=torch.int32)
    indices = torch.argsort(as_int, dim=-1, descending=True, stable=True).to(torch.int32)
    return num_blocks.contiguous(), indices.contiguous()


def dense_from_ordered(num_blocks: torch.Tensor, indices: torch.Tensor, num_cols: int) -> torch.Tensor:
    """Inverse of ``ordered_from_dense``: a bool ``[..., rows, num_cols]`` block map."""
    entries = indices.shape[-1]
    valid = torch.arange(entries, device=indices.device) < num_blocks.unsqueeze(-1)
    # Padding entries scatter into an extra column that is dropped afterwards.
    target = torch.where(valid, indices.long(), num_cols)
    dense = torch.zeros(*indices.shape[:-1], num_cols + 1, dtype=torch.bool, device=indices.device)
    dense.scatter_(-1, target, True)
    return dense[..., :num_cols]


def _index_map(positions: torch.Tensor):
    """A function local index -> original index: affine when ``positions`` is an arithmetic run
    (so it traces and runs on any device), else a lookup in ``positions``."""
    if positions.numel() == 1 or bool((positions.diff() == positions[1] - positions[0]).all()):
        start = int(positions[0])
        step = int(positions[1] - positions[0]) if positions.numel() > 1 else 1
        return lambda local: local * step + start
    return lambda local: positions[local]


def sliced_mask_mod(mask_mod: Callable, batch_map: torch.Tensor, head_map: torch.Tensor) -> Callable:
    """The mask_mod of a sliced BlockMask: local (b, h) map back to the original ones."""
    batch_of, head_of = _index_map(batch_map), _index_map(head_map)

    def sliced(b, h, q_idx, kv_idx):
        return mask_mod(batch_of(b), head_of(h), q_idx, kv_idx)

    sliced.__name__ = getattr(mask_mod, "__name__", "mask_mod") + "[sliced]"
    return sliced


def batch_head_maps(index, sizes: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``mask[index]`` over (batch, head) as two position maps; an int keeps its dimension (size 1)."""
    index = index if isinstance(index, tuple) else (index,)
    if len(index) > 2:
        raise IndexError(f"BlockMask can be indexed over [batch, head] only, got {len(index)} indices")
    index = tuple(index) + (slice(None),) * (2 - len(index))
    maps = []
    for position, size in zip(index, sizes):
        all_positions = torch.arange(size)
        if isinstance(position, int) and not isinstance(position, bool):
            if not -size <= position < size:
                raise IndexError(f"index {position} is out of range for a BlockMask dimension of size {size}")
            maps.append(all_positions[position:position + 1] if position >= 0 else all_positions[position:][:1])
        else:
            maps.append(all_positions[position].reshape(-1))
    return maps[0], maps[1]


def picture_grid(num_blocks: Tuple[int, int], grid_size: Union[int, Tuple[int, int]]):
    """How ``to_string`` groups blocks: (row_step, col_step, blocks per group [grid_rows, grid_cols])."""
    nq, nkv = num_blocks
    if grid_size == -1:
        max_rows, max_cols = nq, nkv
    elif isinstance(grid_size, int):
        max_rows = max_cols = grid_size
    else:
        max_rows, max_cols = grid_size
    row_step, col_step = max(1, -(-nq // max_rows)), max(1, -(-nkv // max_cols))
    grid_rows, grid_cols = -(-nq // row_step), -(-nkv // col_step)
    rows_in = torch.clamp(nq - torch.arange(grid_rows) * row_step, max=row_step)  # edge groups are smaller
    cols_in = torch.clamp(nkv - torch.arange(grid_cols) * col_step, max=col_step)
    return row_step, col_step, rows_in[:, None] * cols_in[None, :]


def render_block_pictures(counts: Callable[[int, int], Tuple[torch.Tensor, torch.Tensor]], group_size: torch.Tensor,
                          batch: int, heads: int, limit: int) -> str:
    """One picture per (b, h); ``counts(b, h)`` gives full and partial block counts per group."""
    pictures = []
    for count, (b, h) in enumerate(itertools.product(range(batch), range(heads))):
        if count == limit:
            pictures.append(f"... ({batch * heads - limit} more; index the mask as mask[b, h] "
                            "or raise limit= to see them)")
            break
        full, partial = counts(b, h)
        lines = [f"(b={b}, h={h})"]
        for r in range(group_size.shape[0]):
            cells = ("██" if int(full[r, c]) == int(group_size[r, c])
                     else "  " if int(full[r, c]) + int(partial[r, c]) == 0 else "░░"
                     for c in range(group_size.shape[1]))
            lines.append("".join(cells) + "|")
        pictures.append("\n".join(lines))
    return "\n".join(pictures)


class BlockMask:
    """Block-sparse layout of a mask over ``[B, H, Q_LEN, KV_LEN]`` in tiles of ``BLOCK_SIZE``.

    Build it with ``create_block_mask``; see the module docstring for the fields.
    """

    _TENSOR_FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                      "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")

    def __init__(self, *, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
                 full_kv_num_blocks: torch.Tensor, full_kv_indices: torch.Tensor,
                 q_num_blocks: torch.Tensor, q_indices: torch.Tensor,
                 full_q_num_blocks: torch.Tensor, full_q_indices: torch.Tensor,
                 BLOCK_SIZE: Tuple[int, int], seq_lengths: Tuple[int, int], mask_mod: Callable):
        self.kv_num_blocks = kv_num_blocks
        self.kv_indices = kv_indices
        self.full_kv_num_blocks = full_kv_num_blocks
        self.full_kv_indices = full_kv_indices
        self.q_num_blocks = q_num_blocks
        self.q_indices = q_indices
        self.full_q_num_blocks = full_q_num_blocks
        self.full_q_indices = full_q_indices
        self.BLOCK_SIZE = normalize_block_size(BLOCK_SIZE)
        self.seq_lengths = (int(seq_lengths[0]), int(seq_lengths[1]))
        self.mask_mod = mask_mod if mask_mod is not None else full_mask

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_block_maps(cls, partial: torch.Tensor, full: torch.Tensor, *, BLOCK_SIZE: BlockSize,
                        seq_lengths: Tuple[int, int], mask_mod: Optional[Callable]) -> "BlockMask":
        """From bool block maps ``partial``/``full`` ``[B, H, num_q_blocks, num_kv_blocks]``."""
        if partial.shape != full.shape or partial.dim() != 4:
            raise ValueError(f"block maps must both be [B, H, NQ, NKV], got {tuple(partial.shape)} and {tuple(full.shape)}")
        if bool((partial & full).any()):
            raise ValueError("a block cannot be both partial and full")
        kv_num, kv_idx = ordered_from_dense(partial)
        full_kv_num, full_kv_idx = ordered_from_dense(full)
        q_num, q_idx = ordered_from_dense(partial.transpose(-2, -1))
        full_q_num, full_q_idx = ordered_from_dense(full.transpose(-2, -1))
        return cls(kv_num_blocks=kv_num, kv_indices=kv_idx, full_kv_num_blocks=full_kv_num,
                   full_kv_indices=full_kv_idx, q_num_blocks=q_num, q_indices=q_idx,
                   full_q_num_blocks=full_q_num, full_q_indices=full_q_idx,
                   BLOCK_SIZE=BLOCK_SIZE, seq_lengths=seq_lengths, mask_mod=mask_mod)

    @classmethod
    def from_flex(cls, flex_block_mask) -> "BlockMask":
        """From a ``torch.nn.attention.flex_attention.BlockMask`` (same fields, same meaning)."""
        num_cols = flex_block_mask.kv_indices.shape[-1]
        partial = dense_from_ordered(flex_block_mask.kv_num_blocks, flex_block_mask.kv_indices, num_cols)
        if flex_block_mask.full_kv_num_blocks is not None:
            full = dense_from_ordered(flex_block_mask.full_kv_num_blocks, flex_block_mask.full_kv_indices, num_cols)
        else:
            full = torch.zeros_like(partial)
        q_len, kv_len = flex_block_mask.seq_lengths
        q_bs, kv_bs = flex_block_mask.BLOCK_SIZE
        # Flex pads its index tensors to whole blocks of a possibly longer length; keep ours tight.
        nq, nkv = -(-q_len // q_bs), -(-kv_len // kv_bs)
        partial, full = partial[..., :nq, :nkv], full[..., :nq, :nkv]
        return cls.from_block_maps(partial, full & ~partial, BLOCK_SIZE=(q_bs, kv_bs),
                                   seq_lengths=(q_len, kv_len), mask_mod=flex_block_mask.mask_mod)

    def to_flex(self):
        """This mask as a ``torch.nn.attention.flex_attention.BlockMask`` for ``flex_attention``."""
        from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

        return FlexBlockMask.from_kv_blocks(
            self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks, self.full_kv_indices,
            BLOCK_SIZE=self.BLOCK_SIZE, mask_mod=self.mask_mod, seq_lengths=self.seq_lengths)

    # -- views --------------------------------------------------------------------------------
    @property
    def shape(self) -> Tuple[int, int, int, int]:
        """``(B, H, Q_LEN, KV_LEN)``; B/H are 1 where the mask broadcasts."""
        batch, heads = self.kv_num_blocks.shape[:2]
        return (batch, heads) + self.seq_lengths

    @property
    def num_blocks(self) -> Tuple[int, int]:
        """``(num_q_blocks, num_kv_blocks)``."""
        return self.kv_indices.shape[-2], self.kv_indices.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.kv_num_blocks.device

    def row_layout(self, row: int, device=None):
        """Query block row ``row`` as ``((num, indices), (full_num, full_indices))``: partial then full
        blocks, ``num`` int32 ``[Bm, Hm]`` and ``indices`` ``[Bm, Hm, NKV]`` (the first ``num`` valid),
        ``Bm``/``Hm`` the mask's own sizes (1 when it broadcasts). The compact layout overrides this
        to read its compressed rows without building the dense fields."""
        def pick(t):
            return t[:, :, row] if device is None else t[:, :, row].to(device)
        return ((pick(self.kv_num_blocks), pick(self.kv_indices)),
                (pick(self.full_kv_num_blocks), pick(self.full_kv_indices)))

    def partial_blocks(self) -> torch.Tensor:
        """Bool ``[B, H, NQ, NKV]``: blocks where the mask_mod must be evaluated."""
        return dense_from_ordered(self.kv_num_blocks, self.kv_indices, self.num_blocks[1])

    def full_blocks(self) -> torch.Tensor:
        """Bool ``[B, H, NQ, NKV]``: blocks that are entirely True."""
        return dense_from_ordered(self.full_kv_num_blocks, self.full_kv_indices, self.num_blocks[1])

    def to_dense(self) -> torch.Tensor:
        """Int32 ``[B, H, NQ, NKV]``: 1 for every block that is computed (partial or full)."""
        return (self.partial_blocks() | self.full_blocks()).to(torch.int32)

    def numel(self) -> int:
        """Number of (b, h, q, kv) elements that the blocks cover, padding included."""
        batch, heads = self.shape[:2]
        nq, nkv = self.num_blocks
        return batch * heads * nq * self.BLOCK_SIZE[0] * nkv * self.BLOCK_SIZE[1]

    def sparsity(self) -> float:
        """Percentage of blocks that are never computed (0 = dense, 100 = nothing attends)."""
        computed = int(self.kv_num_blocks.sum()) + int(self.full_kv_num_blocks.sum())
        batch, heads = self.shape[:2]
        total = batch * heads * self.num_blocks[0] * self.num_blocks[1]
        return 100.0 * (1.0 - computed / total) if total else 0.0

    def to_string(self, grid_size: Union[int, Tuple[int, int]] = (20, 20), limit: int = 4) -> str:
        """An ASCII picture per (b, h): ``█`` full, ``░`` partial, blank empty.

        Larger maps are summarized: a character stands for a group of blocks (``█`` only when
        all are full, blank only when all are empty). ``grid_size=-1`` shows every block.
        """
        row_step, col_step, group_size = picture_grid(self.num_blocks, grid_size)
        grid_rows, grid_cols = group_size.shape
        nq, nkv = self.num_blocks

        def per_group(blocks: torch.Tensor) -> torch.Tensor:  # [Bm, Hm, NQ, NKV] bool -> block counts per group
            padded = torch.nn.functional.pad(blocks.int().cpu(), (0, grid_cols * col_step - nkv,
                                                                   0, grid_rows * row_step - nq))
            return padded.view(*blocks.shape[:2], grid_rows, row_step, grid_cols, col_step).sum((3, 5))

        full, partial = per_group(self.full_blocks()), per_group(self.partial_blocks())
        return render_block_pictures(lambda b, h: (full[b, h], partial[b, h]), group_size, *full.shape[:2], limit)

    def __str__(self) -> str:
        return f"BlockMask(shape={self.shape}, sparsity={self.sparsity():.2f}%,\n{self.to_string()}\n)"

    def __repr__(self) -> str:
        name = getattr(self.mask_mod, "__name__", "mask_mod")
        return (f"BlockMask(shape={self.shape}, BLOCK_SIZE={self.BLOCK_SIZE}, sparsity={self.sparsity():.2f}%, "
                f"mask_mod={name}, device={self.device})")

    def to(self, device: Union[str, torch.device]) -> "BlockMask":
        """A copy with every index tensor on ``device`` (the mask_mod is shared)."""
        moved = {name: getattr(self, name).to(device) for name in self._TENSOR_FIELDS}
        return BlockMask(**moved, BLOCK_SIZE=self.BLOCK_SIZE, seq_lengths=self.seq_lengths, mask_mod=self.mask_mod)

    def __getitem__(self, index) -> "BlockMask":
        """Select batches / heads: ``mask[b]``, ``mask[b, h]``, slices or index tensors.

        Integer indices keep the dimension (size 1). The sliced mask's ``mask_mod`` maps its
        local ``b``/``h`` back to the original ones, so it stays usable in ``attention``.
        """
        batch_map, head_map = batch_head_maps(index, self.shape[:2])
        fields = {}
        for name in self._TENSOR_FIELDS:
            value = getattr(self, name)
            fields[name] = value[batch_map.to(value.device)][:, head_map.to(value.device)].contiguous()
        return BlockMask(**fields, BLOCK_SIZE=self.BLOCK_SIZE, seq_lengths=self.seq_lengths,
                         mask_mod=sliced_mask_mod(self.mask_mod, batch_map, head_map))

    def as_tuple(self) -> Tuple:
        """Every field in a fixed order, for passing to kernels."""
        return tuple(getattr(self, name) for name in self._TENSOR_FIELDS) + (self.BLOCK_SIZE, self.seq_lengths, self.mask_mod)
