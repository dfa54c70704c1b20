"""triton-attn: fused, block-sparse attention kernels written in Triton.

Write a ``mask_mod(b, h, q_idx, kv_idx)`` (and optionally a ``score_mod``), build a
``BlockMask`` with ``create_block_mask``, and call ``attention``.
"""

from .api import attention, paged_attention
from .masks import BlockMask, CompactBlockMask, create_block_mask, create_mask
from .paged_cache import PagedKVCache

__version__ = "0.1.0"

__all__ = ["attention", "paged_attention", "PagedKVCache", "create_block_mask", "create_mask", "BlockMask", "CompactBlockMask", "__version__"]
