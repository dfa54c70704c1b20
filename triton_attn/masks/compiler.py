"""The mask compiler: classify every tile of a mask_mod as empty, partial or full.

``create_block_mask`` (the fast path) traces the mask_mod, classifies all tiles at once by interval
analysis (``interval.py``: O(tiles) tensor work, chunked over query-block rows), and refines only
the tiles it cannot decide ("maybe" tiles): first by the same analysis on sub-tiles (a tile with an
all-True and an all-False sub-tile is partial), then by evaluating the mask_mod on the elements of
what is left, in batches of at most ``ELEMENT_BUDGET`` elements. The result equals the exact
compiler's, bit for bit (tiles where eager evaluation might raise are always evaluated, so errors
surface as they do there).

``create_block_mask_exact`` evaluates the mask_mod everywhere, in chunks of ``ELEMENT_BUDGET``
elements; it works for any mask_mod, and is the fallback (with a one-line warning) for mask_mods
that cannot be traced.

Both bound peak extra memory whatever the sequence length. Long masks come back as a
``CompactBlockMask`` (compressed rows, memory in O(non-empty tiles)); see ``compact.py``.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

from .block_mask import BlockMask, BlockSize, normalize_block_size
from .closure import captured_tensors
from .compact import CompactBlockMask, CSRBuilder, dense_fields_from_maps
from .evaluate import call_mask_mod, mod_name
from .interval import IntervalEvaluator, graph_args
from .scalars import as_int
from .tracing import UntraceableModError, trace_mask_mod

# Elements of the [B, H, Q, KV] grid evaluated at once. A mask_mod builds a handful of int64
# temporaries of this size, so 4M elements keeps a chunk well under ~256 MB.
ELEMENT_BUDGET = 1 << 22
# Tiles classified at once by interval analysis (each node of the graph is a few tensors of this size).
TILE_BUDGET = 1 << 19
# layout="auto": above this many tiles (B * H * NQ * NKV) create_block_mask returns a CompactBlockMask.
DENSE_LAYOUT_MAX_TILES = 1 << 22
LAYOUTS = ("auto", "dense", "compact")
# Intra-op threads while compiling (None: leave torch's setting). The compiler runs many
# moderately sized tensor ops, which gain little from threads but lose a lot when the cores are
# oversubscribed (every op waits for its slowest thread): measured 2.4 s with 1 thread against
# 12 s with 2 for a 1M-token causal mask on a loaded 2-core machine.
COMPILER_THREADS: Optional[int] = 1
# Device type -> tile refiner for traced mask_mods: ``refiner(traced, b, h, rows, cols, Q_LEN, KV_LEN,
# block_size) -> (partial, full)`` (``refine_tiles``'s contract), or None when it cannot handle the
# graph. masks/ knows no Triton: the API layer registers the GPU kernel here
# (``triton_attn.api`` installs the Triton refiner of ``kernels/refine.py`` for "cuda").
TILE_REFINERS: Dict[str, Callable] = {}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_length(value, what: str) -> int:
    return as_int(value, what)


def _check_count(value, what: str) -> int:
    if value is None:
        return 1
    return as_int(value, what, expected="a positive int or None (broadcast)")


def resolve_device(mask_mod: Callable, device) -> torch.device:
    """``device`` if given, else the device of the first tensor the mask_mod captured, else CPU."""
    if device is not None:
        return torch.device(device)
    for tensor in captured_tensors(mask_mod):
        return tensor.device
    return torch.device("cpu")


def _check_mask_mod(mask_mod) -> None:
    if not callable(mask_mod):
        raise TypeError(f"mask_mod must be a callable (b, h, q_idx, kv_idx) -> bool tensor, "
                        f"got {type(mask_mod).__name__}")


def iter_mask_chunks(mask_mod: Callable, B: int, H: int, Q_LEN: int, KV_LEN: int, device: torch.device,
                     row_multiple: int = 1, col_multiple: int = 1,
                     budget: Optional[int] = None) -> Iterator[Tuple[slice, slice, slice, slice, torch.Tensor]]:
    """Yield ``(b_slice, h_slice, q_slice, kv_slice, mask_chunk)`` covering ``[B, H, Q_LEN, KV_LEN]``.

    Chunk boundaries in q/kv fall on multiples of ``row_multiple``/``col_multiple`` so that
    every tile lies inside one chunk.
    """
    budget = ELEMENT_BUDGET if budget is None else budget  # read at call time: tests lower it
    kv_chunk = min(_cdiv(KV_LEN, col_multiple) * col_multiple,
                   max(col_multiple, budget // row_multiple // col_multiple * col_multiple))
    q_chunk = max(row_multiple, min(_cdiv(Q_LEN, row_multiple) * row_multiple,
                                    budget // kv_chunk // row_multiple * row_multiple))
    per_bh = q_chunk * kv_chunk
    h_chunk = max(1, min(H, budget // per_bh))
    b_chunk = max(1, min(B, budget // (per_bh * h_chunk)))
    for b0 in range(0, B, b_chunk):
        b1 = min(B, b0 + b_chunk)
        b = torch.arange(b0, b1, device=device).view(-1, 1, 1, 1)
        for h0 in range(0, H, h_chunk):
            h1 = min(H, h0 + h_chunk)
            h = torch.arange(h0, h1, device=device).view(1, -1, 1, 1)
            for q0 in range(0, Q_LEN, q_chunk):
                q1 = min(Q_LEN, q0 + q_chunk)
                q_idx = torch.arange(q0, q1, device=device).view(1, 1, -1, 1)
                for k0 in range(0, KV_LEN, kv_chunk):
                    k1 = min(KV_LEN, k0 + kv_chunk)
                    kv_idx = torch.arange(k0, k1, device=device).view(1, 1, 1, -1)
                    chunk = call_mask_mod(mask_mod, b, h, q_idx, kv_idx, (b1 - b0, h1 - h0, q1 - q0, k1 - k0))
                    yield slice(b0, b1), slice(h0, h1), slice(q0, q1), slice(k0, k1), chunk


def create_mask(mask_mod: Callable, B: Optional[int], H: Optional[int], Q_LEN: int, KV_LEN: int, *,
                device=None) -> torch.Tensor:
    """Dense bool ``[B, H, Q_LEN, KV_LEN]`` (B/H of 1 when None): ``mask_mod`` at every position."""
    _check_mask_mod(mask_mod)
    B, H = _check_count(B, "B"), _check_count(H, "H")
    Q_LEN, KV_LEN = _check_length(Q_LEN, "Q_LEN"), _check_length(KV_LEN, "KV_LEN")
    device = resolve_device(mask_mod, device)
    dense = torch.empty(B, H, Q_LEN, KV_LEN, dtype=torch.bool, device=device)
    for bs, hs, qs, ks, chunk in iter_mask_chunks(mask_mod, B, H, Q_LEN, KV_LEN, device):
        dense[bs, hs, qs, ks] = chunk
    return dense


def block_counts(mask_mod: Callable, B: int, H: int, Q_LEN: int, KV_LEN: int, block_size: Tuple[int, int],
                 device: torch.device, budget: Optional[int] = None) -> torch.Tensor:
    """int32 ``[B, H, NQ, NKV]``: how many positions of each tile the mask_mod allows."""
    q_bs, kv_bs = block_size
    nq, nkv = _cdiv(Q_LEN, q_bs), _cdiv(KV_LEN, kv_bs)
    counts = torch.zeros(B, H, nq, nkv, dtype=torch.int32, device=device)
    for bs, hs, qs, ks, chunk in iter_mask_chunks(mask_mod, B, H, Q_LEN, KV_LEN, device, q_bs, kv_bs, budget):
        rows, cols = chunk.shape[-2:]
        pad_rows, pad_cols = _cdiv(rows, q_bs) * q_bs - rows, _cdiv(cols, kv_bs) * kv_bs - cols
        if pad_rows or pad_cols:
            chunk = torch.nn.functional.pad(chunk, (0, pad_cols, 0, pad_rows), value=False)
        tiles = chunk.reshape(chunk.shape[0], chunk.shape[1], chunk.shape[2] // q_bs, q_bs,
                              chunk.shape[3] // kv_bs, kv_bs)
        tile_counts = tiles.sum(dim=(3, 5), dtype=torch.int32)
        counts[bs, hs, qs.start // q_bs:qs.start // q_bs + tile_counts.shape[2],
               ks.start // kv_bs:ks.start // kv_bs + tile_counts.shape[3]] = tile_counts
    return counts


def in_bounds_counts(Q_LEN: int, KV_LEN: int, block_size: Tuple[int, int], device) -> torch.Tensor:
    """int32 ``[NQ, NKV]``: positions of each tile inside the sequence (smaller in ragged tails)."""
    q_bs, kv_bs = block_size
    rows = (Q_LEN - torch.arange(0, Q_LEN, q_bs, device=device)).clamp(max=q_bs)
    cols = (KV_LEN - torch.arange(0, KV_LEN, kv_bs, device=device)).clamp(max=kv_bs)
    return (rows[:, None] * cols[None, :]).to(torch.int32)


def create_block_mask_exact(mask_mod: Callable, B: Optional[int], H: Optional[int], Q_LEN: int, KV_LEN: int, *,
                            device=None, BLOCK_SIZE: BlockSize = 128) -> BlockMask:
    """Evaluate ``mask_mod`` everywhere (in chunks) and classify each tile empty / partial / full."""
    _check_mask_mod(mask_mod)
    B, H = _check_count(B, "B"), _check_count(H, "H")
    Q_LEN, KV_LEN = _check_length(Q_LEN, "Q_LEN"), _check_length(KV_LEN, "KV_LEN")
    block_size = normalize_block_size(BLOCK_SIZE)
    device = resolve_device(mask_mod, device)
    counts = block_counts(mask_mod, B, H, Q_LEN, KV_LEN, block_size, device)
    capacity = in_bounds_counts(Q_LEN, KV_LEN, block_size, device)
    full = counts == capacity
    partial = (counts > 0) & ~full
    return BlockMask.from_block_maps(partial, full, BLOCK_SIZE=block_size, seq_lengths=(Q_LEN, KV_LEN),
                                     mask_mod=mask_mod)


def _warn_untraceable(mask_mod: Callable, error: Exception) -> None:
    reason = " ".join(str(error).split())
    if len(reason) > 160:
        reason = reason[:157] + "..."
    warnings.warn(f"create_block_mask: mask_mod {mod_name(mask_mod)!r} cannot be traced ({reason}); "
                  "using the exact chunked compiler, which evaluates every element", stacklevel=4)


def _check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    return layout


def refine_tiles(mask_mod: Callable, b: torch.Tensor, h: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                 Q_LEN: int, KV_LEN: int, block_size: Tuple[int, int],
                 budget: Optional[int] = None, sub_tiles=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Evaluate ``mask_mod`` on every element of the listed tiles; (partial, full) bool per tile.

    ``b``/``h``/``rows``/``cols``: int64 ``[T]``, the batch, head, query block and kv block of each
    tile. Tiles go in batches of at most ``budget`` elements (one tile at least). Positions past
    the end of a ragged tail are not evaluated (they repeat the last in-bounds one and are masked).
    ``sub_tiles``: optional ``(IntervalEvaluator, (q_sub, kv_sub))`` that decides most partial
    tiles from sub-tile intervals before anything is evaluated.
    """
    budget = ELEMENT_BUDGET if budget is None else budget
    q_bs, kv_bs = block_size
    device = rows.device
    count = rows.numel()
    partial = torch.zeros(count, dtype=torch.bool, device=device)
    full = torch.zeros(count, dtype=torch.bool, device=device)
    if sub_tiles is not None and count:
        # Interval analysis on sub-tiles first: a tile with a sub-tile that is all True and one that
        # is all False is partial without evaluating an element. Tiles where evaluation might raise
        # (poisoned) are always evaluated, so errors surface exactly as in the exact compiler.
        decided = _partial_by_sub_tiles(sub_tiles, b, h, rows, cols, Q_LEN, KV_LEN, block_size)
        partial |= decided
        undecided = (~decided).nonzero().squeeze(-1)
        if undecided.numel() < count:
            sub_partial, sub_full = refine_tiles(mask_mod, b[undecided], h[undecided], rows[undecided],
                                                 cols[undecided], Q_LEN, KV_LEN, block_size, budget)
            partial[undecided], full[undecided] = sub_partial, sub_full
            return partial, full
    per_batch = max(1, budget // (q_bs * kv_bs))
    q_off = torch.arange(q_bs, device=device)
    kv_off = torch.arange(kv_bs, device=device)
    for t0 in range(0, count, per_batch):
        t1 = min(count, t0 + per_batch)
        n = t1 - t0
        q_idx = (rows[t0:t1] * q_bs).view(n, 1, 1) + q_off.view(1, q_bs, 1)
        kv_idx = (cols[t0:t1] * kv_bs).view(n, 1, 1) + kv_off.view(1, 1, kv_bs)
        q_valid, kv_valid = q_idx < Q_LEN, kv_idx < KV_LEN
        ragged = not (bool(q_valid.all()) and bool(kv_valid.all()))
        if ragged:
            q_idx, kv_idx = q_idx.clamp(max=Q_LEN - 1), kv_idx.clamp(max=KV_LEN - 1)
        values = call_mask_mod(mask_mod, b[t0:t1].view(n, 1, 1), h[t0:t1].view(n, 1, 1), q_idx, kv_idx,
                               (n, q_bs, kv_bs))
        flat = values.reshape(n, -1)
        if ragged:  # positions past the end count neither for nor against the tile
            inside = (q_valid & kv_valid).reshape(n, -1)
            any_true = (flat & inside).any(1)
            all_true = (flat | ~inside).all(1)
        else:
            any_true, all_true = flat.any(1), flat.all(1)
        full[t0:t1] = all_true
        partial[t0:t1] = any_true & ~all_true
    return partial, full


def _refine_undecided(traced, mask_mod: Callable, b: torch.Tensor, h: torch.Tensor, rows: torch.Tensor,
                      cols: torch.Tensor, Q_LEN: int, KV_LEN: int, block_size: Tuple[int, int], sub_tiles,
                      poisoned: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``refine_tiles``, or the refiner registered for the tiles' device type (``TILE_REFINERS``).

    Tiles where eager evaluation might raise or wrap (``poisoned``) always go to ``refine_tiles``,
    so errors surface exactly as in the exact compiler.
    """
    refiner = TILE_REFINERS.get(rows.device.type)
    to_kernel = torch.ones_like(rows, dtype=torch.bool) if poisoned is None else ~poisoned
    if refiner is None or not bool(to_kernel.any()):
        return refine_tiles(mask_mod, b, h, rows, cols, Q_LEN, KV_LEN, block_size, sub_tiles=sub_tiles)
    partial = torch.zeros(rows.numel(), dtype=torch.bool, device=rows.device)
    full = torch.zeros_like(partial)
    eager = (~to_kernel).nonzero().squeeze(-1)
    if eager.numel():
        partial[eager], full[eager] = refine_tiles(mask_mod, b[eager], h[eager], rows[eager], cols[eager],
                                                   Q_LEN, KV_LEN, block_size, sub_tiles=sub_tiles)
    take = to_kernel.nonzero().squeeze(-1)
    args = (b[take], h[take], rows[take], cols[take], Q_LEN, KV_LEN, block_size)
    result = refiner(traced, *args)
    if result is None:  # the refiner cannot handle this graph
        result = refine_tiles(mask_mod, *args, sub_tiles=sub_tiles)
    partial[take], full[take] = result
    return partial, full


SUB_TILE_SPLIT = 8  # sub-tiles per tile side for the interval pass inside refine_tiles


def sub_tile_size(block_size: Tuple[int, int]) -> Optional[Tuple[int, int]]:
    """Sub-tile shape for ``refine_tiles``' interval pass, or None when tiles are too small to split."""
    q_bs, kv_bs = block_size
    if q_bs % SUB_TILE_SPLIT or kv_bs % SUB_TILE_SPLIT or q_bs * kv_bs < 256:
        return None
    return q_bs // SUB_TILE_SPLIT, kv_bs // SUB_TILE_SPLIT


def _partial_by_sub_tiles(sub_tiles, b, h, rows, cols, Q_LEN: int, KV_LEN: int,
                          block_size: Tuple[int, int]) -> torch.Tensor:
    """Bool per tile: proven partial by the sub-tile intervals (some sub-tile all True, some all
    False, none poisoned). Sub-tiles wholly past the end of a ragged tail take no part."""
    evaluator, (q_sub, kv_sub) = sub_tiles
    q_bs, kv_bs = block_size
    nq_sub, nkv_sub = q_bs // q_sub, kv_bs // kv_sub
    device = rows.device
    decided = torch.zeros(rows.numel(), dtype=torch.bool, device=device)
    per_batch = max(1, TILE_BUDGET // (nq_sub * nkv_sub))
    q_off = torch.arange(0, q_bs, q_sub, device=device).view(1, -1, 1)
    kv_off = torch.arange(0, kv_bs, kv_sub, device=device).view(1, 1, -1)
    for t0 in range(0, rows.numel(), per_batch):
        t1 = min(rows.numel(), t0 + per_batch)
        q_lo = (rows[t0:t1] * q_bs).view(-1, 1, 1) + q_off
        kv_lo = (cols[t0:t1] * kv_bs).view(-1, 1, 1) + kv_off
        q_in, kv_in = q_lo < Q_LEN, kv_lo < KV_LEN
        q_lo_c, kv_lo_c = q_lo.clamp(max=Q_LEN - 1), kv_lo.clamp(max=KV_LEN - 1)
        leaves = {"b": (b[t0:t1].view(-1, 1, 1),) * 2, "h": (h[t0:t1].view(-1, 1, 1),) * 2,
                  "q_idx": (q_lo_c, (q_lo_c + q_sub).clamp(max=Q_LEN) - 1),
                  "kv_idx": (kv_lo_c, (kv_lo_c + kv_sub).clamp(max=KV_LEN) - 1)}
        can_false, can_true = evaluator.classify(leaves)
        shape = (t1 - t0, nq_sub, nkv_sub)
        inside = (q_in & kv_in).expand(shape)
        some_full = ((~can_false).expand(shape) & inside).flatten(1).any(1)
        some_empty = ((~can_true).expand(shape) & inside).flatten(1).any(1)
        ok = some_full & some_empty
        if evaluator.last_poison is not None:
            ok &= ~(evaluator.last_poison.expand(shape) & inside).flatten(1).any(1)
        decided[t0:t1] = ok
    return decided


def iter_block_chunks(traced, mask_mod: Callable, B: int, H: int, Q_LEN: int, KV_LEN: int,
                      block_size: Tuple[int, int], device: torch.device
                      ) -> Iterator[Tuple[int, int, int, int, torch.Tensor, torch.Tensor]]:
    """Classify every tile of the layouts of a traced mask_mod, chunk by chunk, in row order.

    Yields ``(p0, p1, r0, r1, partial, full)``: bool maps ``[p1 - p0, r1 - r0, NKV]`` for layouts
    ``p0:p1`` (layout p is b = p // Hl, h = p % Hl, see ``layout_shape``) and query block rows ``r0:r1``.
    """
    q_bs, kv_bs = block_size
    nq, nkv = _cdiv(Q_LEN, q_bs), _cdiv(KV_LEN, kv_bs)
    used = graph_args(traced.graph)
    bl, hl = (B if "b" in used else 1), (H if "h" in used else 1)
    layouts = bl * hl
    evaluator = IntervalEvaluator(traced, block_size, device)
    sub_size = sub_tile_size(block_size)
    sub_tiles = None if sub_size is None else (IntervalEvaluator(traced, sub_size, device), sub_size)
    tile_budget = TILE_BUDGET  # read at call time: tests lower it
    if nq * nkv <= tile_budget:
        pairs_per_chunk, rows_per_chunk = max(1, tile_budget // (nq * nkv)), nq
    else:
        pairs_per_chunk, rows_per_chunk = 1, max(1, tile_budget // nkv)
    kv_lo = torch.arange(0, KV_LEN, kv_bs, device=device).view(1, 1, nkv)
    kv_hi = (kv_lo + kv_bs).clamp(max=KV_LEN) - 1
    for p0 in range(0, layouts, pairs_per_chunk):
        p1 = min(layouts, p0 + pairs_per_chunk)
        pairs = torch.arange(p0, p1, device=device)
        b, h = (pairs // hl).view(-1, 1, 1), (pairs % hl).view(-1, 1, 1)
        for r0 in range(0, nq, rows_per_chunk):
            r1 = min(nq, r0 + rows_per_chunk)
            q_lo = (torch.arange(r0, r1, device=device) * q_bs).view(1, -1, 1)
            q_hi = (q_lo + q_bs).clamp(max=Q_LEN) - 1
            leaves = {"b": (b, b), "h": (h, h), "q_idx": (q_lo, q_hi), "kv_idx": (kv_lo, kv_hi)}
            can_false, can_true = evaluator.classify(leaves)
            shape = (p1 - p0, r1 - r0, nkv)
            full = (~can_false).expand(shape)
            maybe = (can_false & can_true).expand(shape)
            partial = torch.zeros(shape, dtype=torch.bool, device=device)
            if bool(maybe.any()):
                full = full.clone()
                where = maybe.nonzero()
                pair, row, col = where[:, 0], where[:, 1], where[:, 2]
                poison = evaluator.last_poison
                refined_partial, refined_full = _refine_undecided(
                    traced, mask_mod, b.view(-1)[pair], h.view(-1)[pair], row + r0, col, Q_LEN, KV_LEN, block_size,
                    sub_tiles, None if poison is None else poison.expand(shape)[pair, row, col])
                partial[pair, row, col] = refined_partial
                full[pair, row, col] = refined_full
            yield p0, p1, r0, r1, partial, full


def _compile_traced(traced, mask_mod: Callable, B: int, H: int, Q_LEN: int, KV_LEN: int,
                    block_size: Tuple[int, int], device: torch.device, layout: str) -> BlockMask:
    q_bs, kv_bs = block_size
    nq, nkv = _cdiv(Q_LEN, q_bs), _cdiv(KV_LEN, kv_bs)
    used = graph_args(traced.graph)
    bl, hl = (B if "b" in used else 1), (H if "h" in used else 1)
    if layout == "auto":
        layout = "compact" if B * H * nq * nkv > DENSE_LAYOUT_MAX_TILES else "dense"
    chunks = iter_block_chunks(traced, mask_mod, B, H, Q_LEN, KV_LEN, block_size, device)
    if layout == "compact":
        builders = {"partial": CSRBuilder(device), "full": CSRBuilder(device)}
        for _, _, _, _, partial, full in chunks:
            builders["partial"].add(partial)
            builders["full"].add(full)
        return CompactBlockMask(csr={kind: builder.finish() for kind, builder in builders.items()},
                                layout_shape=(bl, hl), batch_heads=(B, H), num_blocks=(nq, nkv),
                                BLOCK_SIZE=block_size, seq_lengths=(Q_LEN, KV_LEN), mask_mod=mask_mod).trusted()
    partial_map = torch.zeros(bl * hl, nq, nkv, dtype=torch.bool, device=device)
    full_map = torch.zeros(bl * hl, nq, nkv, dtype=torch.bool, device=device)
    for p0, p1, r0, r1, partial, full in chunks:
        partial_map[p0:p1, r0:r1] = partial
        full_map[p0:p1, r0:r1] = full
    fields = dense_fields_from_maps(partial_map.view(bl, hl, nq, nkv), full_map.view(bl, hl, nq, nkv), B, H)
    # Lists derived from block maps are consistent by construction: validate() checks shapes only.
    return BlockMask(**fields, BLOCK_SIZE=block_size, seq_lengths=(Q_LEN, KV_LEN), mask_mod=mask_mod).trusted()


def _meta_block_mask(mask_mod: Callable, B: int, H: int, Q_LEN: int, KV_LEN: int,
                     block_size: Tuple[int, int]) -> BlockMask:
    """A BlockMask on the meta device: every field with its shape, no values (shape inference, as for any
    meta tensor); its launch plan is the upper bound of the block grid."""
    nq, nkv = _cdiv(Q_LEN, block_size[0]), _cdiv(KV_LEN, block_size[1])
    blocks = torch.empty(B, H, nq, nkv, dtype=torch.bool, device="meta")
    fields = dense_fields_from_maps(blocks, blocks, B, H)
    return BlockMask(**fields, BLOCK_SIZE=block_size, seq_lengths=(Q_LEN, KV_LEN), mask_mod=mask_mod)


@contextlib.contextmanager
def _compiler_threads():
    threads = COMPILER_THREADS
    before = torch.get_num_threads()
    if threads is None or threads >= before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def create_block_mask(mask_mod: Callable, B: Optional[int], H: Optional[int], Q_LEN: int, KV_LEN: int,
                      device=None, BLOCK_SIZE: BlockSize = 128, _compile: bool = False, *,
                      layout: str = "auto") -> BlockMask:
    """Build the ``BlockMask`` of ``mask_mod`` over ``[B, H, Q_LEN, KV_LEN]``.

    ``B``/``H`` None: the mask does not depend on them and broadcasts. ``BLOCK_SIZE``: an int or a
    ``(Q_BLOCK_SIZE, KV_BLOCK_SIZE)`` pair. ``device``: where the index tensors live (default: the
    device of the tensors the mask_mod captured, else CPU). ``layout``: "dense" (a ``BlockMask``
    with FlexAttention's dense fields), "compact" (a ``CompactBlockMask``: compressed rows, the
    dense fields built on first access), or "auto" (compact above ``DENSE_LAYOUT_MAX_TILES`` tiles).

    Traceable mask_mods are classified by interval analysis, and only the tiles it cannot decide
    are evaluated elementwise; others fall back to ``create_block_mask_exact`` with a warning.
    Either way the result is the exact compiler's.

    FlexAttention's argument forms work unchanged: ``device`` and ``BLOCK_SIZE`` positional, a
    device string (``"cuda"``), and ``_compile``, which is accepted and ignored (nothing to compile).
    """
    block_mask = _create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device, BLOCK_SIZE, layout)
    # Tiles are full only where the mask_mod allows every element and empty only where it allows none.
    block_mask.exact_layout = True
    return block_mask


def _create_block_mask(mask_mod: Callable, B, H, Q_LEN: int, KV_LEN: int, device, BLOCK_SIZE: BlockSize,
                       layout: str) -> BlockMask:
    _check_mask_mod(mask_mod)
    _check_layout(layout)
    B, H = _check_count(B, "B"), _check_count(H, "H")
    Q_LEN, KV_LEN = _check_length(Q_LEN, "Q_LEN"), _check_length(KV_LEN, "KV_LEN")
    block_size = normalize_block_size(BLOCK_SIZE)
    device_given = device
    device = resolve_device(mask_mod, device) if device is not None or not torch.compiler.is_compiling() else None
    if device is not None and device.type == "meta":
        return _meta_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, block_size)
    if torch.compiler.is_compiling():
        if device_given is None:
            raise ValueError("create_block_mask inside torch.compile needs device= (the device cannot be read from "
                             "the mask_mod's closure while tracing)")
        # Inside torch.compile: tensor operations only (the interval analysis decides in Python what to
        # refine). Exact, and its launch plan is the grid's upper bound (values are not read).
        return create_block_mask_exact(mask_mod, B, H, Q_LEN, KV_LEN, device=device, BLOCK_SIZE=block_size)
    try:
        traced = trace_mask_mod(mask_mod)
    except (UntraceableModError, TypeError) as error:
        _warn_untraceable(mask_mod, error)
        # The exact compiler's chunks are large: it keeps torch's threads.
        exact = create_block_mask_exact(mask_mod, B, H, Q_LEN, KV_LEN, device=device, BLOCK_SIZE=block_size)
        nq, nkv = exact.num_blocks
        if layout == "compact" or (layout == "auto" and B * H * nq * nkv > DENSE_LAYOUT_MAX_TILES):
            return CompactBlockMask.from_block_mask(exact)
        return exact
    with _compiler_threads():
        return _compile_traced(traced, mask_mod, B, H, Q_LEN, KV_LEN, block_size, device, layout)
