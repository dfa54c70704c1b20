"""CompactBlockMask: compressed rows with the FlexAttention fields on demand."""

from __future__ import annotations

import time

import pytest
import torch

import triton_attn as ta
from triton_attn.masks import (
    and_masks,
    causal_mask,
    compiler,
    document_mask,
    or_masks,
    padding_mask,
    prefix_lm_mask,
    sliding_window_mask,
)
from triton_attn.masks.compact import CompactBlockMask


def _cases():
    ids = torch.tensor([[0] * 40 + [1] * 50 + [2] * 47, [0] * 100 + [1] * 37])
    am = (torch.arange(137) < torch.tensor([[137], [60]])).long()
    head_windows = torch.tensor([3, 20, 70])

    def head_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < head_windows[h])

    return [
        ("causal", causal_mask, None, None, 137, 137, 32),
        ("doc_causal_B", and_masks(causal_mask, document_mask(ids)), 2, 3, 137, 137, (32, 16)),
        ("window_pad", and_masks(sliding_window_mask(20), padding_mask(am)), 2, None, 101, 137, 16),
        ("prefix_or_heads", or_masks(prefix_lm_mask(10), head_window), None, 3, 137, 120, (16, 8)),
        ("heads_B_broadcast", head_window, 2, 3, 64, 64, 8),
    ]


@pytest.fixture(params=_cases(), ids=lambda c: c[0])
def case(request):
    _, mod, Bn, Hn, Qn, KVn, bs = request.param
    dense = ta.create_block_mask(mod, Bn, Hn, Qn, KVn, BLOCK_SIZE=bs, layout="dense")
    compact = ta.create_block_mask(mod, Bn, Hn, Qn, KVn, BLOCK_SIZE=bs, layout="compact")
    return mod, dense, compact


def test_fields_views_and_layout_share_of_b_h(case):
    mod, dense, compact = case
    assert isinstance(compact, ta.BlockMask) and isinstance(compact, CompactBlockMask)
    assert compact.shape == dense.shape and compact.num_blocks == dense.num_blocks
    assert compact.device == dense.device and compact.BLOCK_SIZE == dense.BLOCK_SIZE
    assert compact._dense == {}, "nothing dense is built until asked for"
    assert compact.sparsity() == pytest.approx(dense.sparsity())
    assert compact.to_string() == dense.to_string()
    assert compact.to_string(grid_size=-1, limit=10) == dense.to_string(grid_size=-1, limit=10)
    assert compact.to_string(grid_size=3) == dense.to_string(grid_size=3)
    assert torch.equal(compact.partial_blocks(), dense.partial_blocks())
    assert torch.equal(compact.full_blocks(), dense.full_blocks())
    assert torch.equal(compact.to_dense(), dense.to_dense())
    assert compact._dense == {}
    for name in ta.BlockMask._TENSOR_FIELDS:
        assert torch.equal(getattr(compact, name), getattr(dense, name)), name
    assert compact._dense, "the fields are cached once built"
    compact.release_dense()
    assert compact._dense == {}
    for got, want in zip(compact.as_tuple(), dense.as_tuple()):
        assert torch.equal(got, want) if isinstance(want, torch.Tensor) else got == want


def test_csr_accessors_match_the_dense_fields(case):
    _, dense, compact = case
    nq, nkv = dense.num_blocks
    Bn, Hn = dense.shape[:2]
    for full in (False, True):
        prefix = "full_" if full else ""
        ptr, cols = compact.kv_csr(full)
        t_ptr, t_rows = compact.q_csr(full)
        assert ptr.dtype == torch.int64 and cols.dtype == torch.int32 and t_rows.dtype == torch.int32
        kv_num, kv_idx = getattr(dense, f"{prefix}kv_num_blocks"), getattr(dense, f"{prefix}kv_indices")
        q_num, q_idx = getattr(dense, f"{prefix}q_num_blocks"), getattr(dense, f"{prefix}q_indices")
        for b in range(Bn):
            for h in range(Hn):
                layout = compact.layout_index(b, h)
                for i in range(nq):
                    r = layout * nq + i
                    assert cols[ptr[r]:ptr[r + 1]].tolist() == kv_idx[b, h, i, :kv_num[b, h, i]].tolist()
                for j in range(nkv):
                    r = layout * nkv + j
                    assert t_rows[t_ptr[r]:t_ptr[r + 1]].tolist() == q_idx[b, h, j, :q_num[b, h, j]].tolist()


def test_row_layout_matches_the_torch_backend_view(case):
    _, dense, compact = case
    Bn, Hn = dense.shape[:2]
    for row in range(dense.num_blocks[0]):
        for (num, idx), (want_num, want_idx) in zip(compact.row_layout(row), dense.row_layout(row, "cpu")):
            num, idx = num.expand(Bn, Hn), idx.expand(Bn, Hn, idx.shape[-1])
            assert torch.equal(num, want_num)
            for b in range(Bn):
                for h in range(Hn):
                    n = int(num[b, h])
                    assert idx[b, h, :n].tolist() == want_idx[b, h, :n].tolist()


def test_slicing_and_to_stay_compact(case):
    _, dense, compact = case
    Bn, Hn = dense.shape[:2]
    for index in ((0,), (slice(None), Hn - 1), (torch.tensor([Bn - 1, 0]), torch.tensor([Hn - 1])), (-1, -1)):
        got, want = compact[index], dense[index]
        assert isinstance(got, CompactBlockMask) and got.shape == want.shape, index
        for name in ta.BlockMask._TENSOR_FIELDS:
            assert torch.equal(getattr(got, name), getattr(want, name)), (index, name)
        q = torch.arange(want.seq_lengths[0]).view(1, 1, -1, 1)
        k = torch.arange(want.seq_lengths[1]).view(1, 1, 1, -1)
        b, h = torch.arange(want.shape[0]).view(-1, 1, 1, 1), torch.arange(want.shape[1]).view(1, -1, 1, 1)
        assert torch.equal(got.mask_mod(b, h, q, k), want.mask_mod(b, h, q, k))
    moved = compact.to("cpu")
    assert isinstance(moved, CompactBlockMask) and moved.nbytes() == compact.nbytes()
    with pytest.raises(IndexError, match="out of range"):
        compact[Bn]


def test_conversions(case):
    _, dense, compact = case
    back = compact.to_block_mask()
    assert type(back) is ta.BlockMask
    again = CompactBlockMask.from_block_mask(dense)
    for name in ta.BlockMask._TENSOR_FIELDS:
        assert torch.equal(getattr(back, name), getattr(dense, name))
        assert torch.equal(getattr(again, name), getattr(dense, name))
    assert CompactBlockMask.from_block_mask(compact) is compact


def test_attention_with_a_compact_mask_equals_dense(case):
    mod, dense, compact = case
    Bn, Hn, Qn, KVn = dense.shape
    q, k, v = torch.randn(Bn, Hn, Qn, 16), torch.randn(Bn, Hn, KVn, 16), torch.randn(Bn, Hn, KVn, 8)
    want = ta.attention(q, k, v, block_mask=dense, backend="torch")
    got = ta.attention(q, k, v, block_mask=compact, backend="torch")
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_compact_attention_broadcast():
    compact = ta.create_block_mask(causal_mask, None, None, 100, 100, BLOCK_SIZE=16, layout="compact")
    dense = ta.create_block_mask(causal_mask, None, None, 100, 100, BLOCK_SIZE=16, layout="dense")
    q, k, v = torch.randn(2, 3, 100, 16), torch.randn(2, 3, 100, 16), torch.randn(2, 3, 100, 16)
    torch.testing.assert_close(ta.attention(q, k, v, block_mask=compact, backend="torch"),
                               ta.attention(q, k, v, block_mask=dense, backend="torch"), rtol=0, atol=0)


def test_auto_layout_threshold(monkeypatch):
    assert type(ta.create_block_mask(causal_mask, None, None, 1024, 1024)) is ta.BlockMask
    monkeypatch.setattr(compiler, "DENSE_LAYOUT_MAX_TILES", 63)
    assert isinstance(ta.create_block_mask(causal_mask, None, None, 1024, 1024, BLOCK_SIZE=128), CompactBlockMask)
    assert type(ta.create_block_mask(causal_mask, None, None, 1024, 1024, BLOCK_SIZE=128, layout="dense")) \
        is ta.BlockMask


def test_memory_proportional_to_non_empty_tiles():
    # 512k tokens causal, 128-blocks: 4096 x 4096 tiles, ~8.4M non-empty
    start = time.perf_counter()
    bm = ta.create_block_mask(causal_mask, None, None, 1 << 19, 1 << 19)
    elapsed = time.perf_counter() - start
    assert isinstance(bm, CompactBlockMask) and bm._dense == {}
    nq = 4096
    ptr, cols = bm.kv_csr(full=True)
    assert cols.numel() == nq * (nq - 1) // 2 and bm.kv_csr(full=False)[1].numel() == nq
    assert bm.nbytes() == 4 * (nq * (nq + 1) // 2) + 2 * 8 * (nq + 1)
    assert bm.nbytes() < 4 * nq * nq, "smaller than one dense int32 kv_indices"
    assert elapsed < 30, f"took {elapsed:.1f} s"


def test_from_block_maps_validates():
    partial = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="both"):
        CompactBlockMask.from_block_maps(partial | True, partial | True, BLOCK_SIZE=8, seq_lengths=(16, 16),
                                         mask_mod=None)
    with pytest.raises(ValueError, match=r"\[B, H, NQ, NKV\]"):
        CompactBlockMask.from_block_maps(partial[0], partial[0], BLOCK_SIZE=8, seq_lengths=(16, 16), mask_mod=None)


@pytest.mark.parametrize("batch", [1, 5, 1 << 22])
def test_transposed_rows_in_column_batches(monkeypatch, batch):
    from triton_attn.masks import compact as compact_module

    monkeypatch.setattr(compact_module, "TRANSPOSE_BATCH", batch)
    ids = torch.tensor([[0] * 40 + [1] * 50 + [2] * 47, [0] * 100 + [1] * 37])
    mod = and_masks(causal_mask, document_mask(ids))
    compact = ta.create_block_mask(mod, 2, None, 137, 137, BLOCK_SIZE=(16, 8), layout="compact")
    dense = ta.create_block_mask(mod, 2, None, 137, 137, BLOCK_SIZE=(16, 8), layout="dense")
    nq, nkv = dense.num_blocks
    for full in (False, True):
        prefix = "full_" if full else ""
        t_ptr, t_rows = compact.q_csr(full)
        q_num, q_idx = getattr(dense, f"{prefix}q_num_blocks"), getattr(dense, f"{prefix}q_indices")
        for b in range(2):
            for j in range(nkv):
                r = compact.layout_index(b, 0) * nkv + j
                assert t_rows[t_ptr[r]:t_ptr[r + 1]].tolist() == q_idx[b, 0, j, :q_num[b, 0, j]].tolist()
