"""The checks every entry point runs on its tensors, BlockMask and mods before anything is launched.

Each raises ``TypeError`` / ``ValueError`` naming the argument at fault and what was expected
(README, "Errors and guarantees").
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional

import torch

from ..dropout import check_dropout_p
from ..masks.block_mask import BlockMask
from ..masks.block_mask_flex import QUERY_SLICED_MESSAGE, is_query_sliced
from ..masks.closure import captured_tensors
from ..masks.evaluate import mod_name
from ..masks.scalars import as_float

__all__ = ["SUPPORTED_DTYPES", "MAX_HEAD_DIM", "PAGE_SIZE_MULTIPLE", "describe", "validate_tensors",
           "validate_scale", "validate_autotune", "validate_dropout", "broadcast_kv_batch", "validate_block_mask",
           "validate_mod_devices",
           "validate_paged", "validate_paged_cache", "validate_paged_query", "validate_paged_heads",
           "validate_paged_layout", "validate_paged_values", "assert_paged_values_async"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ACCEPTED_DTYPES = SUPPORTED_DTYPES + (torch.float64,)  # float64: the torch backend only (dispatch.plan_call)
MAX_HEAD_DIM = 256


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def validate_tensors(query, key, value, enable_gqa: bool) -> None:
    """query [B, Hq, Lq, D], key [B or 1, Hkv, Lkv, D], value [B or 1, Hkv, Lkv, Dv]: one dtype and device,
    Hq a multiple of Hkv (``enable_gqa`` when they differ). Runs on every call: each shape is read once."""
    for name, t, layout in (("query", query, "[B, Hq, Lq, D]"), ("key", key, "[B, Hkv, Lkv, D]"),
                            ("value", value, "[B, Hkv, Lkv, Dv]")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor {layout}, got {t.dim()}-D with shape {tuple(t.shape)}")
        if t.dtype not in ACCEPTED_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if 0 in t.shape:
            raise ValueError(f"{name} must not have an empty dimension, got shape {tuple(t.shape)}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"query, key and value must share one dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if not (query.device == key.device == value.device):
        raise ValueError(f"query, key and value must be on one device, got {query.device}, {key.device}, "
                         f"{value.device}")
    batch, q_heads, _, head_dim = query.shape
    key_batch, kv_heads, kv_len, key_dim = key.shape
    value_batch, value_heads, value_len, value_dim = value.shape
    if key_batch not in (1, batch) or value_batch not in (1, batch):
        raise ValueError(f"batch sizes differ: query has B={batch}, key {key_batch}, value {value_batch} "
                         f"(key/value batch must be B or 1, which broadcasts over the query's batch)")
    if kv_heads != value_heads:
        raise ValueError(f"key and value must have the same number of heads, got {kv_heads} and {value_heads}")
    if kv_len != value_len:
        raise ValueError(f"key and value must have the same length Lkv, got {kv_len} and {value_len}")
    if key_dim != head_dim:
        raise ValueError(f"query and key must have the same head_dim D, got {head_dim} and {key_dim}")
    for name, dim in (("query/key head_dim D", head_dim), ("value head_dim Dv", value_dim)):
        if dim > MAX_HEAD_DIM:
            raise ValueError(f"{name} must be at most {MAX_HEAD_DIM}, got {dim}")
    if q_heads != kv_heads:
        if q_heads % kv_heads != 0:
            raise ValueError(f"GQA needs query heads Hq={q_heads} to be a multiple of key/value heads Hkv={kv_heads}")
        if not enable_gqa:
            raise ValueError(f"query has Hq={q_heads} heads but key/value have Hkv={kv_heads}; "
                             "pass enable_gqa=True for grouped-query attention")


def validate_scale(scale, query: torch.Tensor) -> float:
    """The softmax scale: 1/sqrt(D) for None, else ``scale`` as a finite float."""
    if scale is None:
        return 1.0 / math.sqrt(query.shape[-1])
    return as_float(scale, "scale", expected="a finite float or None")


def validate_autotune(autotune) -> None:
    if autotune is not None and not isinstance(autotune, bool):
        raise TypeError(f"autotune must be True, False or None, got {autotune!r}")


def validate_dropout(dropout_p, return_dropout_mask) -> float:
    """``dropout_p`` as a float in [0, 1) (``dropout.check_dropout_p``) and ``return_dropout_mask`` a bool."""
    if not isinstance(return_dropout_mask, bool):
        raise TypeError(f"return_dropout_mask must be a bool, got {type(return_dropout_mask).__name__}")
    return check_dropout_p(dropout_p)


def broadcast_kv_batch(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """Key or value ``[1, Hkv, Lkv, D]`` as a stride-0 view ``[batch, Hkv, Lkv, D]`` (no copy; its gradient
    is summed over the batch by autograd), as FlexAttention broadcasts K/V over the query's batch."""
    return tensor if tensor.shape[0] == batch else tensor.expand(batch, *tensor.shape[1:])


def validate_block_mask(block_mask, query, key) -> BlockMask:
    if not isinstance(block_mask, BlockMask):
        if type(block_mask).__name__ == "BlockMask" and hasattr(block_mask, "kv_num_blocks"):
            block_mask = BlockMask.from_flex(block_mask)  # a FlexAttention BlockMask
        else:
            raise TypeError(f"block_mask must be a triton_attn.BlockMask (from create_block_mask) or None, "
                            f"got {type(block_mask).__name__}")
    if is_query_sliced(block_mask.mask_mod):
        raise RuntimeError(QUERY_SLICED_MESSAGE)
    q_len, kv_len = query.shape[2], key.shape[2]
    if block_mask.seq_lengths != (q_len, kv_len):
        larger = block_mask.seq_lengths[0] >= q_len and block_mask.seq_lengths[1] >= kv_len
        remedy = (f"crop it with block_mask._adjust({q_len}, {kv_len}) (exact, the upper-left corner) or rebuild it "
                  "with create_block_mask") if larger else "rebuild it with create_block_mask"
        raise ValueError(f"block_mask was built for Q_LEN={block_mask.seq_lengths[0]}, "
                         f"KV_LEN={block_mask.seq_lengths[1]} but query has Lq={q_len} and key has Lkv={kv_len}; "
                         f"{remedy}")
    mask_batch, mask_heads = block_mask.shape[:2]
    batch, q_heads = query.shape[:2]
    if 1 < mask_batch < batch:
        raise ValueError(f"block_mask has batch size {mask_batch}; expected 1 (broadcast) or at least query's "
                         f"B={batch}")
    if 1 < mask_heads < q_heads:
        raise ValueError(f"block_mask has {mask_heads} heads; expected 1 (broadcast) or at least query's Hq={q_heads}")
    if mask_batch > batch or mask_heads > q_heads:
        # As FlexAttention: query batch b / head h reads the mask's entry b % B_mask / h % H_mask, here the
        # first B / Hq entries (one sliced mask per mask and shape, whose mask_mod is the original).
        rows, heads = min(mask_batch, batch), min(mask_heads, q_heads)
        block_mask = block_mask.derived(f"leading_{rows}x{heads}", lambda: block_mask[:rows, :heads])
    if block_mask.device != query.device:
        block_mask = block_mask.to(query.device)
    if torch.compiler.is_compiling():  # value checks read the device; a compiled graph cannot (see README)
        return block_mask
    return block_mask.validate()  # once per mask (cached on it): lists inside the tile grid


def validate_mod_devices(mod: Optional[Callable], what: str, device: torch.device) -> None:
    if mod is None:
        return
    if not callable(mod):
        raise TypeError(f"{what} must be callable or None, got {type(mod).__name__}")
    for tensor in captured_tensors(mod):
        if tensor.device != device:
            raise ValueError(f"{what} {mod_name(mod)!r} captures a tensor on {tensor.device} "
                             f"(shape {tuple(tensor.shape)}) but query is on {device}; move it to {device}")


PAGE_SIZE_MULTIPLE = 16  # the smallest key tile of the kernels


def _check_tensor(name: str, t, layout: str, device: Optional[torch.device]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    rank = layout.count(",") + 1
    if t.dim() != rank:
        raise ValueError(f"{name} must be a {rank}-D tensor {layout}, got {t.dim()}-D with shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on query's device {device}, got {t.device}")


def validate_paged_cache(key_cache, value_cache, device: Optional[torch.device] = None) -> None:
    """key_cache [num_pages, Hkv, page_size, D] and value_cache [num_pages, Hkv, page_size, Dv]: one dtype,
    page_size a multiple of ``PAGE_SIZE_MULTIPLE``, head dims at most ``MAX_HEAD_DIM`` (shapes only)."""
    for name, t, layout in (("key_cache", key_cache, "[num_pages, Hkv, page_size, D]"),
                            ("value_cache", value_cache, "[num_pages, Hkv, page_size, Dv]")):
        _check_tensor(name, t, layout, device)
        if t.dtype not in ACCEPTED_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if any(s == 0 for s in t.shape):
            raise ValueError(f"{name} must not have an empty dimension, got shape {tuple(t.shape)}")
    if key_cache.dtype != value_cache.dtype:
        raise TypeError(f"key_cache and value_cache must share one dtype, got {key_cache.dtype}, {value_cache.dtype}")
    if key_cache.device != value_cache.device:
        raise ValueError(f"key_cache and value_cache must be on one device, got {key_cache.device}, "
                         f"{value_cache.device}")
    num_pages, kv_heads, page_size, _ = key_cache.shape
    if tuple(value_cache.shape[:3]) != (num_pages, kv_heads, page_size):
        raise ValueError(f"value_cache must be [num_pages, Hkv, page_size, Dv] = [{num_pages}, {kv_heads}, "
                         f"{page_size}, Dv] like key_cache, got shape {tuple(value_cache.shape)}")
    for name, dim in (("key_cache head_dim D", key_cache.shape[3]), ("value_cache head_dim Dv", value_cache.shape[3])):
        if dim > MAX_HEAD_DIM:
            raise ValueError(f"{name} must be at most {MAX_HEAD_DIM}, got {dim}")
    if page_size % PAGE_SIZE_MULTIPLE:
        raise ValueError(f"key_cache page_size (dim 2) must be a multiple of {PAGE_SIZE_MULTIPLE}, got {page_size}")


def validate_paged_query(query, key_cache, value_cache) -> None:
    """query [B, Hq, Lq, D] against the caches (validated): dtype, device, head_dim, GQA ratio (shapes only)."""
    _check_tensor("query", query, "[B, Hq, Lq, D]", None)
    if query.dtype not in ACCEPTED_DTYPES:
        raise TypeError(f"query must be float16, bfloat16 or float32, got {query.dtype}")
    if any(s == 0 for s in query.shape):
        raise ValueError(f"query must not have an empty dimension, got shape {tuple(query.shape)}")
    if query.dtype != key_cache.dtype:
        raise TypeError(f"query, key_cache and value_cache must share one dtype, got {query.dtype}, "
                        f"{key_cache.dtype}, {value_cache.dtype}")
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache)):
        if t.device != query.device:
            raise ValueError(f"{name} must be on query's device {query.device}, got {t.device}")
    validate_paged_heads(query.shape[1], query.shape[3], key_cache)


def validate_paged_heads(q_heads: int, head_dim: int, key_cache) -> None:
    kv_heads, key_dim = key_cache.shape[1], key_cache.shape[3]
    if key_dim != head_dim:
        raise ValueError(f"query and key_cache must have the same head_dim D, got {head_dim} and {key_dim}")
    if q_heads % kv_heads:
        raise ValueError(f"query heads Hq={q_heads} must be a multiple of the cache's key/value heads Hkv={kv_heads}")


def validate_paged_layout(page_table, kv_lens, batch: Optional[int], device: torch.device) -> None:
    """page_table int32 [B, max_pages] and kv_lens int32 [B] on ``device`` (shapes only); batch: the
    query's B when known."""
    for name, t, layout in (("page_table", page_table, "int32 [B, max_pages]"), ("kv_lens", kv_lens, "int32 [B]")):
        _check_tensor(name, t, layout, device)
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
    if batch is not None and (page_table.shape[0] != batch or kv_lens.shape[0] != batch):
        raise ValueError(f"page_table [B, max_pages] and kv_lens [B] must have query's batch size B={batch}, "
                         f"got page_table {tuple(page_table.shape)} and kv_lens {tuple(kv_lens.shape)}")
    if page_table.shape[0] != kv_lens.shape[0]:
        raise ValueError(f"page_table [B, max_pages] and kv_lens [B] must have one batch size B, got page_table "
                         f"{tuple(page_table.shape)} and kv_lens {tuple(kv_lens.shape)}")
    if page_table.shape[0] == 0:
        raise ValueError("page_table and kv_lens must hold at least one sequence, got B=0")
    if page_table.shape[1] == 0:
        raise ValueError("page_table must have at least one page per sequence, got max_pages=0")


def _bad_pages(page_table, lengths, *, num_pages: int, page_size: int):
    """bool [B, max_pages]: the table slots a sequence of ``lengths`` (int64 [B]) uses that name no page."""
    pages_used = (lengths + page_size - 1) // page_size                                     # [B]
    in_use = torch.arange(page_table.shape[1], device=page_table.device) < pages_used.unsqueeze(1)
    return in_use & ((page_table < 0) | (page_table >= num_pages))


def validate_paged_values(page_table, kv_lens, *, num_pages: int, page_size: int, q_len: int) -> List[int]:
    """The values of the page table and lengths: each kv_lens[b] in [q_len, max_pages * page_size], and
    every page a sequence uses in [0, num_pages). One small device-to-host read; returns kv_lens as ints."""
    capacity = page_table.shape[1] * page_size
    lengths = kv_lens.long()
    bad_page = _bad_pages(page_table, lengths, num_pages=num_pages, page_size=page_size)
    # One read: the lengths and the first bad (b, slot) of the table (-1 when none).
    flat_bad = torch.where(bad_page.flatten(), torch.arange(bad_page.numel(), device=bad_page.device), bad_page.numel())
    first_bad = flat_bad.min() if flat_bad.numel() else torch.zeros((), dtype=torch.long, device=lengths.device)
    values = torch.cat([lengths, first_bad.view(1)]).tolist()
    host_lengths, first_bad = values[:-1], values[-1]
    longest, shortest = max(host_lengths), min(host_lengths)
    if longest > capacity:
        worst = host_lengths.index(longest)
        raise ValueError(f"kv_lens[{worst}]={longest} exceeds the page table's capacity max_pages * page_size = "
                         f"{page_table.shape[1]} * {page_size} = {capacity}")
    if shortest < q_len:
        worst = host_lengths.index(shortest)
        raise ValueError(f"kv_lens[{worst}]={shortest} is shorter than the query (Lq={q_len}): the query rows are "
                         "the last Lq tokens of each sequence, so kv_lens must count them")
    if first_bad < bad_page.numel():
        b, j = divmod(first_bad, page_table.shape[1])
        raise ValueError(f"page_table[{b}, {j}]={int(page_table[b, j])} is not a page of key_cache "
                         f"(expected 0 <= page < num_pages={num_pages}); sequence {b} uses its first "
                         f"{-(-host_lengths[b] // page_size)} pages")
    return host_lengths


def assert_paged_values_async(page_table, kv_lens, *, num_pages: int, page_size: int, q_len: int) -> None:
    """The checks of ``validate_paged_values`` as a device-side assertion: nothing is read on the host (a
    CUDA graph can capture it); a violation raises at the next synchronization (on CPU, at once)."""
    capacity = page_table.shape[1] * page_size
    lengths = kv_lens.long()
    bad_page = _bad_pages(page_table, lengths, num_pages=num_pages, page_size=page_size)
    valid = (lengths <= capacity).all() & (lengths >= q_len).all() & ~bad_page.any()
    torch._assert_async(valid, f"paged attention: kv_lens must lie in [Lq={q_len}, max_pages * page_size = "
                               f"{capacity}] and every page a sequence uses in [0, num_pages={num_pages}) "
                               "(checked on the device: plan_paged / update with check=False)")


def validate_paged(query, key_cache, value_cache, page_table, kv_lens) -> List[int]:
    """Shapes, dtypes and devices of a ``paged_attention`` call, then the values of the page table and
    lengths (one small device-to-host read). Returns kv_lens as Python ints."""
    _check_tensor("query", query, "[B, Hq, Lq, D]", None)
    validate_paged_cache(key_cache, value_cache, query.device)
    validate_paged_query(query, key_cache, value_cache)
    validate_paged_layout(page_table, kv_lens, query.shape[0], query.device)
    return validate_paged_values(page_table, kv_lens, num_pages=key_cache.shape[0], page_size=key_cache.shape[2],
                                 q_len=query.shape[2])
