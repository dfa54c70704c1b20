"""The fast mask compiler: interval analysis + exact refinement == the exact chunked compiler, bit for bit."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import triton_attn as ta
from triton_attn.masks import (
    and_masks,
    causal_mask,
    chunked_mask,
    compiler,
    document_mask,
    full_mask,
    not_mask,
    or_masks,
    padding_mask,
    prefix_lm_mask,
    sliding_window_mask,
)
from triton_attn.masks.block_mask import ordered_from_dense
from triton_attn.masks.compact import CompactBlockMask, ordered_from_dense_fast
from triton_attn.masks.interval import IntervalEvaluator, eager_dtypes
from triton_attn.masks.tracing import trace_mask_mod


def cdiv(a, b):
    return -(-a // b)


def assert_same_block_mask(got, expected, what: str):
    assert got.shape == expected.shape, f"{what}: shape {got.shape} != {expected.shape}"
    assert got.BLOCK_SIZE == expected.BLOCK_SIZE and got.seq_lengths == expected.seq_lengths, what
    for name in ta.BlockMask._TENSOR_FIELDS:
        a, b = getattr(got, name), getattr(expected, name)
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{what}: {name} {a.dtype}{tuple(a.shape)} != {b.dtype}{tuple(b.shape)}")
        if not torch.equal(a, b):
            diff = (a != b).nonzero()
            raise AssertionError(f"{what}: {name} differs from the exact compiler at {diff.shape[0]} entries, "
                                 f"first {tuple(diff[0].tolist())}")


# ---------------------------------------------------------------------------------------------
# random compositions of the mask library (and a few arithmetic-heavy mods)
# ---------------------------------------------------------------------------------------------
@st.composite
def leaf_mod(draw, Bn, Hn, Qn, KVn):
    """(mask_mod, uses_b, uses_h)."""
    S = max(Qn, KVn)
    kind = draw(st.sampled_from(["causal", "full", "window", "chunk", "prefix", "prefix_b", "doc", "doc1d", "pad",
                                 "head_window", "table2d", "table4d", "arith", "narrow_ids", "shifted_ids",
                                 "float_cmp", "bool_ids"]))
    if kind == "causal":
        return causal_mask, False, False
    if kind == "full":
        return full_mask, False, False
    if kind == "window":
        return sliding_window_mask(draw(st.integers(1, 40))), False, False
    if kind == "chunk":
        return chunked_mask(draw(st.integers(1, 40))), False, False
    if kind == "prefix":
        return prefix_lm_mask(draw(st.integers(0, 60))), False, False
    if kind == "prefix_b":
        return prefix_lm_mask(torch.tensor(draw(st.lists(st.integers(0, 60), min_size=Bn, max_size=Bn)))), True, False
    if kind in ("doc", "doc1d", "narrow_ids", "shifted_ids", "bool_ids"):
        rows = 1 if kind in ("doc1d", "shifted_ids") else Bn
        bounds = [sorted(draw(st.lists(st.integers(0, S), max_size=4))) for _ in range(rows)]
        ids = torch.stack([torch.bucketize(torch.arange(S), torch.tensor(bd, dtype=torch.long), right=True)
                           for bd in bounds])
        if kind == "doc":
            return document_mask(ids), True, False
        if kind == "doc1d":
            return document_mask(ids[0]), False, False
        if kind == "narrow_ids":  # int8 ids: arithmetic on them stays int8 in eager PyTorch (may wrap)
            small = (ids * draw(st.sampled_from([1, 60]))).to(torch.int8)

            def narrow_ids(b, h, q_idx, kv_idx):
                return (small[b, q_idx] + 100) > small[b, kv_idx]

            return narrow_ids, True, False
        if kind == "bool_ids":
            flags = (ids % 2).bool()

            def bool_ids(b, h, q_idx, kv_idx):
                return flags[b, q_idx] | ~flags[b, kv_idx]

            return bool_ids, True, False
        one = ids[0]

        def shifted_ids(b, h, q_idx, kv_idx):  # a non-tile-aligned index range, clamped into bounds
            return one[(q_idx // 2 + 3).clamp(max=S - 1)] == one[torch.clamp(kv_idx - 5, min=0)]

        return shifted_ids, False, False
    if kind == "pad":
        am = torch.tensor(draw(st.lists(st.lists(st.integers(0, 1), min_size=KVn, max_size=KVn),
                                        min_size=Bn, max_size=Bn)))
        return padding_mask(am), True, False
    if kind == "head_window":
        windows = torch.tensor(draw(st.lists(st.integers(1, 50), min_size=Hn, max_size=Hn)))

        def head_window(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < windows[h])

        return head_window, False, True
    if kind in ("table2d", "table4d"):
        density = draw(st.sampled_from([0.02, 0.5, 0.98]))
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        if kind == "table2d":  # a 2-D captured load ranged in both dims
            blocky = draw(st.booleans())
            table = torch.rand(Qn, KVn, generator=gen) < density
            if blocky:  # constant over 8x8 patches, so some tiles are decided by the summaries
                table = (torch.rand(cdiv(Qn, 8), cdiv(KVn, 8), generator=gen) < density).repeat_interleave(
                    8, 0).repeat_interleave(8, 1)[:Qn, :KVn]

            def table2d(b, h, q_idx, kv_idx):
                return table[q_idx, kv_idx]

            return table2d, False, False
        table = torch.rand(Bn, Hn, Qn, KVn, generator=gen) < density

        def table4d(b, h, q_idx, kv_idx):
            return table[b, h, q_idx, kv_idx]

        return table4d, True, True
    if kind == "float_cmp":
        scale = draw(st.sampled_from([0.5, 1.0, 3.0]))

        def float_cmp(b, h, q_idx, kv_idx):
            return (q_idx.float() * scale) >= kv_idx

        return float_cmp, False, False
    # arithmetic: %, //, abs, where, min/max, clamp, negation, multiplication
    a, m, c = draw(st.integers(1, 9)), draw(st.integers(1, 17)), draw(st.integers(-20, 20))
    variant = draw(st.integers(0, 5))

    def arith(b, h, q_idx, kv_idx):
        if variant == 0:
            return (q_idx - kv_idx).abs() % m < a
        if variant == 1:
            return torch.where(q_idx > c + 30, kv_idx // a <= q_idx // a, (kv_idx * a) % m == 0)
        if variant == 2:
            return torch.minimum(q_idx, kv_idx + c) >= torch.maximum(kv_idx, q_idx - a * m)
        if variant == 3:
            return (-(kv_idx - q_idx) * a).clamp(min=0, max=m * 4) > c
        if variant == 4:
            return (q_idx + c) // m == (kv_idx + c) // m
        return ((q_idx ^ kv_idx) & a) == 0

    return arith, False, False


@st.composite
def mask_tree(draw, Bn, Hn, Qn, KVn, depth=2):
    if depth == 0 or draw(st.booleans()):
        return draw(leaf_mod(Bn, Hn, Qn, KVn))
    op = draw(st.sampled_from(["and", "or", "not"]))
    if op == "not":
        mod, ub, uh = draw(mask_tree(Bn, Hn, Qn, KVn, depth - 1))
        return not_mask(mod), ub, uh
    parts = draw(st.lists(mask_tree(Bn, Hn, Qn, KVn, depth - 1), min_size=2, max_size=3))
    combine = and_masks if op == "and" else or_masks
    return combine(*[p[0] for p in parts]), any(p[1] for p in parts), any(p[2] for p in parts)


block_sizes = st.one_of(st.sampled_from([1, 8, 16, 32, 128]),
                        st.tuples(st.sampled_from([4, 8, 16, 64]), st.sampled_from([8, 12, 16, 32, 128])))


@given(data=st.data(), Bn=st.integers(1, 3), Hn=st.integers(1, 3), Qn=st.integers(1, 150), KVn=st.integers(1, 150),
       block_size=block_sizes, broadcast=st.booleans(), tile_budget=st.sampled_from([None, 7, 64]))
@settings(max_examples=max(80, 2 * settings().max_examples))  # HYPOTHESIS_PROFILE=thorough: 600
def test_interval_plus_refinement_equals_exact(data, Bn, Hn, Qn, KVn, block_size, broadcast,
                                               tile_budget):
    mod, uses_b, uses_h = data.draw(mask_tree(Bn, Hn, Qn, KVn))
    B_arg = None if (broadcast and not uses_b) else Bn
    H_arg = None if (broadcast and not uses_h) else Hn
    what = f"{mod.__name__} B={B_arg} H={H_arg} Q={Qn} KV={KVn} BLOCK_SIZE={block_size} tile_budget={tile_budget}"
    expected = compiler.create_block_mask_exact(mod, B_arg, H_arg, Qn, KVn, BLOCK_SIZE=block_size)
    with pytest.MonkeyPatch.context() as patch:
        if tile_budget is not None:  # exercise row chunks and layout chunks on small grids
            patch.setattr(compiler, "TILE_BUDGET", tile_budget)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # every mod here traces: no fallback
            dense = ta.create_block_mask(mod, B_arg, H_arg, Qn, KVn, BLOCK_SIZE=block_size, layout="dense")
            compact = ta.create_block_mask(mod, B_arg, H_arg, Qn, KVn, BLOCK_SIZE=block_size, layout="compact")
    assert type(dense) is ta.BlockMask and isinstance(compact, CompactBlockMask)
    assert dense.mask_mod is mod and compact.mask_mod is mod
    assert_same_block_mask(dense, expected, what + " (dense)")
    assert_same_block_mask(compact, expected, what + " (compact)")


# ---------------------------------------------------------------------------------------------
# the analysis decides tiles without elements
# ---------------------------------------------------------------------------------------------
def _refined_tiles(monkeypatch, mod, B, H, Q, KV, block_size):
    seen = []
    real = compiler.refine_tiles

    def counting(mask_mod, b, h, rows, cols, *args, **kwargs):
        seen.append(torch.stack([b, h, rows, cols], 1))
        return real(mask_mod, b, h, rows, cols, *args, **kwargs)

    monkeypatch.setattr(compiler, "refine_tiles", counting)
    bm = ta.create_block_mask(mod, B, H, Q, KV, BLOCK_SIZE=block_size)
    monkeypatch.setattr(compiler, "refine_tiles", real)
    assert_same_block_mask(bm, compiler.create_block_mask_exact(mod, B, H, Q, KV, BLOCK_SIZE=block_size), "refined")
    return torch.cat(seen) if seen else torch.zeros(0, 4, dtype=torch.long)


def test_causal_refines_only_the_diagonal(monkeypatch):
    tiles = _refined_tiles(monkeypatch, causal_mask, None, None, 1000, 1000, 64)
    assert tiles.shape[0] == cdiv(1000, 64)
    assert torch.equal(tiles[:, 2], tiles[:, 3])


def test_sliding_window_and_prefix_refine_only_their_edges(monkeypatch):
    tiles = _refined_tiles(monkeypatch, sliding_window_mask(100), None, None, 1024, 1024, 32)
    # the window's two diagonals cross at most 2 + 2 tiles per row
    assert tiles.shape[0] <= 4 * 32
    tiles = _refined_tiles(monkeypatch, prefix_lm_mask(256), None, None, 1024, 1024, 128)
    assert tiles.shape[0] == 8 - 2  # the diagonal right of the prefix


def test_document_ids_classified_by_summaries(monkeypatch):
    # documents aligned to tiles: nothing left to evaluate
    ids = torch.repeat_interleave(torch.arange(8), 128)
    tiles = _refined_tiles(monkeypatch, document_mask(ids), None, None, 1024, 1024, 128)
    assert tiles.shape[0] == 0
    # 2-D ids, one boundary inside a tile per batch: only that tile's row and column are maybe
    ids2 = torch.stack([torch.repeat_interleave(torch.tensor([0, 1]), torch.tensor([300, 724])),
                        torch.repeat_interleave(torch.tensor([5, 9]), torch.tensor([64, 960]))])
    tiles = _refined_tiles(monkeypatch, and_masks(causal_mask, document_mask(ids2)), 2, None, 1024, 1024, 128)
    for b, boundary in ((0, 300), (1, 64)):
        mine = tiles[tiles[:, 0] == b]
        row = boundary // 128
        off_diagonal = mine[mine[:, 2] != mine[:, 3]]
        assert bool(((off_diagonal[:, 2] == row) | (off_diagonal[:, 3] == row)).all()), f"batch {b}: {mine.tolist()}"


def test_evaluator_classifies_whole_grid_in_one_call():
    ids = torch.repeat_interleave(torch.arange(4), 64)
    traced = trace_mask_mod(and_masks(causal_mask, document_mask(ids)))
    ev = IntervalEvaluator(traced, (32, 32), torch.device("cpu"))
    lo = torch.arange(0, 256, 32)
    can_false, can_true = ev.classify({"q_idx": (lo.view(-1, 1), lo.view(-1, 1) + 31),
                                       "kv_idx": (lo.view(1, -1), lo.view(1, -1) + 31)})
    full, empty = ~can_false, ~can_true
    q, k = torch.arange(8).view(-1, 1), torch.arange(8).view(1, -1)
    assert torch.equal(full, (q // 2 == k // 2) & (q > k))
    assert torch.equal(empty, (q // 2 != k // 2) | (q < k))


def test_eager_dtypes_follow_type_promotion():
    small = torch.zeros(10, dtype=torch.int8)
    traced = trace_mask_mod(lambda b, h, q_idx, kv_idx: (small[q_idx] + 1) > (small[kv_idx] + kv_idx))
    dtypes = eager_dtypes(traced)
    left, right = traced.graph.args
    assert dtypes[id(left)] == torch.int8, "int8 tensor + Python int stays int8"
    assert dtypes[id(right)] == torch.int64, "int8 tensor + int64 index promotes"


def test_wrapping_int8_arithmetic_matches_eager():
    big = torch.tensor([120, 125, 127, 0, 5] * 20, dtype=torch.int8)

    def wraps(b, h, q_idx, kv_idx):
        return (big[q_idx] + 10) > big[kv_idx]  # 127 + 10 wraps to -119 in eager int8

    expected = compiler.create_block_mask_exact(wraps, None, None, 100, 100, BLOCK_SIZE=5)
    assert_same_block_mask(ta.create_block_mask(wraps, None, None, 100, 100, BLOCK_SIZE=5), expected, "int8 wrap")


def test_errors_match_the_exact_compiler():
    ids = torch.arange(50)

    def out_of_range(b, h, q_idx, kv_idx):
        return ids[q_idx + 10] >= ids[kv_idx]

    def divide_by_zero(b, h, q_idx, kv_idx):
        return kv_idx // (q_idx - 20) >= 0

    for mod in (out_of_range, divide_by_zero):
        with pytest.raises(Exception) as exact_error:
            compiler.create_block_mask_exact(mod, None, None, 50, 50, BLOCK_SIZE=16)
        with pytest.raises(type(exact_error.value)):
            ta.create_block_mask(mod, None, None, 50, 50, BLOCK_SIZE=16)

    def wraps_negative(b, h, q_idx, kv_idx):  # ids[-1] is valid in eager PyTorch
        return ids[q_idx - 1] < kv_idx

    expected = compiler.create_block_mask_exact(wraps_negative, None, None, 50, 50, BLOCK_SIZE=16)
    assert_same_block_mask(ta.create_block_mask(wraps_negative, None, None, 50, 50, BLOCK_SIZE=16), expected,
                           "negative index")


# ---------------------------------------------------------------------------------------------
# untraceable mods: one-line warning, exact result
# ---------------------------------------------------------------------------------------------
def _untraceable_branch(b, h, q_idx, kv_idx):
    if (q_idx >= kv_idx).any():  # Python control flow on a traced value
        return q_idx >= kv_idx
    return kv_idx < 0


def _untraceable_shape(b, h, q_idx, kv_idx):
    rows = q_idx.shape[-2]
    return (q_idx >= kv_idx) | (kv_idx < rows)


@pytest.mark.parametrize("mod", [_untraceable_branch, _untraceable_shape], ids=lambda m: m.__name__)
@pytest.mark.parametrize("layout", ["auto", "compact"])
def test_untraceable_mod_falls_back_with_one_line_warning(mod, layout):
    with pytest.warns(UserWarning) as record:
        bm = ta.create_block_mask(mod, 2, None, 77, 90, BLOCK_SIZE=(16, 32), layout=layout)
    messages = [str(w.message) for w in record if "cannot be traced" in str(w.message)]
    assert len(messages) == 1 and "\n" not in messages[0] and mod.__name__ in messages[0], messages
    assert_same_block_mask(bm, compiler.create_block_mask_exact(mod, 2, None, 77, 90, BLOCK_SIZE=(16, 32)), "fallback")
    assert isinstance(bm, CompactBlockMask) == (layout == "compact")


def test_traceable_mod_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ta.create_block_mask(and_masks(causal_mask, sliding_window_mask(5)), None, None, 64, 64, BLOCK_SIZE=16)


def test_layout_argument_is_checked():
    with pytest.raises(ValueError, match="layout"):
        ta.create_block_mask(causal_mask, None, None, 64, 64, layout="sparse")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
@given(st.lists(st.lists(st.booleans(), min_size=1, max_size=40), min_size=1, max_size=6))
def test_fast_ordering_equals_argsort_ordering(rows):
    width = len(rows[0])
    dense = torch.tensor([(r * width)[:width] for r in rows])
    num, idx = ordered_from_dense_fast(dense)
    ref_num, ref_idx = ordered_from_dense(dense)
    assert torch.equal(num, ref_num) and torch.equal(idx, ref_idx)


def test_refinement_respects_element_budget(monkeypatch):
    seen = []

    def recording(b, h, q_idx, kv_idx):
        seen.append(torch.broadcast_shapes(b.shape, h.shape, q_idx.shape, kv_idx.shape).numel())
        return (q_idx >= kv_idx) & (q_idx - kv_idx < 50)

    q_bs = kv_bs = 16
    tiles = torch.arange(40)
    monkeypatch.setattr(compiler, "ELEMENT_BUDGET", 4 * q_bs * kv_bs)
    partial, full = compiler.refine_tiles(recording, tiles * 0, tiles * 0, tiles, tiles, 640, 640, (q_bs, kv_bs))
    assert max(seen) <= 4 * q_bs * kv_bs and len(seen) == 10
    assert bool(partial.all()) and not bool(full.any())


@pytest.mark.parametrize("block_size", [(8, 32), 16, (16, 8), 64])
def test_tiles_full_although_intervals_are_loose(block_size):
    """Tile-level intervals cannot prove these tiles full (remainders of wide ranges); sub-tiles
    can prove parts of them full, which must not be mistaken for partial."""
    mods = [
        lambda b, h, q_idx, kv_idx: (q_idx * 3) % 6 != 1,
        lambda b, h, q_idx, kv_idx: ((kv_idx * 5) % 10 != 3) | (q_idx < kv_idx),
        lambda b, h, q_idx, kv_idx: (q_idx % 4 + kv_idx % 4) <= 6,
    ]
    for i, mod in enumerate(mods):
        expected = compiler.create_block_mask_exact(mod, None, None, 200, 190, BLOCK_SIZE=block_size)
        got = ta.create_block_mask(mod, None, None, 200, 190, BLOCK_SIZE=block_size)
        assert_same_block_mask(got, expected, f"mod {i} BLOCK_SIZE={block_size}")


def test_sub_tile_pass_decides_diagonals_without_elements(monkeypatch):
    seen = []
    real = compiler.call_mask_mod

    def counting(mask_mod, b, h, q_idx, kv_idx, shape):
        seen.append(torch.Size(shape).numel())
        return real(mask_mod, b, h, q_idx, kv_idx, shape)

    monkeypatch.setattr(compiler, "call_mask_mod", counting)
    bm = ta.create_block_mask(causal_mask, None, None, 1024, 1024, BLOCK_SIZE=128)
    assert sum(seen) == 0, "the diagonal tiles are partial by their sub-tiles: nothing is evaluated"
    ids = torch.repeat_interleave(torch.arange(5), torch.tensor([100, 300, 7, 500, 117]))
    mod = and_masks(causal_mask, document_mask(ids))
    bm = ta.create_block_mask(mod, None, None, 1024, 1024, BLOCK_SIZE=128)
    # only the tiles whose True rows share one sub-tile row with False ones (doc 3 ends at 906)
    assert sum(seen) <= 4 * 128 * 128, f"evaluated {sum(seen)} elements"
    monkeypatch.setattr(compiler, "call_mask_mod", real)
    assert_same_block_mask(bm, compiler.create_block_mask_exact(mod, None, None, 1024, 1024), "document")
