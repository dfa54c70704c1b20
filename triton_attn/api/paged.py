"""Attention of new query rows over a paged KV cache: ``plan_paged`` / ``PagedDecodePlan.run`` (plan once
per step, run every layer with no host read), ``paged_attention`` (one call), and ``write_paged_kv``
(the step's new keys and values into their pages, with device ops only)."""

from __future__ import annotations

from typing import Callable, List, Optional

import torch

from ..backends import run
from ..dispatch import grad_needed, plan_paged_call
from ..masks.scalars import as_int
from .checks import (
    assert_paged_values_async,
    validate_mod_devices,
    validate_paged,
    validate_paged_cache,
    validate_paged_heads,
    validate_paged_layout,
    validate_paged_query,
    validate_paged_values,
    validate_scale,
)

__all__ = ["paged_attention", "plan_paged", "PagedDecodePlan", "write_paged_kv"]


class PagedDecodePlan:
    """A paged attention call planned for one step of a batch: ``run`` it for every layer.

    Made by ``plan_paged``. It holds everything that depends on the batch composition (the checked page
    table and lengths, the block layout over logical positions, the split count, the tuned config, the
    split buffers), so ``run(query, key_cache, value_cache)`` reads nothing back from the device and
    allocates only its outputs: a step's layers can be captured in one CUDA graph. ``update(page_table,
    kv_lens)`` moves the plan to the next step in place (same shapes), which is what a captured graph
    replays with; the launch decisions depend on shapes only.

    Attributes: ``batch``, ``q_len``, ``num_q_heads``, ``num_kv_heads``, ``head_dim``, ``value_dim``,
    ``page_size``, ``num_pages``, ``dtype``, ``device``, ``scale``, ``route`` (``dispatch.Route``).
    """

    def __init__(self, route, prepared, *, batch: int, q_len: int, num_q_heads: int, key_cache: torch.Tensor,
                 value_cache: torch.Tensor, max_pages: int, scale: float):
        self.route, self._prepared, self.scale = route, prepared, scale
        self.batch, self.q_len, self.num_q_heads, self.max_pages = batch, q_len, num_q_heads, max_pages
        self.num_pages, self.num_kv_heads, self.page_size, self.head_dim = key_cache.shape
        self.value_dim, self.dtype, self.device = value_cache.shape[3], key_cache.dtype, key_cache.device
        self._checked: set = set()

    def __repr__(self) -> str:
        return (f"PagedDecodePlan(B={self.batch}, Lq={self.q_len}, Hq={self.num_q_heads}, Hkv={self.num_kv_heads}, "
                f"D={self.head_dim}, Dv={self.value_dim}, pages={self.num_pages}x{self.page_size}, "
                f"max_pages={self.max_pages}, {self.dtype}, {self.device}, route {self.route.token})")

    def update(self, page_table: torch.Tensor, kv_lens: torch.Tensor, *, check: bool = True) -> "PagedDecodePlan":
        """Move the plan to the next step: page_table int32 [B, max_pages] and kv_lens int32 [B] with the
        plan's shapes, copied into its buffers in place. ``check``: validate the values first (one small
        device read, as ``plan_paged``; False: a device-side assertion, raised at the next sync). Returns ``self``."""
        validate_paged_layout(page_table, kv_lens, self.batch, self.device)
        if tuple(page_table.shape) != (self.batch, self.max_pages):
            raise ValueError(f"page_table must keep the plan's shape [B, max_pages] = [{self.batch}, "
                             f"{self.max_pages}], got {tuple(page_table.shape)}; make a new plan with plan_paged")
        lengths = None
        if check:
            lengths = self._check_values(page_table, kv_lens)
        else:
            assert_paged_values_async(page_table, kv_lens, num_pages=self.num_pages, page_size=self.page_size,
                                      q_len=self.q_len)
        self._prepared.update(page_table, kv_lens, lengths)
        return self

    def _check_values(self, page_table: torch.Tensor, kv_lens: torch.Tensor) -> List[int]:
        return validate_paged_values(page_table, kv_lens, num_pages=self.num_pages, page_size=self.page_size,
                                     q_len=self.q_len)

    def run(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, *,
            return_lse: bool = False):
        """Attention of query [B, Hq, Lq, D] over one layer's pages, key_cache [num_pages, Hkv, page_size, D]
        and value_cache [num_pages, Hkv, page_size, Dv] (the plan's shapes, dtype and device). Returns out
        [B, Hq, Lq, Dv] (and lse [B, Hq, Lq] float32 with return_lse=True). Checks shapes only: no value of
        any tensor is read on the host."""
        try:  # a layout checked before is not checked again (every layer of a step has the plan's)
            layout = (query.shape, key_cache.shape, value_cache.shape, query.dtype, key_cache.dtype, value_cache.dtype,
                      query.device, key_cache.device, value_cache.device)
        except AttributeError:
            layout = None
        if layout is None or layout not in self._checked:
            self._check_layer(query, key_cache, value_cache)
            self._checked.add(layout)
        if self.route.backend != "torch" and grad_needed(query, key_cache, value_cache):
            plan_paged_call(self.dtype, self.device, needs_grad=True, backend=self.route.backend)  # raises
        out, lse = self._prepared.run(query, key_cache, value_cache)
        return (out, lse) if return_lse else out

    def _check_layer(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
        validate_paged_cache(key_cache, value_cache, self.device)
        validate_paged_query(query, key_cache, value_cache)
        expected = {"query": ((self.batch, self.num_q_heads, self.q_len, self.head_dim), query),
                    "key_cache": ((self.num_pages, self.num_kv_heads, self.page_size, self.head_dim), key_cache),
                    "value_cache": ((self.num_pages, self.num_kv_heads, self.page_size, self.value_dim), value_cache)}
        for name, (shape, tensor) in expected.items():
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name} must have the plan's shape {list(shape)}, got {list(tensor.shape)}; "
                                 "make a new plan with plan_paged for other shapes")
        if query.dtype != self.dtype:
            raise TypeError(f"query must have the plan's dtype {self.dtype}, got {query.dtype}")


def plan_paged(page_table: torch.Tensor, kv_lens: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
               *, num_q_heads: int, q_len: int = 1, mask_mod: Optional[Callable] = None,
               score_mod: Optional[Callable] = None, scale: Optional[float] = None, backend: Optional[str] = None,
               check: bool = True) -> PagedDecodePlan:
    """Plan a step of paged attention once, then ``run`` it for every layer (FlashInfer's plan / run).

    page_table: int32 [B, max_pages] (logical page j of sequence b is physical page ``page_table[b, j]``);
    kv_lens: int32 [B], each sequence's length including its ``q_len`` new query rows; key_cache /
    value_cache: one layer's pages [num_pages, Hkv, page_size, D / Dv] (every layer's must have these
    shapes, dtype and device); num_q_heads: Hq, a multiple of Hkv. mask_mod / score_mod / scale / backend
    as ``paged_attention``. check: validate the table and lengths (one small device read); False: the same
    checks as a device-side assertion that raises at the next synchronization, and the plan reads nothing from
    the device for the default mask (so it may itself be captured).

    Usage::

        plan = ta.plan_paged(page_table, kv_lens, key_caches[0], value_caches[0], num_q_heads=32)
        for layer in range(num_layers):
            out = plan.run(queries[layer], key_caches[layer], value_caches[layer])

    The Triton backends launch ``run`` with no host read or allocation beyond its outputs (CUDA-graph
    capturable); the torch backend attends over the pages with the lengths the plan read.
    """
    validate_paged_cache(key_cache, value_cache)
    device = key_cache.device
    validate_paged_layout(page_table, kv_lens, None, device)
    num_q_heads = as_int(num_q_heads, "num_q_heads", minimum=1, expected="a positive int (query heads Hq)")
    q_len = as_int(q_len, "q_len", minimum=1, expected="a positive int (query rows per sequence)")
    validate_paged_heads(num_q_heads, key_cache.shape[3], key_cache)
    for mod, what in ((mask_mod, "mask_mod"), (score_mod, "score_mod")):
        validate_mod_devices(mod, what, device)
    scale = validate_scale(scale, key_cache)
    route = plan_paged_call(key_cache.dtype, device, needs_grad=False, backend=backend)
    values = dict(num_pages=key_cache.shape[0], page_size=key_cache.shape[2], q_len=q_len)
    lengths = None
    if check:
        lengths = validate_paged_values(page_table, kv_lens, **values)
    else:
        assert_paged_values_async(page_table, kv_lens, **values)
    return _plan(route, page_table, kv_lens, key_cache, value_cache, num_q_heads=num_q_heads, q_len=q_len,
                 mask_mod=mask_mod, score_mod=score_mod, scale=scale, lengths=lengths)


def _plan(route, page_table, kv_lens, key_cache, value_cache, *, num_q_heads: int, q_len: int, mask_mod, score_mod,
          scale: float, lengths: Optional[List[int]]) -> PagedDecodePlan:
    prepared = run.plan_paged(route, page_table, kv_lens, key_cache, value_cache, num_q_heads=num_q_heads,
                              q_len=q_len, mask_mod=mask_mod, score_mod=score_mod, scale=scale, lengths=lengths)
    return PagedDecodePlan(route, prepared, batch=page_table.shape[0], q_len=q_len, num_q_heads=num_q_heads,
                           key_cache=key_cache, value_cache=value_cache, max_pages=page_table.shape[1], scale=scale)


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    page_table: torch.Tensor, kv_lens: torch.Tensor, *, mask_mod: Optional[Callable] = None,
                    score_mod: Optional[Callable] = None, scale: Optional[float] = None,
                    return_lse: bool = False, backend: Optional[str] = None):
    """Attention of new query rows over a paged KV cache (one call: ``plan_paged`` then ``run``; a model
    with several layers per step plans once instead).

    query: [B, Hq, Lq, D]; key_cache: [num_pages, Hkv, page_size, D]; value_cache: [num_pages, Hkv,
    page_size, Dv]; page_table: int32 [B, max_pages] (logical page j of sequence b is physical page
    ``page_table[b, j]``); kv_lens: int32 [B], the length of each sequence including the query rows.
    Query row i of sequence b sits at logical position ``kv_lens[b] - Lq + i``; ``mask_mod(b, h, q_idx,
    kv_idx)`` and ``score_mod`` see logical positions, and mask_mod defaults to causal. Positions
    ``>= kv_lens[b]`` are never attended. GQA when Hq is a multiple of Hkv; page_size a multiple of 16.
    backend: "triton" (CUDA), "interpret" (the same kernel on CPU tensors), "torch" (PyTorch over the
    pages; differentiable); None picks. Returns out [B, Hq, Lq, Dv] (and lse [B, Hq, Lq] float32 with
    return_lse=True). Validates the table and lengths (one small device read).
    """
    lengths = validate_paged(query, key_cache, value_cache, page_table, kv_lens)
    scale = validate_scale(scale, query)
    route = plan_paged_call(query.dtype, query.device, needs_grad=grad_needed(query, key_cache, value_cache),
                            backend=backend)
    validate_mod_devices(mask_mod, "mask_mod", query.device)
    validate_mod_devices(score_mod, "score_mod", query.device)
    plan = _plan(route, page_table, kv_lens, key_cache, value_cache, num_q_heads=query.shape[1],
                 q_len=query.shape[2], mask_mod=mask_mod, score_mod=score_mod, scale=scale, lengths=lengths)
    out, lse = plan._prepared.run(query, key_cache, value_cache)
    return (out, lse) if return_lse else out


def write_paged_kv(key_cache: torch.Tensor, value_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   page_table: torch.Tensor, kv_lens: torch.Tensor) -> None:
    """Write a step's new keys and values into their pages, with device ops only (CUDA-graph capturable).

    key: [B, Hkv, Lq, D] and value: [B, Hkv, Lq, Dv], the Lq newest tokens of each sequence; kv_lens: int32
    [B], the lengths that already count them (the tokens land at logical positions ``kv_lens[b] - Lq``
    .. ``kv_lens[b] - 1``); page_table: int32 [B, max_pages]; the caches [num_pages, Hkv, page_size, D /
    Dv]. Shapes, dtypes and devices are checked; the values are not read (``plan_paged`` checks them).
    """
    validate_paged_cache(key_cache, value_cache)
    device = key_cache.device
    for name, tensor, cache in (("key", key, key_cache), ("value", value, value_cache)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, Hkv, Lq, D], got "
                             f"{getattr(tensor, 'shape', type(tensor).__name__)}")
        if tensor.dtype != cache.dtype or tensor.device != device:
            raise TypeError(f"{name} must match its cache's dtype {cache.dtype} and device {device}, got "
                            f"{tensor.dtype} on {tensor.device}")
        if tensor.shape[1] != cache.shape[1] or tensor.shape[3] != cache.shape[3]:
            raise ValueError(f"{name} must be [B, Hkv={cache.shape[1]}, Lq, {cache.shape[3]}] like its cache, got "
                             f"{list(tensor.shape)}")
    if key.shape[:3] != value.shape[:3]:
        raise ValueError(f"key and value must share [B, Hkv, Lq], got {list(key.shape)} and {list(value.shape)}")
    batch, _, q_len, _ = key.shape
    validate_paged_layout(page_table, kv_lens, batch, device)
    page_size = key_cache.shape[2]
    positions = kv_lens.long().unsqueeze(1) - q_len + torch.arange(q_len, device=device)          # [B, Lq]
    pages = page_table.long().gather(1, positions.clamp(min=0) // page_size)                      # [B, Lq]
    rows = positions % page_size
    # cache[pages, :, rows] is [B, Lq, Hkv, D]: the (page, row) index pairs come first.
    key_cache[pages, :, rows] = key.transpose(1, 2)
    value_cache[pages, :, rows] = value.transpose(1, 2)
