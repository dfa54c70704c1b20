"""FlashAttention-2's ``flash_attn_func`` and ``flash_attn_varlen_func`` over ``attention()``.

Code written for the ``flash_attn`` package switches with one import
(``from triton_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache``) and runs on
every backend: the Triton kernels on CUDA, the PyTorch backend on CPU. The semantics are FlashAttention-2's
(``masks/flash.py``: bottom-right causal, windows around that diagonal, softcap before the mask, ALiBi) and
are pinned in docs/design.md ("FlashAttention-2 semantics"). Where we differ, the docstrings say so:

- a query row that sees no key gives output 0 and lse ``-inf`` (FlashAttention-2's kernels give ``+inf``);
- ``return_attn_probs=True`` returns ``(out, softmax_lse, None)``: FlashAttention-2 also returns None there
  unless ``dropout_p > 0``, where it returns its debug probability matrix, which we do not build: that
  combination raises (``return_dropout_mask=True`` gives the dropout pattern instead);
- float32 inputs are accepted (FlashAttention-2 takes float16 / bfloat16 only);
- ``deterministic`` needs no action: our backward has no atomics, every call is deterministic.

Layout: q ``[B, Lq, H, D]`` is viewed as ``[B, H, Lq, D]`` (a transpose, never a copy: a slice of a packed
qkv tensor runs as it is); the output is returned contiguous ``[B, Lq, H, Dv]``.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections import OrderedDict
from typing import Callable, Optional, Tuple

import torch

from ..dispatch import choose_backend
from ..dropout import check_dropout_p
from ..masks.block_mask import BlockMask
from ..masks.compiler import create_block_mask
from ..masks.flash import (
    alibi_table,
    flash_mask_mod,
    flash_score_mod,
    flash_window,
    packed_flash_score_mod,
)
from ..masks.library import causal_mask, sliding_window_mask
from ..masks.varlen import varlen_layout
from .attention import attention

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func"]

FLASH_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_CACHED = 64  # BlockMasks / score_mods kept per process for repeated shapes (a training loop's)


def _check_flash_tensor(name: str, t, layout: str, dims: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in FLASH_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        # FlashAttention-2 requires it too; the kernels read head_dim rows.
        raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {tuple(t.stride())}")


def _check_heads(q_heads: int, kv_heads: int) -> None:
    if q_heads % kv_heads != 0:
        raise ValueError(f"the number of heads in q ({q_heads}) must be a multiple of the number in k/v ({kv_heads})")


def _check_scale(softmax_scale, head_dim: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))
            or not math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale must be a finite float or None, got {softmax_scale!r}")
    return float(softmax_scale)


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _check_probs_request(return_attn_probs: bool, dropout_p: float) -> None:
    _check_flag("return_attn_probs", return_attn_probs)
    if return_attn_probs and dropout_p > 0:
        raise NotImplementedError(
            "return_attn_probs=True with dropout_p > 0: FlashAttention-2 returns its debug attention-probability "
            "matrix there, which triton_attn does not build; pass return_dropout_mask=True for the dropout "
            "pattern, or return_attn_probs=False")


# -- cached masks and score_mods (a training loop calls with the same shapes every step) --------------------

@functools.lru_cache(maxsize=MAX_CACHED)
def _fixed_length_block_mask(left: Optional[int], right: Optional[int], q_len: int, kv_len: int,
                             device: torch.device) -> BlockMask:
    offset = kv_len - q_len
    if offset == 0 and right == 0:  # the library's causal family, which the CPU backend recognizes
        mask_mod = causal_mask if left is None else sliding_window_mask(left + 1)
    else:
        mask_mod = flash_mask_mod(left, right, offset=offset)
    return create_block_mask(mask_mod, None, None, q_len, kv_len, device=device)


def fixed_length_block_mask(left: Optional[int], right: Optional[int], q_len: int, kv_len: int,
                            device: torch.device) -> Optional[BlockMask]:
    """The BlockMask of FlashAttention-2's mask for ``q_len`` queries and ``kv_len`` keys (None: every key
    visible), one per shape and device. Plain causal (Lq == Lk) uses the library's ``causal_mask``, which the
    CPU backend recognizes."""
    if left is None and right is None:
        return None
    return _fixed_length_block_mask(left, right, q_len, kv_len, device)


_SCORES: "OrderedDict[tuple, tuple]" = OrderedDict()  # key -> (weakref to the slopes or None, score_mod)


def _fixed_length_score_mod(softcap: float, alibi_slopes: Optional[torch.Tensor], batch: int, heads: int,
                            offset: int, device: torch.device) -> Optional[Callable]:
    """FlashAttention-2's score_mod, one object per (softcap, slopes tensor, shapes): a traced mod is reused
    while it is the same object, so a loop passing the same slopes traces once (the mod reads a view of the
    slopes, so their in-place changes are seen)."""
    key = (softcap, id(alibi_slopes), batch, heads, offset, device)
    found = _SCORES.get(key)
    if found is not None and (found[0] is None or found[0]() is alibi_slopes):
        _SCORES.move_to_end(key)
        return found[1]
    score_mod = flash_score_mod(softcap, alibi_table(alibi_slopes, batch, heads, device), offset=offset)
    _SCORES[key] = (None if alibi_slopes is None else weakref.ref(alibi_slopes), score_mod)
    if len(_SCORES) > MAX_CACHED:
        _SCORES.popitem(last=False)
    return score_mod


def _finish(out: torch.Tensor, lse: torch.Tensor, keep, return_attn_probs: bool, return_dropout_mask: bool):
    results = [out]
    if return_attn_probs:
        results += [lse, None]
    if return_dropout_mask:
        results.append(keep)
    return results[0] if len(results) == 1 else tuple(results)


def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                    softmax_scale: Optional[float] = None, causal: bool = False, window_size=(-1, -1),
                    softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None, deterministic: bool = False,
                    return_attn_probs: bool = False, *, backend: Optional[str] = None,
                    return_dropout_mask: bool = False):
    """FlashAttention-2's ``flash_attn_func``: q ``[B, Lq, H, D]``, k ``[B, Lk, Hkv, D]``, v ``[B, Lk, Hkv, Dv]``
    (MQA/GQA: H a multiple of Hkv; any strides with a contiguous head dim -- slices of a packed qkv are not copied).

    Query i sits at key position ``i + Lk - Lq`` (bottom-right). ``causal``: keys up to it.
    ``window_size=(left, right)``: keys in ``[i + Lk - Lq - left, i + Lk - Lq + right]``, -1 unbounded.
    ``softcap > 0``: ``softcap * tanh(s / softcap)`` of the scaled score, before the mask and ALiBi.
    ``alibi_slopes`` float32 ``[H]`` or ``[B, H]``: ``- slope * |i + Lk - Lq - j|`` added to the score.
    ``dropout_p``: attention dropout (training; pass 0.0 in evaluation), drawn from the device's generator
    (``torch.manual_seed`` fixes it). ``deterministic``: accepted, no action needed (no atomics anywhere).
    Returns out ``[B, Lq, H, Dv]``; with ``return_attn_probs=True`` ``(out, softmax_lse [B, H, Lq] float32, None)``
    (raises with dropout_p > 0, where FlashAttention-2 returns a debug probability matrix we do not build).
    A row that sees no key gives out 0 and lse ``-inf`` (FlashAttention-2: ``+inf``).
    Extensions: ``backend`` (as ``attention``); ``return_dropout_mask=True`` appends the keep-mask
    bool ``[B, H, Lq, Lk]`` the call used (for tests and debugging).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_flash_tensor(name, t, "[B, L, H, D]", 4)
    dropout_p = check_dropout_p(dropout_p)
    _check_probs_request(return_attn_probs, dropout_p)
    _check_flag("deterministic", deterministic)
    batch, _, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must agree in [B, Lk, Hkv], got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[0] != batch or k.shape[-1] != head_dim:
        raise ValueError(f"k must be [B, Lk, Hkv, D] = [{batch}, Lk, Hkv, {head_dim}] to match q "
                         f"{tuple(q.shape)}, got {tuple(k.shape)}")
    _check_heads(heads, kv_heads)
    scale = _check_scale(softmax_scale, head_dim)
    left, right = flash_window(causal, window_size)
    results = _attend_fixed(q, k, v, scale=scale, left=left, right=right, softcap=softcap, alibi_slopes=alibi_slopes,
                            dropout_p=dropout_p, backend=backend, return_dropout_mask=return_dropout_mask)
    out, lse = results[0], results[1]
    keep = results[2] if return_dropout_mask else None
    return _finish(out.transpose(1, 2).contiguous(), lse, keep, return_attn_probs, return_dropout_mask)


def _attend_fixed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, left: Optional[int],
                  right: Optional[int], softcap: float, alibi_slopes: Optional[torch.Tensor], dropout_p: float,
                  backend: Optional[str], return_dropout_mask: bool = False):
    """``attention()`` of q ``[B, Lq, H, D]``, k/v ``[B, Lk, Hkv, D]`` (checked) under FlashAttention-2's mask and
    scores: ``(out [B, H, Lq, Dv], lse [B, H, Lq])`` (+ the keep-mask when asked)."""
    batch, q_len, heads, _ = q.shape
    kv_len = k.shape[1]
    if left is not None and left >= kv_len:  # reaches past the first key from every row
        left = None
    block_mask = fixed_length_block_mask(left, right, q_len, kv_len, q.device)
    score_mod = _fixed_length_score_mod(softcap, alibi_slopes, batch, heads, kv_len - q_len, q.device)
    return attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                     score_mod=score_mod, scale=scale, enable_gqa=True, return_lse=True, backend=backend,
                     dropout_p=dropout_p, return_dropout_mask=return_dropout_mask)


def _check_cu_seqlens(name: str, cu_seqlens, total: int, device: torch.device) -> int:
    """cu_seqlens int32 ``[S + 1]`` on the device; returns S. Its values (0 first, non-decreasing, ``total``
    last) are checked on CPU tensors (free there); on a GPU they are the caller's duty, as in
    FlashAttention-2 (checking would read the device)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be an int32 tensor [batch + 1], got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must be an int32 tensor [batch + 1] (batch >= 1), got dtype {cu_seqlens.dtype} "
                         f"shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"{name} must be on the inputs' device {device}, got {cu_seqlens.device}")
    if device.type == "cpu":
        values = cu_seqlens.tolist()
        if values[0] != 0 or any(b < a for a, b in zip(values, values[1:])) or values[-1] != total:
            raise ValueError(f"{name} must start at 0, never decrease and end at the packed length {total}, got "
                             f"{values if len(values) <= 12 else values[:6] + ['...'] + values[-6:]}")
    return cu_seqlens.numel() - 1


def _check_max_seqlen(name: str, value, cu_seqlens: torch.Tensor) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0 (the longest sequence), got {value!r}")
    if cu_seqlens.device.type == "cpu":
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        if longest > value:
            raise ValueError(f"{name}={value} is below the longest sequence in the batch ({longest})")
    return value


def flash_attn_varlen_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           softmax_scale: Optional[float] = None, causal: bool = False, window_size=(-1, -1),
                           softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
                           deterministic: bool = False, return_attn_probs: bool = False,
                           block_table: Optional[torch.Tensor] = None, *, backend: Optional[str] = None,
                           return_dropout_mask: bool = False):
    """FlashAttention-2's ``flash_attn_varlen_func`` over packed sequences: q ``[total_q, H, D]``, k
    ``[total_k, Hkv, D]``, v ``[total_k, Hkv, Dv]``; sequence s is rows ``cu_seqlens_q[s]:cu_seqlens_q[s+1]`` of q
    and ``cu_seqlens_k[s]:cu_seqlens_k[s+1]`` of k/v (int32 ``[batch + 1]``); ``max_seqlen_q/k`` ints bounding the
    lengths.

    Nothing is padded and no ``[total, total]`` mask exists: the block layout comes from cu_seqlens in closed
    form on the device (``masks/varlen.py``, no host sync), and a query tile only visits its own sequences'
    key blocks. Within a sequence the semantics are ``flash_attn_func``'s (bottom-right causal per sequence,
    windows, softcap, ALiBi ``[H]`` or ``[batch, H]``, dropout). Returns out ``[total_q, H, Dv]``; with
    ``return_attn_probs=True`` ``(out, softmax_lse [H, total_q] float32, None)`` (raises with dropout_p > 0).
    ``block_table`` (paged K/V: k/v ``[num_blocks, page_block_size, Hkv, D]``, int32 ``[batch, max_blocks]``):
    the sequences' keys are gathered from their pages first (one copy of K/V, and one read of the packed key
    length from the device). ``backend`` / ``return_dropout_mask``: as ``flash_attn_func`` (the mask is
    ``[1, H, total_q, total_k]`` over packed positions).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        packed = block_table is None or name == "q"
        _check_flash_tensor(name, t, "[total, H, D]" if packed else "[num_blocks, page_block_size, Hkv, D]",
                            3 if packed else 4)
    dropout_p = check_dropout_p(dropout_p)
    _check_probs_request(return_attn_probs, dropout_p)
    _check_flag("deterministic", deterministic)
    total_q, heads, head_dim = q.shape
    if block_table is not None:
        k, v = _gather_pages(k, v, block_table, cu_seqlens_k, q.device)
    total_k, kv_heads = k.shape[0], k.shape[1]
    if k.shape[:2] != v.shape[:2] or k.shape[-1] != head_dim:
        raise ValueError(f"k must be [total_k, Hkv, D={head_dim}] and v [total_k, Hkv, Dv], got k {tuple(k.shape)} "
                         f"and v {tuple(v.shape)}")
    _check_heads(heads, kv_heads)
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    batch = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, total_q, q.device)
    if _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, total_k, q.device) != batch:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")
    max_seqlen_q = _check_max_seqlen("max_seqlen_q", max_seqlen_q, cu_seqlens_q)
    max_seqlen_k = _check_max_seqlen("max_seqlen_k", max_seqlen_k, cu_seqlens_k)
    scale = _check_scale(softmax_scale, head_dim)
    left, right = flash_window(causal, window_size)
    if q.device.type == "cpu" and not return_dropout_mask and choose_backend(backend, q.device) == "torch":
        runs = equal_length_runs(cu_seqlens_q, cu_seqlens_k)
        if len(runs) <= MAX_SEQUENCE_RUNS:
            out, lse = _attend_by_runs(runs, q, k, v, scale=scale, left=left, right=right, softcap=softcap,
                                       slopes=alibi_table(alibi_slopes, batch, heads, q.device), dropout_p=dropout_p)
            return _finish(out, lse, None, return_attn_probs, False)
    layout = varlen_layout(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, total_q=total_q, total_k=total_k,
                           window=(-1 if left is None else left, -1 if right is None else right),
                           **_layout_hints(cu_seqlens_q, cu_seqlens_k))
    slopes = alibi_table(alibi_slopes, batch, heads, q.device)
    score_mod = packed_flash_score_mod(softcap, slopes, layout.seq_of_query, layout.diagonal)
    packed = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, total, D] views
    results = attention(*packed, block_mask=layout.block_mask, score_mod=score_mod, scale=scale, enable_gqa=True,
                        return_lse=True, backend=backend, dropout_p=dropout_p, return_dropout_mask=return_dropout_mask)
    out, lse = results[0], results[1]
    keep = results[2] if return_dropout_mask else None
    return _finish(out[0].transpose(0, 1).contiguous(), lse[0], keep, return_attn_probs, return_dropout_mask)


# Runs of equal-length sequences up to which a CPU varlen call on the torch backend attends run by run.
MAX_SEQUENCE_RUNS = 64


def equal_length_runs(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor) -> list:
    """Consecutive sequences of equal (Lq, Lk), read from CPU ``cu_seqlens``: ``[(first sequence, count, first
    query row, Lq, first key, Lk)]``. Such a run is one ``[count, L, H, D]`` view of the packed tensors."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    runs: list = []
    for s in range(len(cq) - 1):
        lq, lk = cq[s + 1] - cq[s], ck[s + 1] - ck[s]
        if runs and runs[-1][3] == lq and runs[-1][5] == lk:
            first, count, q0, _, k0, _ = runs[-1]
            runs[-1] = (first, count + 1, q0, lq, k0, lk)
        else:
            runs.append((s, 1, cq[s], lq, ck[s], lk))
    return runs


def _attend_by_runs(runs: list, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                    left: Optional[int], right: Optional[int], softcap: float, slopes: Optional[torch.Tensor],
                    dropout_p: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """A packed batch on the torch backend (CPU, where ``cu_seqlens`` costs nothing to read), one ``attention()``
    call per run of equal-length sequences over ``[count, L, H, D]`` views: each takes the CPU backend's fastest
    exact route for its own (bottom-right) mask -- PyTorch's fused kernel for causal --, never a
    ``[total, total]`` problem. Returns out ``[total_q, H, Dv]`` (contiguous) and lse ``[H, total_q]``."""
    heads, value_dim = q.shape[1], v.shape[-1]
    outs, lses = [], []
    for first, count, q0, lq, k0, lk in runs:
        if lq == 0:
            continue
        if lk == 0:  # no key at all: the rows see nothing
            outs.append(q.new_zeros(count * lq, heads, value_dim))
            lses.append(torch.full((heads, count * lq), float("-inf"), dtype=torch.float32, device=q.device))
            continue
        qr = q[q0:q0 + count * lq].unflatten(0, (count, lq))
        kr, vr = (t[k0:k0 + count * lk].unflatten(0, (count, lk)) for t in (k, v))
        run_slopes = None if slopes is None else slopes[first:first + count]
        out, lse = _attend_fixed(qr, kr, vr, scale=scale, left=left, right=right, softcap=softcap,
                                 alibi_slopes=run_slopes, dropout_p=dropout_p, backend="torch")
        outs.append(out.transpose(1, 2).reshape(count * lq, heads, value_dim))
        lses.append(lse.transpose(0, 1).reshape(heads, count * lq))
    if not outs:
        return q.new_zeros(0, heads, value_dim), torch.zeros(heads, 0, dtype=torch.float32, device=q.device)
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1)


def _layout_hints(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor) -> dict:
    """Hints that narrow the layout's index lists (``masks/varlen.py``): on CPU, where reading cu_seqlens is free,
    whether both describe the same sequences and the shortest non-empty ones. On a GPU nothing is read: the same
    tensor object passed twice (self-attention packing) is recognized as such, other packings get the bound of
    any lengths (wider lists, the same result)."""
    if cu_seqlens_q.device.type != "cpu" or cu_seqlens_q is cu_seqlens_k:
        return {}
    if torch.equal(cu_seqlens_q, cu_seqlens_k):
        return {"same_sequences": True}
    hints = {}
    for name, cu in (("min_seqlen_q", cu_seqlens_q), ("min_seqlen_k", cu_seqlens_k)):
        lengths = cu[1:] - cu[:-1]
        lengths = lengths[lengths > 0]
        if lengths.numel():
            hints[name] = int(lengths.min())
    return hints


def _gather_pages(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table, cu_seqlens_k, device: torch.device
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Packed k/v ``[total_k, Hkv, D]`` gathered from paged caches ``[num_blocks, page_block_size, Hkv, D]``
    through ``block_table`` int32 ``[batch, max_blocks]``: key t of sequence s is at page
    ``block_table[s, t // page]``, row ``t % page``."""
    if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2:
        raise ValueError("block_table must be an int32 tensor [batch, max_blocks_per_seq], got "
                         f"{getattr(block_table, 'dtype', type(block_table).__name__)} "
                         f"{tuple(getattr(block_table, 'shape', ()))}")
    if block_table.device != device:
        raise ValueError(f"block_table must be on the inputs' device {device}, got {block_table.device}")
    if not isinstance(cu_seqlens_k, torch.Tensor) or cu_seqlens_k.dim() != 1:
        raise ValueError("cu_seqlens_k must be an int32 tensor [batch + 1]")
    if k_cache.shape != v_cache.shape[:3] + (k_cache.shape[3],):
        raise ValueError(f"k and v paged caches must agree in [num_blocks, page_block_size, Hkv], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if block_table.shape[0] != cu_seqlens_k.numel() - 1:
        raise ValueError(f"block_table must have one row per sequence ({cu_seqlens_k.numel() - 1}), got "
                         f"{block_table.shape[0]}")
    page = k_cache.shape[1]
    total_k = int(cu_seqlens_k[-1])  # the packed length sizes the gathered copy: one read
    starts = cu_seqlens_k[:-1].long()
    lengths = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
    sequence = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths, output_size=total_k)
    local = torch.arange(total_k, device=device) - starts[sequence]
    pages = block_table.long()[sequence, local // page]
    rows = local % page
    return k_cache[pages, rows], v_cache[pages, rows]


def flash_attn_qkvpacked_func(qkv: torch.Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                              causal: bool = False, window_size=(-1, -1), softcap: float = 0.0,
                              alibi_slopes: Optional[torch.Tensor] = None, deterministic: bool = False,
                              return_attn_probs: bool = False, **extensions):
    """FlashAttention-2's ``flash_attn_qkvpacked_func``: qkv ``[B, L, 3, H, D]``, run as ``flash_attn_func`` on its
    three slices (views: nothing is copied)."""
    _check_flash_tensor("qkv", qkv, "[B, L, 3, H, D]", 5)
    if qkv.shape[2] != 3:
        raise ValueError(f"qkv must be [B, L, 3, H, D], got shape {tuple(qkv.shape)}")
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal, window_size,
                           softcap, alibi_slopes, deterministic, return_attn_probs, **extensions)


def flash_attn_kvpacked_func(q: torch.Tensor, kv: torch.Tensor, dropout_p: float = 0.0,
                             softmax_scale: Optional[float] = None, causal: bool = False, window_size=(-1, -1),
                             softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
                             deterministic: bool = False, return_attn_probs: bool = False, **extensions):
    """FlashAttention-2's ``flash_attn_kvpacked_func``: kv ``[B, Lk, 2, Hkv, D]``, run as ``flash_attn_func``."""
    _check_flash_tensor("kv", kv, "[B, Lk, 2, Hkv, D]", 5)
    if kv.shape[2] != 2:
        raise ValueError(f"kv must be [B, Lk, 2, Hkv, D], got shape {tuple(kv.shape)}")
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs, **extensions)
