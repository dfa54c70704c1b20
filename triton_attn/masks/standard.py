"""The BlockMasks that need no mask_mod: every tile full (a call without a mask).

``default_block_mask`` is what ``attention()`` uses when no ``block_mask`` is given (a few recent
shapes cached); ``full_block_mask`` builds one of any batch, heads and block size, which the kernels'
ahead-of-time builds, the commands and the benchmarks use too.
"""

from __future__ import annotations

import collections
from typing import Tuple, Union

import torch

from .block_mask import BlockMask
from .compiler import create_block_mask
from .library import full_mask

DEFAULT_BLOCK_SIZE = 128
COMPACT_TILES = 1 << 22  # above this many tiles, the no-mask BlockMask uses the compact layout

# (q_len, kv_len, device, block_size) -> the all-full BlockMask of a call without a mask (a few recent shapes).
_FULL_MASKS: "collections.OrderedDict" = collections.OrderedDict()
FULL_MASK_CACHE_SIZE = 16


def default_block_mask(q_len: int, kv_len: int, device) -> BlockMask:
    """The all-full BlockMask of a call without a mask, built once per shape and device."""
    if torch.compiler.is_compiling() or torch.device(device).type == "meta":
        return full_block_mask(1, 1, q_len, kv_len, device)
    cache_key = (q_len, kv_len, str(device), DEFAULT_BLOCK_SIZE)
    mask = _FULL_MASKS.get(cache_key)
    if mask is None:
        mask = _FULL_MASKS[cache_key] = full_block_mask(1, 1, q_len, kv_len, device)
        while len(_FULL_MASKS) > FULL_MASK_CACHE_SIZE:
            _FULL_MASKS.popitem(last=False)
    return mask


def full_block_mask(batch: int, heads: int, q_len: int, kv_len: int, device,
                    block_size: Union[int, Tuple[int, int]] = DEFAULT_BLOCK_SIZE) -> BlockMask:
    """A BlockMask with every tile full (plain attention), built without evaluating anything."""
    q_bs, kv_bs = (block_size, block_size) if isinstance(block_size, int) else block_size
    nq, nkv = -(-q_len // q_bs), -(-kv_len // kv_bs)
    if batch * heads * nq * nkv > COMPACT_TILES:
        # Long sequences: dense [NQ, NKV] index fields would be ~1 GB at 1M tokens; the compact
        # layout stores compressed rows (the interval compiler classifies every tile full at once).
        return create_block_mask(full_mask, None, None, q_len, kv_len, device=device, BLOCK_SIZE=(q_bs, kv_bs),
                                 layout="compact")
    full = torch.ones(batch, heads, nq, nkv, dtype=torch.bool, device=device)
    block_mask = BlockMask.from_block_maps(torch.zeros_like(full), full, BLOCK_SIZE=(q_bs, kv_bs),
                                           seq_lengths=(q_len, kv_len), mask_mod=None)
    block_mask.visits_every_tile = True  # lets mod checks be cached across calls (masks/safety.py)
    return block_mask
