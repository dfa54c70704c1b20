"""FlashAttention-2's ``flash_attn_with_kvcache`` over our paged decode path.

A drop-in for ``flash_attn.flash_attn_with_kvcache`` (same arguments, same semantics, our own code): the
new keys and values are written into the cache in place (``write_paged_kv``), then the query attends
over the cache through a ``plan_paged`` plan. FlashAttention-2's conventions map onto the paged ones
directly: its query rows are bottom-right aligned (row i at key position ``seqlen_k - Lq + i``), which is
where a paged call puts them when ``kv_lens = cache_seqlens + L_new``; its causal / window / softcap /
ALiBi semantics are the ``masks/flash.py`` mods at logical positions (offset 0).

Layouts: FlashAttention's cache is ``[pages, page, Hkv, D]`` (a paged ``[num_blocks, page_block_size, Hkv,
D]``, or a contiguous ``[B_cache, L_cache, Hkv, D]`` seen as one page per cache row); ours is ``[pages,
Hkv, page, D]``, taken as a transposed view (the kernels and the torch backend read K/V through their
strides), so the cache is never copied.
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Tuple

import torch

from ..dispatch import choose_backend
from ..masks.flash import alibi_table, flash_mask_mod, flash_score_mod, flash_window
from ..masks.library import full_mask
from ..masks.paged import PAGED_KV_BLOCK_SIZE
from ..masks.scalars import as_float, as_int
from .checks import MAX_HEAD_DIM, PAGE_SIZE_MULTIPLE, SUPPORTED_DTYPES
from .paged import plan_paged, write_paged_kv

__all__ = ["flash_attn_with_kvcache", "apply_rotary"]


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False,
                            *, backend: Optional[str] = None):
    """Attention of ``q`` over a KV cache, after appending ``k`` / ``v`` to it in place (FlashAttention-2's).

    q: [B, Lq, H, D]. k_cache / v_cache: [B_cache, L_cache, Hkv, D / Dv] (one row per sequence; row b, or
    row ``cache_batch_idx[b]``), or with ``block_table`` (int32 [B, max_blocks_per_seq]) pages
    [num_blocks, page_block_size, Hkv, D / Dv]; page_block_size and a row-cache's L_cache must be multiples
    of 16 (our pages' rule; FlashAttention-2 asks 256 of its pages). H a multiple of Hkv (GQA / MQA).
    k / v: [B, L_new, Hkv, D / Dv] new tokens, written into the cache at positions ``cache_seqlens[b]`` ..
    ``cache_seqlens[b] + L_new - 1`` before attention (needs ``cache_seqlens``).
    cache_seqlens: int, or int32 / int64 [B], the tokens already in the cache (None: all L_cache, or all
    ``max_blocks_per_seq * page_block_size``). cache_leftpad: int32 [B], the first valid position of each
    sequence (keys before it are not attended; 0 <= cache_leftpad[b] <= cache_seqlens[b]); any layout.
    Sequence b sees keys ``[cache_leftpad[b], seqlen_k)``, ``seqlen_k = cache_seqlens[b] + L_new``; its
    query row i sits at key position ``i + seqlen_k - Lq`` (bottom-right), which ``causal``, ``window_size``
    (left, right; -1 unbounded), ``softcap`` (> 0: ``softcap * tanh(score / softcap)`` on the scaled score)
    and ``alibi_slopes`` (float32 [H] or [B, H]: ``score -= slope * |i + seqlen_k - Lq - j|``) refer to.
    rotary_cos / rotary_sin: [seqlen_ro, rotary_dim / 2], only with k / v: the new keys are rotated at
    their positions, the query rows at ``cache_seqlens[b] + i`` when causal or a window is set, else all
    at ``cache_seqlens[b]``; ``rotary_interleaved`` rotates pairs (0, 1), (2, 3) ..., else (d, d +
    rotary_dim / 2) (GPT-NeoX); dims past rotary_dim are left alone. Positions past seqlen_ro read its
    last row (the caller must make it long enough, as in FlashAttention-2). q and the caller's k are not
    changed: the rotated copies are new tensors.
    softmax_scale: None for 1 / sqrt(D). num_splits: 0 or any value is a hint only: the plan chooses its
    split count from the device and the mask (``plan_paged`` has no override) and merges splits exactly,
    so the result does not depend on it. backend: "triton", "interpret", "torch", or None (as
    ``paged_attention``).

    Returns out [B, Lq, H, Dv] in q's dtype (and lse [B, H, Lq] float32, natural log, with
    ``return_softmax_lse``). A query row that sees no key gets out 0 and lse -inf (FlashAttention-2
    returns +inf there in some of its kernels). Inference only: no backward (as FlashAttention-2's); a
    call with inputs requiring grad is an error. Validates the lengths, page / row indices and left pads
    with one small device-to-host read, before anything is written.
    """
    problem = _validate(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                        cache_leftpad, block_table)
    device = q.device
    batch, q_len, q_heads, head_dim = q.shape
    scale = (1.0 / math.sqrt(head_dim) if softmax_scale is None
             else as_float(softmax_scale, "softmax_scale", expected="a finite float or None"))
    left, right = flash_window(causal, window_size)
    slopes = alibi_table(alibi_slopes, batch, q_heads, device)
    score_mod = flash_score_mod(softcap, slopes)   # validates softcap
    as_int(num_splits, "num_splits", minimum=0, expected="an int >= 0 (0: our heuristic)")
    for name, flag in (("rotary_interleaved", rotary_interleaved), ("return_softmax_lse", return_softmax_lse)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    chosen = choose_backend(backend, device)        # before the cache is written: a bad backend changes nothing

    new_len = 0 if k is None else k.shape[1]
    seqlens = problem.seqlens
    kv_lens = (seqlens + new_len).to(torch.int32)                                           # seqlen_k, [B]
    lengths = _read_and_check(problem, kv_lens, new_len)

    page_table, plan_lens, mask_mod = _logical_layout(problem, kv_lens, min(lengths), q_len, left, right)
    plan = plan_paged(page_table, plan_lens, problem.key_pages, problem.value_pages, num_q_heads=q_heads,
                      q_len=q_len, mask_mod=mask_mod, score_mod=score_mod, scale=scale, backend=chosen, check=False)

    if k is not None:
        if rotary_cos is not None:
            k = apply_rotary(k, rotary_cos, rotary_sin, _positions(seqlens, new_len, per_row=True),
                             interleaved=rotary_interleaved)
        write_paged_kv(problem.key_pages, problem.value_pages, k.transpose(1, 2), v.transpose(1, 2),
                       problem.page_table, kv_lens)
        if rotary_cos is not None:
            per_row = left is not None or right is not None           # causal or a window
            q = apply_rotary(q, rotary_cos, rotary_sin, _positions(seqlens, q_len, per_row=per_row),
                             interleaved=rotary_interleaved)
    out, lse = plan.run(q.transpose(1, 2), problem.key_pages, problem.value_pages, return_lse=True)
    out = out.transpose(1, 2).contiguous()                                                  # [B, Lq, H, Dv]
    return (out, lse) if return_softmax_lse else out


def _logical_layout(problem: _Problem, kv_lens: torch.Tensor, shortest: int, q_len: int, left: Optional[int],
                    right: Optional[int]):
    """(page table, kv_lens, mask_mod) of the plan: positions as the paged path counts them.

    The paged plan puts query rows at the last Lq positions, so it needs seqlen_k >= Lq. A shorter sequence
    (FlashAttention-2 allows it: its first rows sit before key 0) is moved right by whole pages of nothing:
    leading table slots that name page 0, hidden by the mask's key start; positions shift, distances (all
    the mods read) do not. The shift is a whole number of the kernels' key blocks too, so those blocks are
    empty in the plan's BlockMask and never read (a masked key that is read still meets weight 0, and
    ``0 * nan`` would be NaN if page 0 held one)."""
    batch = kv_lens.shape[0]
    page_size = problem.key_pages.shape[2]
    unit = page_size * PAGED_KV_BLOCK_SIZE // math.gcd(page_size, PAGED_KV_BLOCK_SIZE)
    shift = -(-max(0, q_len - shortest) // unit) * unit
    key_start, page_table, plan_lens = problem.leftpad, problem.page_table, kv_lens
    if shift:
        page_table = torch.cat([page_table.new_zeros(batch, shift // page_size), page_table], dim=1)
        plan_lens = kv_lens + shift
        key_start = (torch.zeros_like(kv_lens) if key_start is None else key_start.to(torch.int32)) + shift
    if left is None and right == 0 and key_start is None:
        return page_table, plan_lens, None    # the paged default: causal, in closed form
    return page_table, plan_lens, flash_mask_mod(left, right, key_start=key_start) or full_mask


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, *,
                 interleaved: bool) -> torch.Tensor:
    """x [B, L, heads, D] rotated at ``positions`` (int64 [B, L]) by cos / sin [seqlen_ro, rotary_dim / 2],
    as a new tensor in x's dtype (computed in float32). interleaved: pairs (2d, 2d + 1), else (d, d +
    rotary_dim / 2). Dims past rotary_dim are copied unchanged; positions are clamped into the table."""
    half = cos.shape[1]
    rotary_dim = 2 * half
    positions = positions.clamp(0, cos.shape[0] - 1)
    cos_rows = cos[positions].float().unsqueeze(2)                                         # [B, L, 1, R/2]
    sin_rows = sin[positions].float().unsqueeze(2)
    rotated = x[..., :rotary_dim].float()
    if interleaved:
        first, second = rotated[..., 0::2], rotated[..., 1::2]
    else:
        first, second = rotated[..., :half], rotated[..., half:]
    new_first = first * cos_rows - second * sin_rows
    new_second = first * sin_rows + second * cos_rows
    if interleaved:
        rotated = torch.stack((new_first, new_second), dim=-1).flatten(-2)
    else:
        rotated = torch.cat((new_first, new_second), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., rotary_dim:]), dim=-1)


def _positions(seqlens: torch.Tensor, rows: int, *, per_row: bool) -> torch.Tensor:
    """int64 [B, rows]: ``seqlens[b] + i`` (per_row) or ``seqlens[b]`` for every row."""
    start = seqlens.long().unsqueeze(1)
    steps = torch.arange(rows, device=seqlens.device) if per_row else torch.zeros(rows, dtype=torch.long,
                                                                                    device=seqlens.device)
    return start + steps


class _Problem(NamedTuple):
    """What ``_validate`` derived: the caches as our pages [pages, Hkv, page, D / Dv] (views), the page
    table int32 [B, slots], cache_seqlens as int32 [B], cache_leftpad, and the number of pages (cache rows)."""

    key_pages: torch.Tensor
    value_pages: torch.Tensor
    page_table: torch.Tensor
    seqlens: torch.Tensor
    leftpad: Optional[torch.Tensor]
    paged: bool
    cache_rows: int


def _tensor(name: str, t, layout: str, device: torch.device, dtypes: Tuple[torch.dtype, ...], dtype_text: str):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    rank = layout.count(",") + 1
    if t.dim() != rank:
        raise ValueError(f"{name} must be a {rank}-D tensor {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {dtype_text}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {t.device}")


def _validate(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
              block_table) -> _Problem:
    """Every tensor argument's type, rank, dtype, device and shape (nothing is read from the device)."""
    floats = "float16, bfloat16 or float32"
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor [B, Lq, H, D], got {type(q).__name__}")
    device = q.device
    _tensor("q", q, "[B, Lq, H, D]", device, SUPPORTED_DTYPES, floats)
    if 0 in q.shape:
        raise ValueError(f"q must not have an empty dimension, got shape {tuple(q.shape)}")
    batch, _, q_heads, head_dim = q.shape
    paged = block_table is not None
    layout = "[num_blocks, page_block_size, Hkv, {}]" if paged else "[B_cache, L_cache, Hkv, {}]"
    for name, cache, dim in (("k_cache", k_cache, "D"), ("v_cache", v_cache, "Dv")):
        _tensor(name, cache, layout.format(dim), device, SUPPORTED_DTYPES, floats)
        if cache.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {cache.dtype}")
        if 0 in cache.shape:
            raise ValueError(f"{name} must not have an empty dimension, got shape {tuple(cache.shape)}")
    num_pages, page_size, kv_heads, key_dim = k_cache.shape
    value_dim = v_cache.shape[3]
    if tuple(v_cache.shape[:3]) != (num_pages, page_size, kv_heads):
        raise ValueError(f"v_cache must be {layout.format('Dv')} = [{num_pages}, {page_size}, {kv_heads}, Dv] like "
                         f"k_cache, got shape {tuple(v_cache.shape)}")
    if key_dim != head_dim:
        raise ValueError(f"q and k_cache must have the same head_dim D, got {head_dim} and {key_dim}")
    for name, dim in (("q / k_cache head_dim D", head_dim), ("v_cache head_dim Dv", value_dim)):
        if dim > MAX_HEAD_DIM:
            raise ValueError(f"{name} must be at most {MAX_HEAD_DIM}, got {dim}")
    if q_heads % kv_heads:
        raise ValueError(f"q's heads H={q_heads} must be a multiple of k_cache's heads Hkv={kv_heads} (GQA / MQA)")
    if page_size % PAGE_SIZE_MULTIPLE:
        what = "page_block_size (dim 1)" if paged else "L_cache (dim 1: one row is one page of our paged kernels)"
        raise ValueError(f"k_cache's {what} must be a multiple of {PAGE_SIZE_MULTIPLE}, got {page_size}")

    if paged:
        _tensor("block_table", block_table, "int32 [B, max_blocks_per_seq]", device, (torch.int32,), "int32")
        if block_table.shape[0] != batch or block_table.shape[1] == 0:
            raise ValueError(f"block_table must be [B={batch}, max_blocks_per_seq >= 1], got "
                             f"{tuple(block_table.shape)}")
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx cannot be used with block_table (a paged cache names its blocks per "
                             "sequence), as in FlashAttention-2")
        page_table = block_table
    elif cache_batch_idx is not None:
        _tensor("cache_batch_idx", cache_batch_idx, "int32 [B]", device, (torch.int32,), "int32")
        if cache_batch_idx.shape[0] != batch:
            raise ValueError(f"cache_batch_idx must be [B={batch}], got {tuple(cache_batch_idx.shape)}")
        page_table = cache_batch_idx.unsqueeze(1)
    else:
        if num_pages < batch:
            raise ValueError(f"k_cache holds B_cache={num_pages} rows, fewer than q's batch B={batch}; pass "
                             "cache_batch_idx to pick rows")
        page_table = torch.arange(batch, dtype=torch.int32, device=device).view(batch, 1)

    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (the new keys and values), or neither")
    if k is not None:
        for name, new, cache in (("k", k, k_cache), ("v", v, v_cache)):
            dim = "D" if name == "k" else "Dv"
            _tensor(name, new, f"[B, L_new, Hkv, {dim}]", device, SUPPORTED_DTYPES, floats)
            if new.dtype != cache.dtype:
                raise TypeError(f"{name} must have its cache's dtype {cache.dtype}, got {new.dtype}")
            expected = (batch, kv_heads, cache.shape[3])
            if (new.shape[0], new.shape[2], new.shape[3]) != expected or new.shape[1] == 0:
                raise ValueError(f"{name} must be [B={batch}, L_new >= 1, Hkv={kv_heads}, {cache.shape[3]}], got "
                                 f"{tuple(new.shape)}")
        if k.shape[1] != v.shape[1]:
            raise ValueError(f"k and v must have the same L_new, got {k.shape[1]} and {v.shape[1]}")
        if cache_seqlens is None:
            raise ValueError("cache_seqlens must be given with k and v (where the new tokens go), as in "
                             "FlashAttention-2")

    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together, or neither")
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos / rotary_sin need k and v (rotary embedding is applied to the new tokens "
                             "and the query when appending), as in FlashAttention-2")
        rotary_floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        for name, table in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            _tensor(name, table, "[seqlen_ro, rotary_dim / 2]", device, rotary_floats, "a floating-point tensor")
        if rotary_cos.shape != rotary_sin.shape or 0 in rotary_cos.shape:
            raise ValueError(f"rotary_cos and rotary_sin must share one non-empty shape [seqlen_ro, rotary_dim / 2], "
                             f"got {tuple(rotary_cos.shape)} and {tuple(rotary_sin.shape)}")
        if 2 * rotary_cos.shape[1] > head_dim:
            raise ValueError(f"rotary_dim = 2 * rotary_cos.shape[1] = {2 * rotary_cos.shape[1]} must be at most "
                             f"head_dim D={head_dim}")

    if cache_seqlens is None:
        seqlens = torch.full((batch,), page_table.shape[1] * page_size, dtype=torch.int32, device=device)
    elif isinstance(cache_seqlens, torch.Tensor):
        _tensor("cache_seqlens", cache_seqlens, "int32 [B]", device, (torch.int32, torch.int64), "int32 or int64")
        if cache_seqlens.shape[0] != batch:
            raise ValueError(f"cache_seqlens must be [B={batch}], got {tuple(cache_seqlens.shape)}")
        seqlens = cache_seqlens.to(torch.int32)
    else:
        count = as_int(cache_seqlens, "cache_seqlens", minimum=0,
                       expected="an int >= 0 or an int32 / int64 tensor [B]")
        seqlens = torch.full((batch,), count, dtype=torch.int32, device=device)
    if cache_leftpad is not None:
        _tensor("cache_leftpad", cache_leftpad, "int32 [B]", device, (torch.int32,), "int32")
        if cache_leftpad.shape[0] != batch:
            raise ValueError(f"cache_leftpad must be [B={batch}], got {tuple(cache_leftpad.shape)}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k_cache, v_cache, k, v)):
        raise NotImplementedError("flash_attn_with_kvcache has no backward pass (nor has FlashAttention-2's): call "
                                  "it under torch.no_grad() or with inputs that do not require grad")
    # FlashAttention's [pages, page, Hkv, D] as our [pages, Hkv, page, D]: a view, never a copy.
    return _Problem(k_cache.transpose(1, 2), v_cache.transpose(1, 2), page_table, seqlens, cache_leftpad, paged,
                    num_pages)


def _read_and_check(problem: _Problem, kv_lens: torch.Tensor, new_len: int) -> List[int]:
    """The values: cache_seqlens >= 0, seqlen_k = cache_seqlens + L_new within the cache, left pads in
    [0, cache_seqlens], and the blocks (rows) each sequence uses inside k_cache. One device-to-host read;
    returns seqlen_k per sequence as ints."""
    table = problem.page_table
    batch, slots = table.shape
    page_size = problem.key_pages.shape[2]
    capacity = slots * page_size
    lengths = kv_lens.long()
    out_of_range = (table < 0) | (table >= problem.cache_rows)
    if problem.paged:  # only the blocks a sequence uses must exist
        used = (lengths + page_size - 1) // page_size
        out_of_range = out_of_range & (torch.arange(slots, device=table.device) < used.unsqueeze(1))
    flat = out_of_range.flatten()
    first_bad = torch.where(flat, torch.arange(flat.numel(), device=flat.device), flat.numel()).min()
    leftpad = problem.leftpad.long() if problem.leftpad is not None else torch.zeros_like(lengths)
    values = torch.cat([problem.seqlens.long(), lengths, leftpad, first_bad.view(1)]).tolist()
    seqlens, seqlen_k, pads, first_bad = values[:batch], values[batch:2 * batch], values[2 * batch:-1], values[-1]
    for b in range(batch):
        if seqlens[b] < 0:
            raise ValueError(f"cache_seqlens[{b}]={seqlens[b]} must be >= 0")
        if seqlen_k[b] > capacity:
            where = (f"block_table holds max_blocks_per_seq * page_block_size = {slots} * {page_size} = {capacity}"
                     if problem.paged else f"a row of k_cache holds L_cache = {capacity}")
            raise ValueError(f"cache_seqlens[{b}] + L_new = {seqlens[b]} + {new_len} = {seqlen_k[b]} exceeds the "
                             f"cache: {where} positions")
        if not 0 <= pads[b] <= seqlens[b]:
            raise ValueError(f"cache_leftpad[{b}]={pads[b]} must lie in [0, cache_seqlens[{b}]={seqlens[b]}]")
    if first_bad < flat.numel():
        b, j = divmod(first_bad, slots)
        if problem.paged:
            raise ValueError(f"block_table[{b}, {j}]={int(table[b, j])} is not a block of k_cache (expected 0 <= "
                             f"block < num_blocks={problem.cache_rows}); sequence {b} uses its first "
                             f"{-(-seqlen_k[b] // page_size)} blocks")
        raise ValueError(f"cache_batch_idx[{b}]={int(table[b, 0])} is not a row of k_cache (expected 0 <= row < "
                         f"B_cache={problem.cache_rows})")
    return seqlen_k
