"""BlockMask: the exact compiler against dense evaluation, the fields, the views, FlexAttention interop."""

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


def cdiv(a, b):
    return -(-a // b)


# ---------------------------------------------------------------------------------------------
# helpers: expected block classification from a dense mask
# ---------------------------------------------------------------------------------------------
def expected_block_maps(dense: torch.Tensor, block_size):
    """(partial, full) bool [B, H, NQ, NKV] from a dense [B, H, Q, KV] mask; ragged tails count in-bounds only."""
    q_bs, kv_bs = block_size
    Bn, Hn, Qn, KVn = dense.shape
    nq, nkv = cdiv(Qn, q_bs), cdiv(KVn, kv_bs)
    partial = torch.zeros(Bn, Hn, nq, nkv, dtype=torch.bool)
    full = torch.zeros_like(partial)
    for i in range(nq):
        for j in range(nkv):
            tile = dense[:, :, i * q_bs:(i + 1) * q_bs, j * kv_bs:(j + 1) * kv_bs]
            full[:, :, i, j] = tile.flatten(2).all(-1)
            partial[:, :, i, j] = tile.flatten(2).any(-1) & ~full[:, :, i, j]
    return partial, full


def assert_layout_consistent(bm: ta.BlockMask):
    """FlexAttention field conventions: int32, valid indices first and ascending, q_* the transpose of kv_*."""
    Bn, Hn = bm.shape[:2]
    nq, nkv = cdiv(bm.seq_lengths[0], bm.BLOCK_SIZE[0]), cdiv(bm.seq_lengths[1], bm.BLOCK_SIZE[1])
    assert bm.num_blocks == (nq, nkv), f"num_blocks {bm.num_blocks}, expected {(nq, nkv)}"
    for prefix in ("", "full_"):
        kv_num, kv_idx = getattr(bm, f"{prefix}kv_num_blocks"), getattr(bm, f"{prefix}kv_indices")
        q_num, q_idx = getattr(bm, f"{prefix}q_num_blocks"), getattr(bm, f"{prefix}q_indices")
        for name, t in ((f"{prefix}kv_num_blocks", kv_num), (f"{prefix}kv_indices", kv_idx),
                        (f"{prefix}q_num_blocks", q_num), (f"{prefix}q_indices", q_idx)):
            assert t.dtype == torch.int32, f"{name} dtype {t.dtype}, expected int32"
        assert kv_num.shape == (Bn, Hn, nq) and kv_idx.shape == (Bn, Hn, nq, nkv), f"{prefix}kv shapes"
        assert q_num.shape == (Bn, Hn, nkv) and q_idx.shape == (Bn, Hn, nkv, nq), f"{prefix}q shapes"
        for num, idx, cols in ((kv_num, kv_idx, nkv), (q_num, q_idx, nq)):
            assert bool(((num >= 0) & (num <= cols)).all())
            assert bool(((idx >= 0) & (idx < cols)).all()), "indices out of range"
            # every row of indices is a permutation of range(cols) with the valid ones first, ascending
            assert torch.equal(idx.sort(-1).values, torch.arange(cols, dtype=torch.int32).expand_as(idx))
            valid = torch.arange(cols) < num.unsqueeze(-1)
            ascending = idx[..., 1:] > idx[..., :-1]
            assert bool((ascending | ~(valid[..., 1:])).all()), "valid indices must be ascending"
    from triton_attn.masks.block_mask import dense_from_ordered
    assert torch.equal(dense_from_ordered(bm.q_num_blocks, bm.q_indices, nq).transpose(-1, -2), bm.partial_blocks()), \
        "q_num_blocks/q_indices must be the transpose of the partial kv layout"
    assert torch.equal(dense_from_ordered(bm.full_q_num_blocks, bm.full_q_indices, nq).transpose(-1, -2),
                       bm.full_blocks()), "full_q_* must be the transpose of the full kv layout"
    assert not bool((bm.partial_blocks() & bm.full_blocks()).any()), "a block is both partial and full"


def assert_classified(bm: ta.BlockMask, dense: torch.Tensor, what: str):
    partial, full = expected_block_maps(dense, bm.BLOCK_SIZE)
    for name, got, exp in (("partial", bm.partial_blocks(), partial), ("full", bm.full_blocks(), full)):
        exp = exp.expand_as(got) if got.shape != exp.shape and exp.shape[:2] == (1, 1) else exp
        assert got.shape == exp.shape, f"{what}: {name} map shape {tuple(got.shape)} != {tuple(exp.shape)}"
        diff = (got != exp).nonzero()
        assert diff.numel() == 0, (f"{what}: {diff.shape[0]} blocks misclassified as {name}, first (b, h, i, j) = "
                                   f"{tuple(diff[0].tolist())}")


# ---------------------------------------------------------------------------------------------
# random compositions with captured tensors, odd lengths, B/H broadcast, both block-size forms
# ---------------------------------------------------------------------------------------------
@st.composite
def mask_tree(draw, Bn, Hn, Qn, KVn, depth=2):
    """(mask_mod, dense [Bn, Hn, Qn, KVn] computed independently, uses_b, uses_h)."""
    q = torch.arange(Qn).view(1, 1, -1, 1)
    k = torch.arange(KVn).view(1, 1, 1, -1)
    shape = (Bn, Hn, Qn, KVn)
    if depth == 0 or draw(st.booleans()):
        kind = draw(st.sampled_from(["causal", "full", "window", "chunk", "prefix", "prefix_b", "doc", "doc1d",
                                     "pad", "head_window", "random_table"]))
        if kind == "causal":
            return causal_mask, (k <= q).expand(shape), False, False
        if kind == "full":
            return full_mask, torch.ones(shape, dtype=torch.bool), False, False
        if kind == "window":
            w = draw(st.integers(1, 40))
            return sliding_window_mask(w), ((q - k >= 0) & (q - k < w)).expand(shape), False, False
        if kind == "chunk":
            c = draw(st.integers(1, 40))
            return chunked_mask(c), (q // c == k // c).expand(shape), False, False
        if kind == "prefix":
            p = draw(st.integers(0, 60))
            return prefix_lm_mask(p), ((k < p) | (k <= q)).expand(shape), False, False
        if kind == "prefix_b":
            p = torch.tensor(draw(st.lists(st.integers(0, 60), min_size=Bn, max_size=Bn)))
            return prefix_lm_mask(p), ((k < p.view(-1, 1, 1, 1)) | (k <= q)).expand(shape), True, False
        S = max(Qn, KVn)
        if kind in ("doc", "doc1d"):
            rows = 1 if kind == "doc1d" else Bn
            bounds = [sorted(draw(st.lists(st.integers(0, S), max_size=4))) for _ in range(rows)]
            ids = torch.stack([torch.bucketize(torch.arange(S), torch.tensor(bd, dtype=torch.long), right=True)
                               for bd in bounds])
            ids_q, ids_k = ids[:, :Qn].view(rows, 1, Qn, 1), ids[:, :KVn].view(rows, 1, 1, KVn)
            captured = ids[0] if kind == "doc1d" else ids
            return document_mask(captured), (ids_q == ids_k).expand(shape), kind == "doc", False
        if kind == "pad":
            am = torch.tensor(draw(st.lists(st.lists(st.integers(0, 1), min_size=KVn, max_size=KVn),
                                            min_size=Bn, max_size=Bn)))
            return padding_mask(am), am.bool().view(Bn, 1, 1, KVn).expand(shape), True, False
        if kind == "head_window":
            windows = torch.tensor(draw(st.lists(st.integers(1, 50), min_size=Hn, max_size=Hn)))

            def head_window(b, h, q_idx, kv_idx):
                return (q_idx >= kv_idx) & (q_idx - kv_idx < windows[h])

            return head_window, ((q >= k) & (q - k < windows.view(1, -1, 1, 1))).expand(shape), False, True
        # an arbitrary pattern read from a captured [B, H, Q, KV] table
        density = draw(st.sampled_from([0.05, 0.5, 0.95]))
        table = torch.rand(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16)))) < density

        def random_table(b, h, q_idx, kv_idx):
            return table[b, h, q_idx, kv_idx]

        return random_table, table, True, True
    op = draw(st.sampled_from(["and", "or", "not"]))
    if op == "not":
        mod, dense, ub, uh = draw(mask_tree(Bn, Hn, Qn, KVn, depth - 1))
        return not_mask(mod), ~dense, ub, uh
    parts = draw(st.lists(mask_tree(Bn, Hn, Qn, KVn, depth - 1), min_size=2, max_size=3))
    mods = [p[0] for p in parts]
    dense = parts[0][1]
    for p in parts[1:]:
        dense = (dense & p[1]) if op == "and" else (dense | p[1])
    combine = and_masks if op == "and" else or_masks
    return combine(*mods), dense, any(p[2] for p in parts), any(p[3] for p in parts)


block_sizes = st.one_of(st.sampled_from([8, 16, 32, 128]),
                        st.tuples(st.sampled_from([8, 16, 64]), st.sampled_from([8, 16, 32, 128])))


@given(data=st.data(), Bn=st.integers(1, 3), Hn=st.integers(1, 3), Qn=st.integers(1, 130), KVn=st.integers(1, 130),
       block_size=block_sizes, broadcast=st.booleans())
@settings(max_examples=60)
def test_random_compositions_block_mask_matches_dense(data, Bn, Hn, Qn, KVn, block_size, broadcast):
    mod, dense, uses_b, uses_h = data.draw(mask_tree(Bn, Hn, Qn, KVn))
    dense = dense.contiguous()
    B_arg = None if (broadcast and not uses_b) else Bn
    H_arg = None if (broadcast and not uses_h) else Hn
    expected = dense[: 1 if B_arg is None else Bn, : 1 if H_arg is None else Hn]
    what = f"{mod.__name__} B={B_arg} H={H_arg} Q={Qn} KV={KVn} BLOCK_SIZE={block_size}"

    assert torch.equal(ta.create_mask(mod, B_arg, H_arg, Qn, KVn), expected), f"create_mask disagrees: {what}"
    bm = ta.create_block_mask(mod, B_arg, H_arg, Qn, KVn, BLOCK_SIZE=block_size)
    pair = (block_size, block_size) if isinstance(block_size, int) else block_size
    assert bm.BLOCK_SIZE == pair and bm.seq_lengths == (Qn, KVn)
    assert bm.shape == (expected.shape[0], expected.shape[1], Qn, KVn), f"shape {bm.shape}: {what}"
    assert bm.mask_mod is mod
    assert_layout_consistent(bm)
    assert_classified(bm, expected, what)


# ---------------------------------------------------------------------------------------------
# fixed cases
# ---------------------------------------------------------------------------------------------
def test_causal_block_structure():
    bm = ta.create_block_mask(causal_mask, None, None, 256, 256, BLOCK_SIZE=64)
    nq = 4
    full_expected = torch.tril(torch.ones(nq, nq, dtype=torch.bool), diagonal=-1)
    assert torch.equal(bm.full_blocks()[0, 0], full_expected)
    assert torch.equal(bm.partial_blocks()[0, 0], torch.eye(nq, dtype=torch.bool))
    assert bm.kv_num_blocks.tolist() == [[[1, 1, 1, 1]]]
    assert bm.full_kv_num_blocks.tolist() == [[[0, 1, 2, 3]]]
    assert bm.kv_indices[0, 0, :, 0].tolist() == [0, 1, 2, 3]


def test_ragged_tail_block_counts_as_full_when_all_in_bounds_true():
    # Q=KV=20, BLOCK 16: the tail tile [16:20, 0:16] is fully True for causal in bounds.
    bm = ta.create_block_mask(causal_mask, 1, 1, 20, 20, BLOCK_SIZE=16)
    assert bm.full_blocks()[0, 0].tolist() == [[False, False], [True, False]]
    assert bm.partial_blocks()[0, 0].tolist() == [[True, False], [False, True]]
    bm = ta.create_block_mask(full_mask, 1, 1, 1, 1, BLOCK_SIZE=128)
    assert bm.full_blocks().tolist() == [[[[True]]]] and bm.kv_num_blocks.sum() == 0


def test_rectangular_block_size_pair():
    bm = ta.create_block_mask(causal_mask, 1, 1, 64, 64, BLOCK_SIZE=(32, 16))
    assert bm.BLOCK_SIZE == (32, 16) and bm.num_blocks == (2, 4)
    assert_classified(bm, ta.create_mask(causal_mask, 1, 1, 64, 64), "causal (32, 16)")
    bm_list = ta.create_block_mask(causal_mask, 1, 1, 64, 64, BLOCK_SIZE=[32, 16])
    assert bm_list.BLOCK_SIZE == (32, 16)


def test_empty_mask_sparsity_100():
    never = not_mask(full_mask)
    bm = ta.create_block_mask(never, 2, 1, 33, 65, BLOCK_SIZE=16)
    assert bm.sparsity() == 100.0 and int(bm.to_dense().sum()) == 0


# ---------------------------------------------------------------------------------------------
# views: to_dense, to_string, sparsity, shape, to, slicing
# ---------------------------------------------------------------------------------------------
def test_to_dense_is_block_level_int32():
    bm = ta.create_block_mask(sliding_window_mask(20), 2, 3, 100, 70, BLOCK_SIZE=(16, 32))
    dense = bm.to_dense()
    assert dense.dtype == torch.int32 and dense.shape == (2, 3, 7, 3)
    assert torch.equal(dense.bool(), bm.partial_blocks() | bm.full_blocks())


def test_sparsity_counts_blocks():
    bm = ta.create_block_mask(causal_mask, None, None, 128, 128, BLOCK_SIZE=32)
    # 4x4 blocks, 10 computed (diagonal + below), 6 skipped
    assert bm.sparsity() == pytest.approx(100.0 * 6 / 16)
    assert ta.create_block_mask(full_mask, 2, 2, 50, 50, BLOCK_SIZE=16).sparsity() == 0.0


def test_to_string_pictures():
    bm = ta.create_block_mask(causal_mask, None, None, 64, 64, BLOCK_SIZE=16)
    text = bm.to_string()
    lines = text.splitlines()
    assert lines[0] == "(b=0, h=0)"
    assert lines[1:] == ["░░" + "  " * 3 + "|", "██░░" + "  " * 2 + "|", "████░░  |", "██████░░|"], text
    many = ta.create_block_mask(causal_mask, 3, 3, 32, 32, BLOCK_SIZE=16)
    assert "more" in many.to_string(limit=4) and many.to_string(limit=4).count("(b=") == 4
    assert many.to_string(limit=9).count("(b=") == 9
    # large maps are summarized into at most grid_size characters per side
    big = ta.create_block_mask(causal_mask, None, None, 300, 300, BLOCK_SIZE=8)
    rows = big.to_string(grid_size=(5, 5)).splitlines()[1:]
    assert len(rows) <= 5 and all(len(r) <= 2 * 5 + 1 for r in rows)
    assert len(big.to_string(grid_size=-1).splitlines()) == 1 + cdiv(300, 8)
    assert "sparsity" in str(bm) and "BlockMask" in repr(bm) and "causal_mask" in repr(bm)


def test_shape_broadcast_and_full():
    assert ta.create_block_mask(causal_mask, None, None, 17, 9, BLOCK_SIZE=8).shape == (1, 1, 17, 9)
    assert ta.create_block_mask(causal_mask, 4, None, 17, 9, BLOCK_SIZE=8).shape == (4, 1, 17, 9)
    assert ta.create_block_mask(causal_mask, None, 5, 17, 9, BLOCK_SIZE=8).shape == (1, 5, 17, 9)


def test_to_device_copies_fields():
    bm = ta.create_block_mask(sliding_window_mask(9), 2, 1, 40, 40, BLOCK_SIZE=16)
    moved = bm.to("meta")
    assert moved.device.type == "meta" and bm.device.type == "cpu"
    for name in ta.BlockMask._TENSOR_FIELDS:
        assert getattr(moved, name).device.type == "meta", name
        assert getattr(moved, name).shape == getattr(bm, name).shape, name
    assert moved.mask_mod is bm.mask_mod and moved.BLOCK_SIZE == bm.BLOCK_SIZE and moved.seq_lengths == bm.seq_lengths
    back = bm.to(torch.device("cpu"))
    assert torch.equal(back.to_dense(), bm.to_dense()) and back is not bm



def _narrowed(bm: ta.BlockMask, kv_width: int, q_width: int, **replace) -> ta.BlockMask:
    """``bm`` with its index lists cut to the given widths (valid entries come first, so a width of at least the
    longest row keeps every block), as a fresh, unvalidated BlockMask; ``replace``: fields to swap in."""
    fields = {name: getattr(bm, name) for name in ta.BlockMask._TENSOR_FIELDS}
    for name in ("kv_indices", "full_kv_indices", "q_indices", "full_q_indices"):
        fields[name] = fields[name][..., :kv_width if "kv" in name else q_width].contiguous()
    fields.update(replace)
    return ta.BlockMask(**fields, BLOCK_SIZE=bm.BLOCK_SIZE, seq_lengths=bm.seq_lengths, mask_mod=bm.mask_mod)


def test_index_lists_narrower_than_the_grid():
    """FlexAttention's lists may be narrower than the block grid (kernels read a row's first num entries): the
    grid comes from the lists' row counts, validate accepts widths 1..grid, and attention reads them."""
    bm = ta.create_block_mask(sliding_window_mask(20), 2, None, 150, 150, BLOCK_SIZE=16)   # 10 x 10 blocks
    most = int((bm.kv_num_blocks + bm.full_kv_num_blocks).max())
    assert most < 10
    narrow = _narrowed(bm, most, most).validate()  # the value checks, with one device read
    assert narrow.num_blocks == (10, 10) and narrow.kv_indices.shape == (2, 1, 10, most)
    assert torch.equal(narrow.to_dense(), bm.to_dense()) and torch.equal(narrow.full_blocks(), bm.full_blocks())
    assert narrow[1].num_blocks == (10, 10) and torch.equal(narrow[1].to_dense(), bm.to_dense()[1:])
    assert narrow.sparsity() == pytest.approx(bm.sparsity()) and narrow.to_string() == bm.to_string()
    q, k, v = torch.randn(2, 2, 150, 16), torch.randn(2, 2, 150, 16), torch.randn(2, 2, 150, 16)
    torch.testing.assert_close(ta.attention(q, k, v, block_mask=narrow, backend="torch"),
                               ta.attention(q, k, v, block_mask=bm, backend="torch"), rtol=0, atol=1e-6)
    # Too narrow for a row's blocks, wider than the grid, no width, or partial and full lists of other widths.
    with pytest.raises(ValueError, match="kv_num_blocks must be between 0 and 1"):
        _narrowed(bm, 1, most).validate()
    wider = torch.cat([bm.kv_indices, bm.kv_indices[..., :1]], -1)
    with pytest.raises(ValueError, match="kv_indices has width 11, expected 1 to 10"):
        _narrowed(bm, 10, 10, kv_indices=wider, full_kv_indices=wider.clone()).validate()
    with pytest.raises(ValueError, match="q_indices has width 0, expected 1 to 10"):
        _narrowed(bm, most, 0).validate()
    with pytest.raises(ValueError, match=f"kv_indices has width {most}, expected 10 \\(that of full_kv_indices"):
        _narrowed(bm, most, most, full_kv_indices=bm.full_kv_indices).validate()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_cuda_and_attention_moves_mask():
    bm = ta.create_block_mask(causal_mask, None, None, 40, 40, BLOCK_SIZE=16)
    assert bm.to("cuda").device.type == "cuda"


def _bh_mask():
    table = torch.rand(3, 4, 37, 45) < 0.6
    offsets = torch.tensor([0, 3, 7])

    def bh_dependent(b, h, q_idx, kv_idx):
        return table[b, h, q_idx, kv_idx] | (q_idx - kv_idx == offsets[b] + h)

    return bh_dependent


@pytest.mark.parametrize("index, b_sel, h_sel", [
    ((1, 2), [1], [2]),
    ((-1, -4), [2], [0]),
    ((slice(0, 2),), [0, 1], [0, 1, 2, 3]),
    (1, [1], [0, 1, 2, 3]),
    ((slice(None), slice(1, 4, 2)), [0, 1, 2], [1, 3]),
    ((torch.tensor([2, 0]), torch.tensor([3, 1])), [2, 0], [3, 1]),
])
def test_slicing_keeps_layout_and_mask_mod(index, b_sel, h_sel):
    mod = _bh_mask()
    bm = ta.create_block_mask(mod, 3, 4, 37, 45, BLOCK_SIZE=16)
    sub = bm[index]
    assert sub.shape == (len(b_sel), len(h_sel), 37, 45)
    expected = bm.to_dense()[b_sel][:, h_sel]
    assert torch.equal(sub.to_dense(), expected)
    assert torch.equal(sub.full_blocks(), bm.full_blocks()[b_sel][:, h_sel])
    assert_layout_consistent(sub)
    # the sliced mask_mod answers for local (b, h) what the original does for the selected ones
    dense_sub = ta.create_mask(sub.mask_mod, len(b_sel), len(h_sel), 37, 45)
    assert torch.equal(dense_sub, ta.create_mask(mod, 3, 4, 37, 45)[b_sel][:, h_sel])
    assert sub.mask_mod.__name__.startswith("bh_dependent")


def test_sliced_mask_in_attention_matches_slice_of_output():
    mod = _bh_mask()
    bm = ta.create_block_mask(mod, 3, 4, 37, 45, BLOCK_SIZE=16)
    q, k, v = torch.randn(3, 4, 37, 32), torch.randn(3, 4, 45, 32), torch.randn(3, 4, 45, 24)
    full_out, full_lse = ta.attention(q, k, v, block_mask=bm, return_lse=True, backend="torch")
    for b_sel, h_sel in (([1], [2]), ([0, 2], [1, 3]), ([2], [0, 1, 2, 3])):
        sub = bm[torch.tensor(b_sel), torch.tensor(h_sel)]
        out, lse = ta.attention(q[b_sel][:, h_sel], k[b_sel][:, h_sel], v[b_sel][:, h_sel], block_mask=sub,
                                return_lse=True, backend="torch")
        torch.testing.assert_close(out, full_out[b_sel][:, h_sel], rtol=0, atol=1e-6)
        torch.testing.assert_close(lse, full_lse[b_sel][:, h_sel], rtol=0, atol=1e-6)


def test_slicing_errors():
    bm = ta.create_block_mask(causal_mask, 2, 2, 16, 16, BLOCK_SIZE=8)
    with pytest.raises(IndexError, match="out of range"):
        bm[2]
    with pytest.raises(IndexError, match=r"\[batch, head, query block\] at most"):
        bm[0, 0, 0, 0]  # (a third index selects query block rows, as FlexAttention's: tests/test_flex_parity.py)


# ---------------------------------------------------------------------------------------------
# bounded memory of the exact compiler
# ---------------------------------------------------------------------------------------------
def _recording(mod, seen):
    def recording(b, h, q_idx, kv_idx):
        kv_idx.shape[-1]  # a traced value is one element (0-d): this raises, so the mod stays untraceable
        seen.append(torch.broadcast_shapes(b.shape, h.shape, q_idx.shape, kv_idx.shape).numel())
        return mod(b, h, q_idx, kv_idx)
    return recording


@pytest.mark.parametrize("block_size", [16, (8, 32)])
def test_element_budget_bounds_every_mask_mod_call(monkeypatch, block_size):
    ids = torch.randint(0, 3, (2, 200)).sort(-1).values
    mod = and_masks(causal_mask, document_mask(ids), not_mask(sliding_window_mask(3)))
    reference_bm = ta.create_block_mask(mod, 2, 3, 200, 150, BLOCK_SIZE=block_size)
    reference_dense = ta.create_mask(mod, 2, 3, 200, 150)

    budget = 4096  # >= one tile (q_bs * kv_bs), so the bound is the budget itself
    monkeypatch.setattr(compiler, "ELEMENT_BUDGET", budget)
    seen = []
    with pytest.warns(UserWarning, match="cannot be traced"):  # shape[-1] on a symbol: the exact compiler runs
        bm = ta.create_block_mask(_recording(mod, seen), 2, 3, 200, 150, BLOCK_SIZE=block_size)
    assert len(seen) > 1 and max(seen) <= budget, \
        f"create_block_mask called the mask_mod on up to {max(seen)} elements with ELEMENT_BUDGET={budget}"
    assert sum(seen) == 2 * 3 * 200 * 150, "every element is evaluated exactly once"
    assert torch.equal(bm.to_dense(), reference_bm.to_dense())
    assert torch.equal(bm.full_blocks(), reference_bm.full_blocks())

    seen.clear()
    dense = ta.create_mask(_recording(mod, seen), 2, 3, 200, 150)
    assert len(seen) > 1 and max(seen) <= budget, \
        f"create_mask called the mask_mod on up to {max(seen)} elements with ELEMENT_BUDGET={budget}"
    assert torch.equal(dense, reference_dense)


# ---------------------------------------------------------------------------------------------
# FlexAttention interop
# ---------------------------------------------------------------------------------------------
flex = pytest.importorskip("torch.nn.attention.flex_attention")


def _flex_cases():
    ids = torch.tensor([[0] * 40 + [1] * 50 + [2] * 38, [0] * 100 + [1] * 28])
    am = (torch.arange(96) < torch.tensor([[96], [60]])).long()
    return [
        ("causal", causal_mask, None, None, 128, 128, 32),
        ("doc_causal", and_masks(causal_mask, document_mask(ids)), 2, None, 128, 128, (32, 16)),
        ("window_pad", and_masks(sliding_window_mask(20), padding_mask(am)), 2, 2, 64, 96, 16),
        ("prefix_or_chunk", or_masks(prefix_lm_mask(10), chunked_mask(24)), None, 3, 96, 48, 16),
    ]


@pytest.mark.parametrize("case", _flex_cases(), ids=lambda c: c[0])
def test_from_flex_matches_ours_block_for_block(case):
    _, mod, Bn, Hn, Qn, KVn, bs = case
    ours = ta.create_block_mask(mod, Bn, Hn, Qn, KVn, BLOCK_SIZE=bs)
    theirs = flex.create_block_mask(mod, Bn, Hn, Qn, KVn, device="cpu", BLOCK_SIZE=bs)
    converted = ta.BlockMask.from_flex(theirs)
    assert converted.shape == ours.shape and converted.BLOCK_SIZE == ours.BLOCK_SIZE
    for name in ta.BlockMask._TENSOR_FIELDS:
        assert torch.equal(getattr(converted, name), getattr(ours, name)), f"{name} differs from FlexAttention's"
    assert converted.mask_mod is mod


def _flex_attention_runs_on_cpu() -> bool:
    q = torch.randn(1, 1, 16, 16)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flex.flex_attention(q, q, q)
        return True
    except Exception:  # older torch: flex_attention needs CUDA or torch.compile
        return False


@pytest.mark.parametrize("case", _flex_cases(), ids=lambda c: c[0])
def test_to_flex_round_trip_and_flex_attention(case):
    _, mod, Bn, Hn, Qn, KVn, bs = case
    ours = ta.create_block_mask(mod, Bn, Hn, Qn, KVn, BLOCK_SIZE=bs)
    theirs = ours.to_flex()
    assert isinstance(theirs, flex.BlockMask)
    assert tuple(theirs.seq_lengths) == (Qn, KVn) and tuple(theirs.BLOCK_SIZE) == ours.BLOCK_SIZE
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        assert torch.equal(getattr(theirs, name), getattr(ours, name)), name
    back = ta.BlockMask.from_flex(theirs)
    for name in ta.BlockMask._TENSOR_FIELDS:
        assert torch.equal(getattr(back, name), getattr(ours, name)), f"round trip changed {name}"
    if not _flex_attention_runs_on_cpu():
        pytest.skip("flex_attention does not run eagerly on CPU in this torch; fields compared above")
    Hq = Hn or 2
    q = torch.randn(Bn or 2, Hq, Qn, 32)
    k, v = torch.randn(Bn or 2, Hq, KVn, 32), torch.randn(Bn or 2, Hq, KVn, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = flex.flex_attention(q, k, v, block_mask=theirs)
    got = ta.attention(q, k, v, block_mask=ours, backend="torch")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # a FlexAttention BlockMask is accepted by attention() directly
    torch.testing.assert_close(ta.attention(q, k, v, block_mask=theirs, backend="torch"), got, rtol=0, atol=1e-6)
