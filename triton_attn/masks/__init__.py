"""The mask side: mask_mods, score_mods, the BlockMask and the mask compiler. Knows no Triton."""

from .block_mask import BlockMask
from .closed_form import window_block_mask
from .closure import StructuredMod
from .compact import CompactBlockMask
from .compiler import create_block_mask, create_mask
from .library import (
                      alibi_score,
                      and_masks,
                      causal_mask,
                      chunked_mask,
                      document_mask,
                      full_mask,
                      not_mask,
                      or_masks,
                      padding_mask,
                      prefix_lm_mask,
                      sliding_window_mask,
                      softcap_score,
)
from .varlen import VarlenLayout, varlen_block_mask, varlen_layout

__all__ = [
    "BlockMask", "CompactBlockMask", "create_block_mask", "create_mask",
    "causal_mask", "full_mask", "sliding_window_mask", "chunked_mask", "prefix_lm_mask", "document_mask",
    "padding_mask", "and_masks", "or_masks", "not_mask", "softcap_score", "alibi_score",
    "window_block_mask", "StructuredMod",
    "varlen_block_mask", "varlen_layout", "VarlenLayout",
]
