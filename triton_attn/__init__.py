"""triton-attn: fused, block-sparse attention kernels written in Triton.

Write a ``mask_mod(b, h, q_idx, kv_idx)`` (and optionally a ``score_mod``), build a
``BlockMask`` with ``create_block_mask``, and call ``attention``.

The public names load on first use (PEP 562), so ``import triton_attn`` -- and the
``triton-attn --help`` / ``--version`` command -- imports neither torch nor Triton.
"""

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "attention": ".api",
    "explain": ".api",
    "flex_attention": ".api",
    "paged_attention": ".api",
    "plan_paged": ".api",
    "PagedDecodePlan": ".api",
    "write_paged_kv": ".api",
    "flash_attn_func": ".api.flash",
    "flash_attn_varlen_func": ".api.flash",
    "flash_attn_with_kvcache": ".api.flash_kvcache",
    "PagedKVCache": ".paged_cache",
    "PagedBatch": ".paged_cache",
    "create_block_mask": ".masks",
    "create_mask": ".masks",
    "BlockMask": ".masks",
    "CompactBlockMask": ".masks",
}

__all__ = ["attention", "explain", "flex_attention", "paged_attention", "plan_paged", "PagedDecodePlan",
           "write_paged_kv", "flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache", "PagedKVCache",
           "PagedBatch",
           "create_block_mask", "create_mask", "BlockMask", "CompactBlockMask", "__version__"]


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'triton_attn' has no attribute {name!r}")
    # The API module first: importing it wires the GPU tile refiner into the mask compiler.
    importlib.import_module(".api", __name__)
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
