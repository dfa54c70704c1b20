"""The ``torch`` backend of ``paged_attention``: pages read one bounded chunk at a time.

The mask and score_mod see logical positions (``masks/paged.py``): query row ``i`` of sequence ``b`` sits
at ``kv_lens[b] - Lq + i`` and keys ``>= kv_lens[b]`` are never attended. Sequences of equal length are
attended together (a group: same positions, same chunk boundaries). For each group and block of query
rows, the keys ``[0, kv_lens[b])`` split into *regions* known on the host from the lengths alone:

- *full*: every query row of the block sees every key. With a mask_mod that depends on its indices only
  through the distance ``q_idx - kv_idx`` (the default causal mask, ``sliding_window_mask``, however
  spelled: ``recognize.distance_set``), a block sees one range of keys, all of its rows see a middle
  part of it (full) and the rest (at most ``Lq - 1`` keys on either side) is *partial*; keys outside the
  range are skipped. Any other mask makes every key partial.
- *partial*: the mask_mod is evaluated on the chunk.

Each region is read in chunks of at most ``CHUNK_BYTES`` of keys (all sequences of the group together):
one ``index_select`` of (page, head) rows straight into ``[Bg, Hkv, C, D]`` order, into a buffer reused
across chunks and calls (per thread), so the chunk stays in cache and nothing as large as a sequence's K/V
is ever copied. A full
chunk is attended by PyTorch's fused CPU flash kernel (float32/float64 CPU, no score_mod, D == Dv) or by
matrix products; a partial one by matrix products with the mask applied and non-finite values the mask
hides kept out of the rows that do not see them (``0 * nan`` would leak), as the blockwise backend does.
The chunks' (out, lse) are merged by their log-sum-exps. GQA folds the query heads of a K/V head into rows
(``[Bg, Hkv, groups * rows, D]``), so K/V are never repeated. Only the lengths (host ints) decide what is
read: with ``lengths`` given, nothing is read back from the device.

Calls that need gradients keep the differentiable path: each sequence's pages gathered into one slab and
attended by ``blockwise_attention`` (which reads its BlockMask's layout on the host).
"""

from __future__ import annotations

import threading
from typing import Callable, List, Optional, Tuple

import torch

from ...masks.closure import captured_tensors
from ...masks.compiler import create_block_mask
from ...masks.evaluate import call_mask_mod, call_score_mod
from ...masks.library import causal_mask
from ...masks.paged import PAGED_KV_BLOCK_SIZE, causal_paged_block_mask, depends_on_head
from ...masks.recognize import distance_set
from ...reference import accumulation_dtype, lse_dtype
from .blockwise import blockwise_attention
from .cpu_flash import flash_op, merge_parts

# Bytes of keys read per chunk (all sequences of a group together; as many again for values): small
# enough to stay in cache while the chunk is attended, large enough that per-chunk overhead stays small
# (of 0.25-4 MB and 64-512 keys per sequence, the best tried on bench/bench_paged.py's shapes, x86 with
# 1 MB of L2 per core).
CHUNK_BYTES = 2 << 20
# Query rows attended per block: the masks' regions are computed per block (a long causal query skips
# more keys in its early blocks), and the partial path's scores stay bounded.
QUERY_BLOCK = 128
# Chunk results held before they are merged into one.
MERGE_EVERY = 16
# Keys per sequence per chunk, at least (where a page holds fewer, one page): sequences of one length are
# read together only while each still gets this many keys of the chunk (the fused kernel's per-head cost
# grows when each head sees few keys), so a group holds at most CHUNK_BYTES / (this * bytes per key).
MIN_CHUNK_TOKENS = 256

# The distance set of the default (causal) mask: row p sees keys p - kv >= 0.
CAUSAL_DISTANCES = [(0, None)]


# -- regions ----------------------------------------------------------------------------------------------

def key_regions(distances: Optional[list], length: int, first_row: int, last_row: int
                ) -> List[Tuple[int, int, bool]]:
    """The keys ``[start, stop)`` query rows at logical positions ``first_row..last_row`` may see, as
    ``(start, stop, full)`` regions in order; ``full``: every row sees every key of the region.

    distances: the mask's ``distance_set`` (None: not a function of the distance, so every key of the
    sequence is partial); length: the sequence's length (keys ``>= length`` are never seen).
    """
    if distances is None:
        return [(0, length, False)]
    if not distances:
        return []
    low, high = distances[0][0], distances[-1][1]            # the hull of the visible distances
    # Row p sees keys [p - high, p - low] (within [0, length)); the union over the rows:
    start = 0 if high is None else max(0, first_row - high)
    stop = length if low is None else min(length, last_row - low + 1)
    if start >= stop:
        return []
    if len(distances) > 1:
        return [(start, stop, False)]
    # Keys every row sees: [last_row - high, first_row - low].
    full_start = start if high is None else max(start, last_row - high)
    full_stop = stop if low is None else min(stop, first_row - low + 1)
    if full_start >= full_stop:
        return [(start, stop, False)]
    regions = [(start, full_start, False), (full_start, full_stop, True), (full_stop, stop, False)]
    return [region for region in regions if region[0] < region[1]]


def equal_length_groups(lengths: List[int], limit: int) -> List[Tuple[int, List[int]]]:
    """``(length, batch indices)`` of the sequences of each length, in order of first appearance, at most
    ``limit`` sequences a group."""
    by_length: dict = {}
    for index, length in enumerate(lengths):
        by_length.setdefault(length, []).append(index)
    return [(length, members[i:i + limit]) for length, members in by_length.items()
            for i in range(0, len(members), limit)]


# -- reading pages ----------------------------------------------------------------------------------------

class _PageReader:
    """Reads keys of a group's sequences out of the pages, one chunk at a time.

    key_cache / value_cache: ``[num_pages, Hkv, page_size, D / Dv]``; rows: int64 ``[Bg, Hkv, max_pages]``,
    the group's rows of ``page_rows``; chunk_tokens: a multiple of page_size. ``chunks(start, stop)`` yields
    ``(chunk_start, K [Bg, Hkv, n, D], V [Bg, Hkv, n, Dv])`` over ``[start, stop)``, chunk boundaries on
    multiples of chunk_tokens; K and V are views of buffers the next chunk overwrites. Per-chunk work is
    kept to the two ``index_select`` calls: row lists and buffer views are made once.
    """

    def __init__(self, key_cache: torch.Tensor, value_cache: torch.Tensor, rows: torch.Tensor, chunk_tokens: int):
        _, self.kv_heads, self.page_size, key_dim = key_cache.shape
        self.value_dim = value_cache.shape[3]
        self.batch = rows.shape[0]
        self.chunk_tokens, self.chunk_pages = chunk_tokens, chunk_tokens // self.page_size
        self.rows = rows
        chunk_rows = self.batch * self.kv_heads * self.chunk_pages
        self.sources = []
        for role, cache, dim in (("key", key_cache, key_dim), ("value", value_cache, self.value_dim)):
            buffer = _chunk_buffer(role, cache, chunk_rows * self.page_size * dim)
            full_out = buffer.view(chunk_rows, self.page_size * dim)
            full_view = buffer.view(self.batch, self.kv_heads, chunk_tokens, dim)
            self.sources.append((cache, _rows_view(cache), buffer, dim, full_out, full_view))

    def _read(self, rows: torch.Tensor, offset: int, count: int, aligned: bool):
        """K and V of the (page, head) ``rows`` (``[Bg * Hkv * pages]``), positions ``offset .. offset + count``
        of the pages read."""
        out = []
        for cache, flat, buffer, dim, full_out, full_view in self.sources:
            if aligned:
                target = full_out
            else:
                target = buffer[:rows.numel() * self.page_size * dim].view(rows.numel(), self.page_size * dim)
            if flat is not None:
                torch.index_select(flat, 0, rows, out=target)
            else:  # a cache whose (page, head) rows are not one view: index (page, head) pairs, no copy of it
                target.view(-1, self.page_size, dim).copy_(cache[rows // self.kv_heads, rows % self.kv_heads])
            if aligned:
                out.append(full_view)
            else:
                pages = rows.numel() // (self.batch * self.kv_heads)
                view = target.view(self.batch, self.kv_heads, pages * self.page_size, dim)
                out.append(view[:, :, offset:offset + count])
        return out[0], out[1]

    def _pieces(self, start: int, stop: int):
        first_page, end_page = start // self.page_size, -(-stop // self.page_size)
        rows = self.rows[:, :, first_page:end_page].reshape(-1)
        return self._read(rows, start - first_page * self.page_size, stop - start, aligned=False)

    def chunks(self, start: int, stop: int):
        tokens = self.chunk_tokens
        inner_start = min(stop, -(-start // tokens) * tokens)     # the whole chunks: [inner_start, inner_stop)
        inner_stop = max(inner_start, stop // tokens * tokens)
        if start < inner_start:
            yield (start, *self._pieces(start, inner_start))
        count = (inner_stop - inner_start) // tokens
        if count:
            first_page = inner_start // self.page_size
            rows = self.rows[:, :, first_page:first_page + count * self.chunk_pages]
            rows = rows.reshape(self.batch, self.kv_heads, count, self.chunk_pages).permute(2, 0, 1, 3)
            for index, chunk_rows in enumerate(rows.reshape(count, -1).unbind(0)):
                yield (inner_start + index * tokens, *self._read(chunk_rows, 0, tokens, aligned=True))
        if inner_stop < stop:
            yield (inner_stop, *self._pieces(inner_stop, stop))


# Per thread: the chunk buffers of the last calls, by (role, device, dtype). A fresh buffer of a megabyte or
# more comes from the OS on every call and is paid for again in page faults (as much as the reads it
# serves at 1k keys); kept, it also stays in cache. Per thread, so concurrent calls never share one.
_BUFFERS = threading.local()


def _chunk_buffer(role: str, like: torch.Tensor, numel: int) -> torch.Tensor:
    """A 1-D buffer of at least ``numel`` elements of ``like``'s dtype and device, reused across calls."""
    kept = getattr(_BUFFERS, "by_key", None)
    if kept is None:
        kept = _BUFFERS.by_key = {}
    key = (role, like.device, like.dtype)
    buffer = kept.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = kept[key] = like.new_empty(numel)
    return buffer[:numel]


def page_rows(page_table: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """int64 ``[B, Hkv, max_pages]``: the row of a cache viewed as ``[num_pages * Hkv, page_size * D]`` holding
    head h of logical page j of sequence b (page_table: int32 ``[B, max_pages]``)."""
    heads = torch.arange(kv_heads, device=page_table.device).view(1, -1, 1)
    return page_table.long().unsqueeze(1) * kv_heads + heads


def _rows_view(cache: torch.Tensor) -> Optional[torch.Tensor]:
    """``cache`` ``[num_pages, Hkv, page_size, D]`` as ``[num_pages * Hkv, page_size * D]`` rows without a
    copy, or None when its strides do not allow that."""
    num_pages, kv_heads, page_size, dim = cache.shape
    try:
        return cache.view(num_pages * kv_heads, page_size * dim)
    except RuntimeError:
        return None


# -- attending one chunk ----------------------------------------------------------------------------------

class _BlockContext:
    """One block of query rows of a group: the grouped query and the index tensors the mods see.

    query: ``[Bg, Hq, rows, D]``; grouped ``[Bg, Hkv, groups * rows, D]`` (row ``g * rows + i`` is query
    head ``h * groups + g``, row i). ``first_position``: logical position of row 0.
    """

    def __init__(self, query: torch.Tensor, kv_heads: int, members: List[int], first_position: int,
                 mask_mod: Callable, score_mod: Optional[Callable], scale: float):
        batch, q_heads, rows, dim = query.shape
        self.shape = (batch, q_heads, rows)
        self.compute_dtype = accumulation_dtype(query.dtype)
        self.grouped = query.reshape(batch, kv_heads, (q_heads // kv_heads) * rows, dim)
        if self.grouped.stride(-1) != 1:  # the fused kernel reads rows of D contiguous elements
            self.grouped = self.grouped.contiguous()
        self.grouped_float = self.grouped.to(self.compute_dtype)
        self.members, self.first_position = members, first_position
        self.mask_mod, self.score_mod, self.scale = mask_mod, score_mod, scale
        self._indices = None

    def indices(self):
        """(b ``[Bg, 1, 1, 1]``, h ``[1, Hq, 1, 1]``, q_idx ``[1, 1, rows, 1]`` logical) for the mods."""
        if self._indices is None:
            device = self.grouped.device
            _, q_heads, rows = self.shape
            self._indices = (torch.tensor(self.members, device=device).view(-1, 1, 1, 1),
                             torch.arange(q_heads, device=device).view(1, -1, 1, 1),
                             torch.arange(self.first_position, self.first_position + rows,
                                          device=device).view(1, 1, -1, 1))
        return self._indices


def _attend_products(block: _BlockContext, key: torch.Tensor, value: torch.Tensor, start: int, partial: bool):
    """A chunk by matrix products: (out ``[Bg, Hkv, groups * rows, Dv]``, lse ``[Bg, Hkv, groups * rows]``)
    in the accumulation dtype. ``partial``: apply the mask_mod, and keep non-finite values it hides out of
    the rows that do not see them. A row that sees no key of the chunk gets out 0, lse -inf."""
    compute = block.compute_dtype
    batch, kv_heads, grouped_rows, _ = block.grouped.shape
    length = key.shape[2]
    scores = block.grouped_float @ key.to(compute).transpose(-1, -2)                # [Bg, Hkv, G * rows, L]
    scores = scores.mul_(block.scale).view(*block.shape, length)                   # [Bg, Hq, rows, L]
    kv_idx = torch.arange(start, start + length, device=key.device).view(1, 1, 1, -1)
    b, h, q_idx = block.indices()
    if block.score_mod is not None:
        scores = call_score_mod(block.score_mod, scores, b, h, q_idx, kv_idx)
    if partial:
        keep = call_mask_mod(block.mask_mod, b, h, q_idx, kv_idx, scores.shape)
        scores = scores.masked_fill(~keep, float("-inf"))
    scores = scores.reshape(batch, kv_heads, grouped_rows, length)
    top = scores.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    weights = torch.exp(scores - top)
    total = weights.sum(dim=-1, keepdim=True)
    value = value.to(compute)
    if partial:
        # A hidden value has weight 0, but 0 * nan is nan: zero non-finite values for the product, and make
        # the rows that give one of them weight non-finite (NaN), as blockwise_attention does.
        bad = ~torch.isfinite(value)
        out = weights @ value.masked_fill(bad, 0.0)
        reached = ((weights > 0).to(compute) @ bad.to(compute)) > 0
        out = out.masked_fill_(reached, float("nan"))
    else:
        out = weights @ value
    seen = total > 0
    out = out / torch.where(seen, total, torch.ones_like(total))
    lse = torch.where(seen, top + torch.log(total), torch.full_like(total, float("-inf")))
    return out, lse.squeeze(-1)


def _attend_block(reader: _PageReader, block: _BlockContext, regions, flash) -> Tuple[torch.Tensor, torch.Tensor]:
    """One query block of a group over its key regions, chunk by chunk: out ``[Bg, Hq, rows, Dv]`` and lse
    ``[Bg, Hq, rows]`` in the accumulation dtype."""
    compute = block.compute_dtype
    parts: List[Tuple[torch.Tensor, torch.Tensor]] = []
    for start, stop, full in regions:
        for chunk_start, key, value in reader.chunks(start, stop):
            if full and flash is not None:
                parts.append(flash(block.grouped, key, value, 0.0, False, scale=block.scale)[:2])
            else:
                parts.append(_attend_products(block, key, value, chunk_start, partial=not full))
            if len(parts) == MERGE_EVERY:
                parts = [merge_parts(parts, compute)]
    batch, q_heads, rows = block.shape
    if not parts:  # the mask hides every key from every row of the block
        out = torch.zeros(batch, q_heads, rows, reader.value_dim, dtype=compute, device=block.grouped.device)
        return out, torch.full((batch, q_heads, rows), float("-inf"), dtype=compute, device=out.device)
    out, lse = merge_parts(parts, compute)
    return out.reshape(batch, q_heads, rows, -1), lse.reshape(batch, q_heads, rows)


def _chunked_paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                             page_table: torch.Tensor, lengths: List[int], *, mask_mod: Optional[Callable],
                             score_mod: Optional[Callable], scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The inference path (module docstring). Reads nothing from the device: ``lengths`` are host ints."""
    batch, q_heads, q_len, _ = query.shape
    kv_heads, page_size, head_dim = key_cache.shape[1], key_cache.shape[2], key_cache.shape[3]
    value_dim = value_cache.shape[3]
    distances = CAUSAL_DISTANCES if mask_mod is None else distance_set(mask_mod)
    user_mask = causal_mask if mask_mod is None else mask_mod
    flash = None
    if (score_mod is None and query.device.type == "cpu" and head_dim == value_dim
            and query.dtype in (torch.float32, torch.float64)):
        flash = flash_op()
    key_bytes = kv_heads * head_dim * key_cache.element_size()                      # one position's keys
    groups = equal_length_groups(lengths, max(1, CHUNK_BYTES // (max(MIN_CHUNK_TOKENS, page_size) * key_bytes)))
    all_rows = page_rows(page_table, kv_heads)
    outs, lses, order = [], [], []
    for length, members in groups:
        size = len(members)
        # Keys per chunk: CHUNK_BYTES of keys over the group's sequences, whole pages, at least one page.
        chunk_pages = min(max(1, CHUNK_BYTES // (size * key_bytes * page_size)), -(-length // page_size))
        if members[-1] - members[0] == size - 1:
            group_query, rows = query[members[0]:members[-1] + 1], all_rows[members[0]:members[-1] + 1]
        else:
            index = torch.tensor(members, device=query.device)
            group_query, rows = query.index_select(0, index), all_rows.index_select(0, index)
        reader = _PageReader(key_cache, value_cache, rows, chunk_pages * page_size)
        for row in range(0, q_len, QUERY_BLOCK):
            rows_here = min(QUERY_BLOCK, q_len - row)
            first = length - q_len + row
            block = _BlockContext(group_query[:, :, row:row + rows_here], kv_heads, members, first,
                                  user_mask, score_mod, scale)
            regions = key_regions(distances, length, first, first + rows_here - 1)
            block_out, block_lse = _attend_block(reader, block, regions, flash)
            outs.append(block_out)
            lses.append(block_lse)
        order.append(members)
    if q_len > QUERY_BLOCK:  # each group's blocks, joined along the rows
        blocks = -(-q_len // QUERY_BLOCK)
        outs = [torch.cat(outs[i:i + blocks], dim=2) for i in range(0, len(outs), blocks)]
        lses = [torch.cat(lses[i:i + blocks], dim=2) for i in range(0, len(lses), blocks)]
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    lse = lses[0] if len(lses) == 1 else torch.cat(lses)
    sequence_order = [b for members in order for b in members]
    if sequence_order != list(range(batch)):  # groups of equal lengths took the sequences out of order
        where = torch.tensor(sorted(range(batch), key=sequence_order.__getitem__), device=query.device)
        out, lse = out.index_select(0, where), lse.index_select(0, where)
    return out.to(query.dtype), lse.to(lse_dtype(query.dtype))


# -- the differentiable path ------------------------------------------------------------------------------

def gather_pages(cache: torch.Tensor, pages: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` logical positions of one sequence as a contiguous ``[1, Hkv, length, D]``.

    cache: ``[num_pages, Hkv, page_size, D]``; pages: its physical page ids in logical order ``[n]``.
    One ``index_select`` of (page, head) rows straight into the ``[Hkv, pages, page_size, D]`` order:
    no transposed copy afterwards.
    """
    num_pages, kv_heads, page_size, dim = cache.shape
    used = -(-length // page_size)
    heads = torch.arange(kv_heads, dtype=torch.long, device=cache.device).view(-1, 1)
    rows = pages[:used].long().view(1, -1) * kv_heads + heads                          # [Hkv, used]
    slab = cache.reshape(num_pages * kv_heads, page_size * dim).index_select(0, rows.view(-1))
    slab = slab.view(1, kv_heads, used * page_size, dim)
    return slab if used * page_size == length else slab[:, :, :length]


def _shift_batch(mod: Optional[Callable], batch: int, kind: str) -> Optional[Callable]:
    """``mod`` called with ``b + batch``: sequence ``batch`` of the call, run as a batch of one."""
    if mod is None:
        return None
    if kind == "mask":
        def shifted_mask(b, h, q_idx, kv_idx):
            return mod(b + batch, h, q_idx, kv_idx)
        shifted_mask.__name__ = getattr(mod, "__name__", "mask")
        return shifted_mask

    def shifted_score(score, b, h, q_idx, kv_idx):
        return mod(score, b + batch, h, q_idx, kv_idx)
    shifted_score.__name__ = getattr(mod, "__name__", "score")
    return shifted_score


def _gathered_paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                              page_table: torch.Tensor, kv_lens: torch.Tensor, lengths: List[int], *,
                              mask_mod: Optional[Callable], score_mod: Optional[Callable], scale: float
                              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The path with gradients: each sequence's pages gathered into a slab, attended by ``blockwise_attention``
    (a batch of one with a layout shared by all heads, its fast path), which recomputes in its backward."""
    q_len, q_heads = query.shape[2], query.shape[1]
    head_dependent = depends_on_head(mask_mod)
    outs, lses = [], []
    for batch, length in enumerate(lengths):
        key = gather_pages(key_cache, page_table[batch], length)
        value = gather_pages(value_cache, page_table[batch], length)
        first = length - q_len  # logical position of query row 0
        if mask_mod is None and q_len <= PAGED_KV_BLOCK_SIZE:
            block_mask = causal_paged_block_mask(kv_lens[batch:batch + 1], q_len, length)
        else:
            user_mask = _shift_batch(causal_mask if mask_mod is None else mask_mod, batch, "mask")

            def sequence_mask(b, h, q_idx, kv_idx, user_mask=user_mask, first=first):
                return user_mask(b, h, q_idx + first, kv_idx)

            sequence_mask.__name__ = f"paged_{getattr(user_mask, '__name__', 'mask')}"
            block_mask = create_block_mask(sequence_mask, None, q_heads if head_dependent else None, q_len, length,
                                           device=query.device, BLOCK_SIZE=PAGED_KV_BLOCK_SIZE)
        user_score = _shift_batch(score_mod, batch, "score")
        sequence_score = None
        if user_score is not None:
            def sequence_score(score, b, h, q_idx, kv_idx, user_score=user_score, first=first):
                return user_score(score, b, h, q_idx + first, kv_idx)
        out, lse = blockwise_attention(query[batch:batch + 1], key, value, block_mask, score_mod=sequence_score,
                                       scale=scale)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=0), torch.cat(lses, dim=0)


def _needs_grad(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                score_mod: Optional[Callable]) -> bool:
    if not torch.is_grad_enabled():
        return False
    if query.requires_grad or key_cache.requires_grad or value_cache.requires_grad:
        return True
    return score_mod is not None and any(t.requires_grad for t in captured_tensors(score_mod))


def paged_attention_torch(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                          page_table: torch.Tensor, kv_lens: torch.Tensor, *, mask_mod: Optional[Callable],
                          score_mod: Optional[Callable], scale: float, lengths: Optional[List[int]] = None
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``torch`` backend of ``paged_attention`` (inputs validated by the API).

    query ``[B, Hq, Lq, D]``; key_cache / value_cache ``[num_pages, Hkv, page_size, D / Dv]``; page_table int32
    ``[B, max_pages]``; kv_lens int32 ``[B]``. lengths: ``kv_lens`` as host ints when the caller already read
    them (a plan): then no tensor value is read back from the device (without gradients); otherwise kv_lens is
    read once. Returns out ``[B, Hq, Lq, Dv]`` in the query dtype and lse ``[B, Hq, Lq]`` (float32; float64
    for float64 inputs), natural log; a row that sees no key gets out 0, lse -inf.
    """
    if lengths is None:
        lengths = [int(n) for n in kv_lens.tolist()]
    if _needs_grad(query, key_cache, value_cache, score_mod):
        return _gathered_paged_attention(query, key_cache, value_cache, page_table, kv_lens, lengths,
                                         mask_mod=mask_mod, score_mod=score_mod, scale=scale)
    return _chunked_paged_attention(query, key_cache, value_cache, page_table, lengths, mask_mod=mask_mod,
                                    score_mod=score_mod, scale=scale)
