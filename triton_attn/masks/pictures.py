"""ASCII pictures of block layouts (``BlockMask.to_string``, ``CompactBlockMask.to_string``): how blocks are
grouped into characters, and the pictures drawn from per-group counts of full and partial blocks."""

from __future__ import annotations

import itertools
import numbers
from typing import Callable, Tuple, Union

import torch

from .scalars import as_int

__all__ = ["picture_grid", "render_block_pictures"]


def picture_grid(num_blocks: Tuple[int, int], grid_size: Union[int, Tuple[int, int]]):
    """How ``to_string`` groups blocks: (row_step, col_step, blocks per group [grid_rows, grid_cols])."""
    nq, nkv = num_blocks
    if isinstance(grid_size, numbers.Integral) and not isinstance(grid_size, bool) and grid_size == -1:
        max_rows, max_cols = nq, nkv
    else:
        pair = tuple(grid_size) if isinstance(grid_size, (tuple, list)) else (grid_size, grid_size)
        try:
            if len(pair) != 2:
                raise ValueError
            max_rows, max_cols = (as_int(value, "grid_size") for value in pair)
        except (TypeError, ValueError):
            raise ValueError(f"grid_size must be -1 (every block), a positive int or a (rows, cols) pair of them, "
                             f"got {grid_size!r}") from None
    row_step, col_step = max(1, -(-nq // max_rows)), max(1, -(-nkv // max_cols))
    grid_rows, grid_cols = -(-nq // row_step), -(-nkv // col_step)
    rows_in = torch.clamp(nq - torch.arange(grid_rows) * row_step, max=row_step)  # edge groups are smaller
    cols_in = torch.clamp(nkv - torch.arange(grid_cols) * col_step, max=col_step)
    return row_step, col_step, rows_in[:, None] * cols_in[None, :]


def render_block_pictures(counts: Callable[[int, int], Tuple[torch.Tensor, torch.Tensor]], group_size: torch.Tensor,
                          batch: int, heads: int, limit: int) -> str:
    """One picture per (b, h); ``counts(b, h)`` gives full and partial block counts per group."""
    limit = as_int(limit, "limit", minimum=0, expected="a non-negative int (pictures to show)")
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
