"""FlexAttention's block-list format, as the ``BlockMask`` reads, checks, crops and indexes it.

A layout is FlexAttention's ``(num_blocks [..., rows], indices [..., rows, width])``: the first
``num_blocks`` entries of each row are the set blocks, the rest is padding. Here:

- conversions between such lists and bool block maps ``[..., rows, cols]`` (``ordered_from_dense``,
  ``dense_from_ordered``), and the block maps of lists in Flex's looser forms (fewer or more index
  columns or rows than the grid, 2-D or 3-D lists, no full lists: ``flex_block_maps``), which
  ``BlockMask.from_flex`` / ``from_kv_blocks`` build from;
- the value checks of a list pair against the tile grid, gathered so that one device read reports
  them all (``block_list_problems``, ``raise_problems``);
- ``mask[index]`` positions per dimension (``select_positions``), for batch, head and query-block
  indexing, and the stand-in mask_mod of a mask indexed on query blocks (``query_sliced_mask_mod``).

``FlexMethods`` holds the ``BlockMask`` methods that exist for FlexAttention's sake (``from_flex``,
``to_flex``, ``from_kv_blocks``, ``_adjust``, ``as_tuple``, query-block selection), written against
the class's own API (``from_block_maps``, ``partial_blocks``, ...): a mixin, so this module imports
nothing from ``block_mask.py``. It knows no Triton.
"""

from __future__ import annotations

import numbers
from typing import Callable, List, Optional, Tuple, Type, TypeVar, Union

import torch

from .scalars import as_int

BlockSize = Union[int, Tuple[int, int]]
# The class the mixin is mixed into (``BlockMask`` or a subclass), named without importing it.
MaskClass = TypeVar("MaskClass", bound="FlexMethods")

__all__ = ["FlexMethods", "normalize_block_size", "ordered_from_dense", "dense_from_ordered", "block_list_problems",
           "raise_problems", "flex_block_maps", "select_positions", "is_leading_run", "query_sliced_mask_mod",
           "is_query_sliced", "QUERY_SLICED_MESSAGE"]


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


def block_list_problems(what: str, num_blocks: torch.Tensor, indices: torch.Tensor, batch_heads: Tuple[int, int],
                        num_rows: int, num_cols: int) -> Tuple[List[Tuple[torch.Tensor, str]], Optional[torch.Tensor]]:
    """Check one (counts, indices) pair of block lists against the tile grid.

    num_blocks ``[B, H, rows]``, indices ``[B, H, rows, width]``. Shape and dtype problems raise
    ``ValueError`` at once (no device sync). Returns (problems, listed): value problems as (bad flag,
    message) pairs, so a caller reads all of them with one sync -- a count outside ``[0, width]``, a
    valid entry outside ``[0, num_cols)``, one block listed twice in a row -- and the bool map
    ``[B, H, rows, num_cols]`` of the blocks listed (entries outside the grid left out), or None
    where there is nothing to read (meta tensors, empty lists).
    """
    for name, t, rank in ((f"{what}_num_blocks", num_blocks, 3), (f"{what}_indices", indices, 4)):
        if not isinstance(t, torch.Tensor) or t.dim() != rank:
            got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"block_mask.{name} must be a {rank}-D integer tensor, got {got}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"block_mask.{name} must hold integers, got dtype {t.dtype}")
    expected = tuple(batch_heads) + (num_rows,)
    if tuple(num_blocks.shape) != expected or tuple(indices.shape[:3]) != expected:
        raise ValueError(f"block_mask.{what}_num_blocks {tuple(num_blocks.shape)} and {what}_indices "
                         f"{tuple(indices.shape)} must be [B, H, {num_rows}] and [B, H, {num_rows}, n] with "
                         f"[B, H] = {list(batch_heads)}: {num_rows} block rows cover the mask's seq_lengths")
    width = indices.shape[-1]
    if num_blocks.numel() == 0 or num_blocks.device.type == "meta":
        return [], None
    valid = torch.arange(width, device=indices.device, dtype=num_blocks.dtype) < num_blocks.unsqueeze(-1)
    outside = valid & ((indices < 0) | (indices >= num_cols))
    # Padding and entries outside the grid scatter into an extra column, dropped afterwards.
    target = torch.where(valid & ~outside, indices, num_cols).long()
    listed = torch.zeros(*indices.shape[:-1], num_cols + 1, dtype=torch.bool, device=indices.device)
    listed = listed.scatter_(-1, target, True)[..., :num_cols]
    any_outside = outside.any()
    problems = [
        ((num_blocks < 0) | (num_blocks > width)).any(),
        any_outside,
        # A block listed twice would be computed twice: each row's distinct entries must match its count.
        (listed.sum(-1) != num_blocks.clamp(0, width)).any() & ~any_outside,
    ]
    messages = [
        f"block_mask.{what}_num_blocks must be between 0 and {width} (the width of {what}_indices)",
        f"block_mask.{what}_indices lists a block outside [0, {num_cols}), the blocks of that dimension of the "
        "mask's seq_lengths / BLOCK_SIZE (it would read outside the tensors)",
        f"block_mask.{what}_indices lists a block twice in one row (each block may appear once)",
    ]
    return list(zip(problems, messages)), listed


def raise_problems(problems: List[Tuple[torch.Tensor, str]]) -> None:
    """Raise ``ValueError`` with the first problem found; one device sync for all of them."""
    if not problems:
        return
    flags = torch.stack([flag.reshape(()).to(torch.bool) for flag, _ in problems]).tolist()
    for flag, (_, message) in zip(flags, problems):
        if flag:
            raise ValueError(message)


def _as_4d(name: str, tensor: torch.Tensor, rank: int) -> torch.Tensor:
    """A list of Flex's ``[..., rows]`` / ``[..., rows, width]`` forms with leading size-1 dims up to 4-D."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be an integer tensor, got {type(tensor).__name__}")
    if not rank - 2 <= tensor.dim() <= rank:
        raise ValueError(f"{name} must be {rank - 2}-D to {rank}-D ([B, H, ...] leading dims optional), "
                         f"got shape {tuple(tensor.shape)}")
    return tensor.reshape((1,) * (rank - tensor.dim()) + tuple(tensor.shape))


def flex_block_maps(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, full_kv_num_blocks: Optional[torch.Tensor],
                    full_kv_indices: Optional[torch.Tensor], block_size: Tuple[int, int],
                    seq_lengths: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The bool block maps (partial, full) ``[B, H, NQ, NKV]`` of kv block lists in FlexAttention's form.

    Flex's lists may be 2-D ``[rows, width]`` or 3-D (leading size-1 dims are added), hold more rows
    or index columns than ``seq_lengths`` / ``block_size`` need (padding: dropped, since blocks past
    the sequence hold no key), fewer index columns (a narrower list), and no full lists (None). Rows
    must cover the sequence; the lists are checked first (``ValueError`` naming the field): counts fit
    the index width, no valid entry lies outside the grid or appears twice. A block listed as both
    partial and full counts as partial (the mask_mod decides it: exact either way).
    """
    if (full_kv_num_blocks is None) != (full_kv_indices is None):
        raise ValueError("full_kv_num_blocks and full_kv_indices must be both given or both None")
    (q_len, kv_len), (q_bs, kv_bs) = seq_lengths, block_size
    nq, nkv = -(-q_len // q_bs), -(-kv_len // kv_bs)
    kv_indices = _as_4d("kv_indices", kv_indices, 4)
    lists = [("kv", _as_4d("kv_num_blocks", kv_num_blocks, 3), kv_indices)]
    if full_kv_num_blocks is not None:
        lists.append(("full_kv", _as_4d("full_kv_num_blocks", full_kv_num_blocks, 3),
                      _as_4d("full_kv_indices", full_kv_indices, 4)))
    rows = kv_indices.shape[-2]
    if rows < nq:
        raise ValueError(f"block_mask has {rows} query block rows of {q_bs}, which do not cover its "
                         f"seq_lengths Q_LEN={q_len} ({nq} rows needed); rebuild it with create_block_mask")
    num_cols = max([nkv] + [idx.shape[-1] for _, _, idx in lists])
    batch_heads = tuple(kv_indices.shape[:2])
    raise_problems([p for what, num, idx in lists
                    for p in block_list_problems(what, num, idx, batch_heads, rows, num_cols)[0]])
    maps = [dense_from_ordered(num, idx, num_cols)[..., :nq, :nkv] for _, num, idx in lists]
    partial = maps[0]
    full = maps[1] & ~partial if len(maps) > 1 else torch.zeros_like(partial)
    return partial, full


def _describe_index(position) -> str:
    if isinstance(position, slice):
        parts = (position.start, position.stop) + ((position.step,) if position.step is not None else ())
        return ":".join("" if part is None else str(part) for part in parts)
    return repr(position)


def select_positions(position, size: int, dim: str) -> torch.Tensor:
    """The positions ``[n]`` that ``position`` (int, slice, index tensor / list / range) selects from a
    dimension of ``size`` entries named ``dim``; an int keeps the dimension (one position).

    Semantics are a tensor's: ints (negative from the end) and index tensors must be in range, slices are
    clipped. A selection that would leave the dimension empty is an ``IndexError`` naming the index and
    the valid range (an empty BlockMask cannot be used)."""
    all_positions = torch.arange(size)
    valid = f"valid {dim} indices are 0..{size - 1} (or -{size}..-1)"
    if isinstance(position, numbers.Integral) and not isinstance(position, bool):
        position = int(position)
        if not -size <= position < size:
            raise IndexError(f"BlockMask {dim} index {position} is out of range: {valid}")
        return all_positions[position:position + 1] if position >= 0 else all_positions[position:][:1]
    if not isinstance(position, (slice, torch.Tensor, list, range)):
        raise IndexError(f"BlockMask {dim} index must be an int, a slice, or an index tensor/list, "
                         f"got {type(position).__name__}")
    try:
        picked = all_positions[position.cpu() if isinstance(position, torch.Tensor) else position].reshape(-1)
    except (IndexError, RuntimeError, ValueError, TypeError) as error:
        raise IndexError(f"BlockMask {dim} index {_describe_index(position)} is invalid ({error}): "
                         f"{valid}") from None
    if picked.numel() == 0:
        raise IndexError(f"BlockMask {dim} index {_describe_index(position)} selects nothing from {size} "
                         f"{dim} entr{'y' if size == 1 else 'ies'} ({valid}); an empty BlockMask cannot be used")
    return picked


def is_leading_run(positions: torch.Tensor) -> bool:
    """Whether ``positions`` is ``0, 1, ..., n - 1`` (local index = original index)."""
    return bool(torch.equal(positions, torch.arange(positions.numel(), dtype=positions.dtype)))


QUERY_SLICED_MESSAGE = (
    "Cannot use mask_mod from a sliced BlockMask: this BlockMask was indexed on query blocks "
    "(mask[:, :, i]), so its rows no longer start at query position 0. Set block_mask.mask_mod to a mask_mod "
    "that adds the rows' query offset (built from the original mask's mask_mod) and block_mask.seq_lengths "
    "to the lengths it is used with, as with FlexAttention")


def query_sliced_mask_mod(b, h, q_idx, kv_idx):
    """The mask_mod of a BlockMask indexed on query blocks until the user sets one (FlexAttention's
    convention): calling it, or attending with the mask, raises ``RuntimeError``."""
    raise RuntimeError(QUERY_SLICED_MESSAGE)


def is_query_sliced(mask_mod) -> bool:
    """Whether ``mask_mod`` is the stand-in of a mask indexed on query blocks (still to be replaced)."""
    return mask_mod is query_sliced_mask_mod


def normalize_block_size(block_size: BlockSize) -> Tuple[int, int]:
    """``128 -> (128, 128)``; a ``(Q_BS, KV_BS)`` pair is checked and returned."""
    if isinstance(block_size, (tuple, list)):
        if len(block_size) != 2:
            raise ValueError(f"BLOCK_SIZE must be an int or a (Q_BLOCK_SIZE, KV_BLOCK_SIZE) pair, got {block_size!r}")
        pair = tuple(block_size)
    else:
        pair = (block_size, block_size)
    try:
        q_bs, kv_bs = (as_int(value, "BLOCK_SIZE") for value in pair)
    except (TypeError, ValueError):
        raise ValueError(f"BLOCK_SIZE must be a positive int or a (Q_BLOCK_SIZE, KV_BLOCK_SIZE) pair of them, "
                         f"got {block_size!r}") from None
    return q_bs, kv_bs


class FlexMethods:
    """FlexAttention's ``BlockMask`` API on this library's ``BlockMask`` (mixed into it)."""

    @classmethod
    def from_flex(cls: Type[MaskClass], flex_block_mask) -> MaskClass:
        """From a ``torch.nn.attention.flex_attention.BlockMask`` (same fields, same meaning).

        Its kv block lists are checked first (``ValueError`` naming the field): rows must cover
        ``seq_lengths``, counts fit the index width, no entry lies outside the index width.
        """
        seq_lengths = tuple(int(n) for n in flex_block_mask.seq_lengths)
        block_size = normalize_block_size(tuple(flex_block_mask.BLOCK_SIZE))
        partial, full = flex_block_maps(flex_block_mask.kv_num_blocks, flex_block_mask.kv_indices,
                                        flex_block_mask.full_kv_num_blocks, flex_block_mask.full_kv_indices,
                                        block_size, seq_lengths)
        return cls.from_block_maps(partial, full, BLOCK_SIZE=block_size, seq_lengths=seq_lengths,
                                   mask_mod=flex_block_mask.mask_mod)

    @classmethod
    def from_kv_blocks(cls: Type[MaskClass], kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
                       full_kv_num_blocks: Optional[torch.Tensor] = None,
                       full_kv_indices: Optional[torch.Tensor] = None,
                       BLOCK_SIZE: BlockSize = 128, mask_mod: Optional[Callable] = None,
                       seq_lengths: Optional[Tuple[int, int]] = None, compute_q_blocks: bool = True, *,
                       dq_write_order=None, dq_write_order_full=None, dq_kv_order=None) -> MaskClass:
        """FlexAttention's ``BlockMask.from_kv_blocks``: a mask from kv block lists, same signature.

        kv_num_blocks ``[B, H, rows]`` and kv_indices ``[B, H, rows, width]`` (B, H optional) list the
        partial blocks of each query block row, the full_* pair (optional) the full ones.
        ``seq_lengths`` defaults to ``(rows * Q_BLOCK_SIZE, width * KV_BLOCK_SIZE)``, as in Flex. The
        lists are checked and stored in this class's layout (``from_flex``); the transposed (``q_*``)
        lists are always built (the backward needs them), so ``compute_q_blocks`` is accepted and has
        no effect, and Flex's deterministic-dQ metadata (``dq_*``) is accepted and not needed: the
        backward kernels here are deterministic without it.
        """
        block_size = normalize_block_size(BLOCK_SIZE)
        if not isinstance(kv_indices, torch.Tensor) or kv_indices.dim() < 2:
            got = (f"shape {tuple(kv_indices.shape)}" if isinstance(kv_indices, torch.Tensor)
                   else type(kv_indices).__name__)
            raise ValueError(f"kv_indices must be an integer tensor [B, H, rows, width] (B, H optional), got {got}")
        if seq_lengths is None:
            seq_lengths = (kv_indices.shape[-2] * block_size[0], kv_indices.shape[-1] * block_size[1])
        seq_lengths = (as_int(seq_lengths[0], "seq_lengths[0]"), as_int(seq_lengths[1], "seq_lengths[1]"))
        partial, full = flex_block_maps(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, block_size,
                                        seq_lengths)
        return cls.from_block_maps(partial, full, BLOCK_SIZE=block_size, seq_lengths=seq_lengths, mask_mod=mask_mod)

    def to_flex(self):
        """This mask as a ``torch.nn.attention.flex_attention.BlockMask`` for ``flex_attention``."""
        from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

        lists = (self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks, self.full_kv_indices)
        if self.kv_indices.shape[-1] != self.num_blocks[1]:
            # Flex's from_kv_blocks transposes the lists as if they were as wide as the grid: widen them.
            lists = (*ordered_from_dense(self.partial_blocks()), *ordered_from_dense(self.full_blocks()))
        return FlexBlockMask.from_kv_blocks(*lists, BLOCK_SIZE=self.BLOCK_SIZE, mask_mod=self.mask_mod,
                                            seq_lengths=self.seq_lengths)

    def select_query_blocks(self, batch_map: torch.Tensor, head_map: torch.Tensor, position):
        """``mask[b, h, i]`` (see ``BlockMask.__getitem__``): the block rows ``position`` selects of the
        selected batches / heads, ``seq_lengths`` kept, the mask_mod ``query_sliced_mask_mod``."""
        rows = select_positions(position, self.num_blocks[0], "query block")
        picks = (batch_map.view(-1, 1, 1), head_map.view(1, -1, 1), rows.view(1, 1, -1))
        partial, full = (blocks[tuple(p.to(blocks.device) for p in picks)]
                         for blocks in (self.partial_blocks(), self.full_blocks()))
        return self.plain_class().from_block_maps(partial, full, BLOCK_SIZE=self.BLOCK_SIZE,
                                                  seq_lengths=self.seq_lengths, mask_mod=query_sliced_mask_mod)

    def _adjust(self, new_q_len: int, new_kv_len: int):
        """FlexAttention's ``BlockMask._adjust``: this mask cropped to its upper-left ``new_q_len x
        new_kv_len`` corner (block rows and columns past the new lengths dropped), same mask_mod, as a
        plain ``BlockMask`` (``plain_class``).

        Exact for every mask_mod: a kept tile keeps its kind (a subset of a full tile is full, of an
        empty one empty). Growing is refused (``ValueError``): tiles past the old lengths were never
        classified. (Flex recounts each row from its index list, which can keep a block past the new
        kv length for masks whose rows do not start at block 0, e.g. sliding windows; this crops the
        block map itself.)
        """
        new_q_len, new_kv_len = as_int(new_q_len, "new_q_len"), as_int(new_kv_len, "new_kv_len")
        if new_q_len > self.seq_lengths[0] or new_kv_len > self.seq_lengths[1]:
            raise ValueError(f"BlockMask._adjust crops a mask to a smaller corner; this one was built for "
                             f"seq_lengths {self.seq_lengths} and cannot grow to ({new_q_len}, {new_kv_len}): "
                             "rebuild it with create_block_mask")
        rows, cols = -(-new_q_len // self.BLOCK_SIZE[0]), -(-new_kv_len // self.BLOCK_SIZE[1])
        partial, full = (blocks[..., :rows, :cols] for blocks in (self.partial_blocks(), self.full_blocks()))
        return self.plain_class().from_block_maps(partial, full, BLOCK_SIZE=self.BLOCK_SIZE,
                                                  seq_lengths=(new_q_len, new_kv_len), mask_mod=self.mask_mod)

    def as_tuple(self, flatten: bool = True) -> Tuple:
        """FlexAttention's ``BlockMask.as_tuple`` of this mask, in the installed torch's order (lengths, the
        eight index tensors -- these very tensors --, Flex's optional metadata as None, BLOCK_SIZE, mask_mod)."""
        from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

        fields = {name: getattr(self, name) for name in self._TENSOR_FIELDS}
        return FlexBlockMask(seq_lengths=self.seq_lengths, **fields, BLOCK_SIZE=self.BLOCK_SIZE,
                             mask_mod=self.mask_mod).as_tuple(flatten)
