"""``triton_attn.flex_attention`` / ``create_block_mask`` / ``BlockMask`` against torch's own FlexAttention.

Code written for ``torch.nn.attention.flex_attention`` must run unchanged here. Every public call form and
BlockMask method is compared with torch's eager implementation in float64 on CPU (our torch backend), field
by field for masks, value by value (and stride by stride) for outputs; one interpreter run checks the main
forms of the Triton kernels against the float64 golden result. Torch's eager flex_attention evaluates the
mask_mod densely (it never reads the block lists), so its outputs are the exact reference for ours.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import triton_attn as ta
from tests.helpers.numerics import assert_matches_golden
from triton_attn.masks import and_masks, causal_mask, document_mask, prefix_lm_mask, sliding_window_mask
from triton_attn.masks.block_mask import dense_from_ordered
from triton_attn.reference import dense_attention

flex = pytest.importorskip("torch.nn.attention.flex_attention")

F64 = dict(rtol=1e-10, atol=1e-10)


@pytest.fixture(autouse=True)
def eager_flex(monkeypatch):
    """Torch's flex_attention run eagerly (its math path, no dynamo): the same result, seconds faster."""
    monkeypatch.setattr(flex, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(deprecated|_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG).*")
        yield


def qkv(batch, q_heads, kv_heads, q_len, kv_len, dim, *, kv_batch=None, dtype=torch.float64):
    kv_batch = batch if kv_batch is None else kv_batch
    return (torch.randn(batch, q_heads, q_len, dim, dtype=dtype),
            torch.randn(kv_batch, kv_heads, kv_len, dim, dtype=dtype),
            torch.randn(kv_batch, kv_heads, kv_len, dim, dtype=dtype))


def doc_ids(batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, 3, (batch, length)).sort(-1).values


def both_masks(mask_mod, B, H, Q_LEN, KV_LEN, BLOCK_SIZE):
    """(ours, torch's) BlockMask of the same mask_mod."""
    return (ta.create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, BLOCK_SIZE=BLOCK_SIZE),
            flex.create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device="cpu", BLOCK_SIZE=BLOCK_SIZE))


def assert_same_layout(ours: ta.BlockMask, theirs, *, flex_may_list_past_the_grid: bool = False,
                       validate: bool = True) -> None:
    """Every field of ours against torch's: the valid (first ``num``) index entries as a block map (what
    follows them is padding, undefined in Flex's format) and the counts exactly; Flex's absent full lists
    are all-zero counts here. Then lengths, block size, shape and the dense block map.

    ``flex_may_list_past_the_grid``: Flex's ``_adjust`` recounts a row from its index list and can keep
    a block past the new length (harmless to its kernels, which bound-check); ours lists only blocks in
    the grid, so there Flex's counts may exceed ours by exactly those blocks."""
    assert tuple(ours.seq_lengths) == tuple(theirs.seq_lengths)
    assert ours.BLOCK_SIZE == tuple(theirs.BLOCK_SIZE)
    # Ours is always [B, H, ...]: Flex's lists without those dims become B = H = 1
    assert ours.shape == (1,) * (4 - len(theirs.shape)) + tuple(theirs.shape)
    nq, nkv = ours.num_blocks
    their_dense = torch.zeros(ours.to_dense().shape, dtype=torch.bool)
    for name, cols in (("kv", nkv), ("full_kv", nkv), ("q", nq), ("full_q", nq)):
        num, idx = getattr(ours, f"{name}_num_blocks"), getattr(ours, f"{name}_indices")
        their_num, their_idx = getattr(theirs, f"{name}_num_blocks"), getattr(theirs, f"{name}_indices")
        if their_num is None:
            # Flex has no such lists: no full blocks, or (compute_q_blocks=False) no transposed lists
            assert name in ("q", "full_q") or not bool(num.any()), f"{name}: Flex has no such blocks, ours lists some"
            continue
        their_num, their_idx = their_num.reshape(num.shape), their_idx.reshape(*num.shape, their_idx.shape[-1])
        width = max(cols, idx.shape[-1], their_idx.shape[-1])
        their_map = dense_from_ordered(their_num, their_idx, width)
        assert torch.equal(dense_from_ordered(num, idx, width), their_map[..., :cols] if flex_may_list_past_the_grid
                           else their_map), f"{name}_indices list other blocks than Flex's"
        their_count = their_map[..., :cols].sum(-1) if flex_may_list_past_the_grid else their_num
        assert torch.equal(num, their_count.to(num.dtype)), f"{name}_num_blocks differs from Flex's"
        if name in ("kv", "full_kv"):
            their_dense |= their_map[..., :cols]
    # (Flex's own to_dense assumes index lists as wide as the grid; ours reads any Flex lists)
    assert torch.equal(ours.to_dense(), their_dense.to(torch.int32))
    if validate:
        ours.validate()  # and the lists are consistent in our own layout


# ---------------------------------------------------------------------------------------------
# flex_attention: every call form, float64, against torch's
# ---------------------------------------------------------------------------------------------

def _bias_score(score, b, h, q_idx, kv_idx):
    return score + 0.1 * (q_idx - kv_idx) - 0.3 * h


def call_form(name: str, attend, q, k, v, block_mask):
    """One public call form of ``flex_attention`` (``attend``: ours or torch's). q has 4 heads, k/v 4;
    the GQA forms use the first 2 K/V heads."""
    k2, v2 = k[:, :2], v[:, :2]
    forms = {
        "plain": lambda: attend(q, k, v),
        "score_mod_positional": lambda: attend(q, k, v, _bias_score),
        "block_mask_keyword": lambda: attend(q, k, v, block_mask=block_mask),
        "both_positional_scale": lambda: attend(q, k, v, _bias_score, block_mask, 0.37),
        "keywords_gqa": lambda: attend(query=q, key=k2, value=v2, score_mod=_bias_score, block_mask=block_mask,
                                       scale=0.5, enable_gqa=True),
        "return_lse_positional": lambda: attend(q, k2, v2, None, block_mask, None, True, True),
        "return_aux_lse": lambda: attend(q, k, v, _bias_score, block_mask=block_mask,
                                         return_aux=flex.AuxRequest(lse=True)),
        "return_aux_nothing": lambda: attend(q, k, v, block_mask=block_mask, return_aux=flex.AuxRequest()),
        "kernel_options_hints": lambda: attend(q, k, v, block_mask=block_mask,
                                               kernel_options={"PRESCALE_QK": False, "ROWS_GUARANTEED_SAFE": False}),
    }
    return forms[name]()


FORMS = ["plain", "score_mod_positional", "block_mask_keyword", "both_positional_scale", "keywords_gqa",
         "return_lse_positional", "return_aux_lse", "return_aux_nothing", "kernel_options_hints"]


def as_pair(result):
    """(out, second): second is the lse, an AuxOutput, or None."""
    return (result, None) if isinstance(result, torch.Tensor) else result


@pytest.mark.parametrize("form", FORMS)
def test_call_forms_match_flex_in_float64(form, no_backend_env):
    mod = and_masks(causal_mask, document_mask(doc_ids(2, 72)))
    ours_bm, theirs_bm = both_masks(mod, 2, None, 72, 72, 32)
    q, k, v = qkv(2, 4, 4, 72, 72, 16)
    got, want = call_form(form, ta.flex_attention, q, k, v, ours_bm), call_form(form, flex.flex_attention, q, k, v,
                                                                                 theirs_bm)
    assert type(got) is type(want)
    (out, second), (their_out, their_second) = as_pair(got), as_pair(want)
    torch.testing.assert_close(out, their_out, **F64)
    assert out.stride() == their_out.stride()
    if isinstance(their_second, flex.AuxOutput):
        assert isinstance(second, flex.AuxOutput) and second.max_scores is None
        second, their_second = second.lse, their_second.lse
    if their_second is None:
        assert second is None
    else:  # float64 lse for float64 inputs, as Flex
        torch.testing.assert_close(second, their_second, **F64)


def test_errors_of_flex_forms():
    q, k, v = qkv(1, 4, 2, 16, 16, 8)
    for call, error, message in (
            (lambda: ta.flex_attention(q, k, v), ValueError, "enable_gqa=True"),
            (lambda: ta.flex_attention(q, k[:, :1].repeat(1, 3, 1, 1), v[:, :1].repeat(1, 3, 1, 1), enable_gqa=True),
             ValueError, "multiple of"),
            (lambda: ta.flex_attention(q, k, v, enable_gqa=True, return_lse=True,
                                       return_aux=flex.AuxRequest(lse=True)), ValueError, "return_lse or return_aux"),
            (lambda: ta.flex_attention(q, k, v, enable_gqa=True, return_aux=flex.AuxRequest(max_scores=True)),
             ValueError, "max_scores"),
            (lambda: ta.flex_attention(q, k, v, enable_gqa=True, kernel_options={"NO_SUCH_OPTION": 1}),
             ValueError, "NO_SUCH_OPTION")):
        with pytest.raises(error, match=message):
            call()


# ---------------------------------------------------------------------------------------------
# Gaps of the drop-in (issue 20 item 7): each fails on the code before the fix
# ---------------------------------------------------------------------------------------------

def _record_kv_launches(monkeypatch):
    """Record (key data_ptr, key batch stride) of every forward that reaches a backend, so that a
    broadcast K/V can be seen to arrive as a stride-0 view of the caller's tensor (no copy)."""
    from triton_attn.backends import run

    seen = []
    original = run.forward

    def record(route, query, key, value, *args, **kwargs):
        seen.append((key.data_ptr(), key.stride(0), value.data_ptr(), value.stride(0)))
        return original(route, query, key, value, *args, **kwargs)

    monkeypatch.setattr(run, "forward", record)
    return seen


def test_kv_batch_one_broadcasts_over_the_query_batch_like_flex(monkeypatch):
    ids = doc_ids(3, 64)
    mod = and_masks(causal_mask, document_mask(ids))
    ours_bm, theirs_bm = both_masks(mod, 3, None, 64, 64, 32)  # Flex needs the mask's B = query's B here
    q, k, v = qkv(3, 4, 2, 64, 64, 16, kv_batch=1)
    seen = _record_kv_launches(monkeypatch)
    out, lse = ta.flex_attention(q, k, v, _bias_score, ours_bm, enable_gqa=True, return_lse=True)
    want, want_aux = flex.flex_attention(q, k, v, _bias_score, theirs_bm, enable_gqa=True,
                                         return_aux=flex.AuxRequest(lse=True))
    torch.testing.assert_close(out, want, **F64)
    torch.testing.assert_close(lse, want_aux.lse, **F64)
    assert seen and all(entry == (k.data_ptr(), 0, v.data_ptr(), 0) for entry in seen), seen
    # float32 inference takes PyTorch's fused CPU kernel (cpu_flash.py) over the same stride-0 views
    out32 = ta.flex_attention(q.float(), k.float(), v.float(), block_mask=ours_bm, enable_gqa=True)
    torch.testing.assert_close(out32.double(), flex.flex_attention(q, k, v, block_mask=theirs_bm, enable_gqa=True),
                               rtol=0, atol=2e-6)
    # Backward (torch's CPU flex has none): K/V gradients are the sum over the broadcast batch.
    assert_matches_golden(lambda q_, k_, v_: ta.flex_attention(q_, k_, v_, _bias_score, ours_bm, enable_gqa=True,
                                                               return_lse=True),
                          q, k, v, mask_mod=mod, score_mod=_bias_score)


def test_kv_batch_one_on_the_interpreter_forward_decode_and_backward(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_ATTN_BACKEND", "interpret")
    ids = doc_ids(2, 40)
    mod = and_masks(causal_mask, document_mask(ids))
    block_mask = ta.create_block_mask(mod, 2, None, 40, 40, BLOCK_SIZE=16)
    q, k, v = qkv(2, 2, 1, 40, 40, 16, kv_batch=1, dtype=torch.float32)
    seen = _record_kv_launches(monkeypatch)
    assert_matches_golden(lambda q_, k_, v_: ta.flex_attention(q_, k_, v_, block_mask=block_mask, enable_gqa=True,
                                                               return_lse=True), q, k, v, mask_mod=mod)
    assert seen and all(entry[1] == 0 and entry[3] == 0 for entry in seen), seen
    # Decode (the split-KV kernel: 1 query row) of the last position against the dense golden result.
    last = block_mask[:, :, 2]
    last.mask_mod, last.seq_lengths = (lambda b, h, q_idx, kv_idx: mod(b, h, q_idx + 39, kv_idx)), (1, 40)
    with torch.no_grad():
        out = ta.flex_attention(q[:, :, 39:], k, v, block_mask=last, enable_gqa=True)
    golden, _ = dense_attention(q.double(), k.double(), v.double(), mask_mod=mod, compute_dtype=torch.float64)
    torch.testing.assert_close(out.double(), golden[:, :, 39:], rtol=0, atol=2e-6)


def _batch_dependent(b, h, q_idx, kv_idx):
    return (kv_idx <= q_idx) & (kv_idx >= 9 * b + 2 * h)


@pytest.mark.parametrize("query_batch, query_heads", [(1, 2), (2, 2), (1, 1)])
def test_mask_built_for_a_larger_batch_reads_its_leading_entries_like_flex(query_batch, query_heads):
    ours_bm, theirs_bm = both_masks(_batch_dependent, 4, 2, 96, 96, 32)
    q, k, v = qkv(query_batch, query_heads, query_heads, 96, 96, 16)
    out = ta.flex_attention(q, k, v, block_mask=ours_bm)
    want = flex.flex_attention(q, k, v, block_mask=theirs_bm)
    torch.testing.assert_close(out, want, **F64)
    # The decode pattern of Flex's tests: the batch-4 mask cropped to one query row, batch 1 queries.
    for position in (5, 40, 95):
        row, their_row = ours_bm._adjust(1, position + 1), theirs_bm._adjust(1, position + 1)
        q1 = q[:1, :, :1]
        out = ta.flex_attention(q1, k[:1, :, :position + 1], v[:1, :, :position + 1], block_mask=row)
        want = flex.flex_attention(q1, k[:1, :, :position + 1], v[:1, :, :position + 1], block_mask=their_row)
        torch.testing.assert_close(out, want, **F64)


def test_mask_with_fewer_batch_entries_than_the_query_is_refused():
    block_mask = ta.create_block_mask(_batch_dependent, 2, 2, 32, 32, BLOCK_SIZE=16)
    q, k, v = qkv(3, 2, 2, 32, 32, 8)
    with pytest.raises(ValueError, match=r"block_mask has batch size 2; expected 1 \(broadcast\) or at least"):
        ta.flex_attention(q, k, v, block_mask=block_mask)


ADJUST_MASKS = {
    "causal": (causal_mask, None, None),
    "doc_causal": (and_masks(causal_mask, document_mask(torch.tensor([[0] * 50 + [1] * 78, [0] * 90 + [1] * 38]))),
                   2, None),
    "prefix_lm_per_head": (lambda b, h, q_idx, kv_idx: (kv_idx < 20 + 30 * h) | (q_idx >= kv_idx), None, 2),
}


@pytest.mark.parametrize("name", ADJUST_MASKS)
# (lengths where Flex's own _adjust runs: see test_adjust_is_exact_where_flex_recount_is_not)
@pytest.mark.parametrize("new_lengths", [(1, 128), (1, 50), (33, 64), (70, 70), (128, 100)])
def test_adjust_matches_flex_field_by_field(name, new_lengths):
    mod, B, H = ADJUST_MASKS[name]
    ours_bm, theirs_bm = both_masks(mod, B, H, 128, 128, (32, 16))
    got, want = ours_bm._adjust(*new_lengths), theirs_bm._adjust(*new_lengths)
    assert_same_layout(got, want, flex_may_list_past_the_grid=True)
    assert got.mask_mod is mod
    q, k, v = qkv(B or 1, H or 1, H or 1, *new_lengths, 16)
    torch.testing.assert_close(ta.flex_attention(q, k, v, block_mask=got),
                               flex.flex_attention(q, k, v, block_mask=want), **F64)


@pytest.mark.parametrize("mod, new_lengths", [(sliding_window_mask(24), (128, 72)),
                                              (sliding_window_mask(24), (100, 100)),
                                              (sliding_window_mask(24), (1, 30)), (causal_mask, (128, 33))],
                         ids=["window-128x72", "window-100x100", "window-1x30", "causal-128x33"])
def test_adjust_is_exact_where_flex_recount_is_not(mod, new_lengths):
    # Flex's recount keeps blocks past the new length here; for causal at (128, 33) its own _adjust raises
    # IndexError (its transposed lists meet such a block). Ours crops the block map: checked against golden.
    block_mask = ta.create_block_mask(mod, None, None, 128, 128, BLOCK_SIZE=(32, 16))
    cropped = block_mask._adjust(*new_lengths).validate()  # no listed block outside the new grid
    q, k, v = qkv(1, 2, 2, *new_lengths, 8)
    golden, _ = dense_attention(q, k, v, mask_mod=mod, compute_dtype=torch.float64)
    torch.testing.assert_close(ta.flex_attention(q, k, v, block_mask=cropped), golden, **F64)


def test_adjust_refuses_to_grow_and_flex_attention_names_it():
    block_mask = ta.create_block_mask(causal_mask, None, None, 128, 128, BLOCK_SIZE=16)
    with pytest.raises(ValueError, match=r"cannot grow to \(129, 128\)"):
        block_mask._adjust(129, 128)
    q, k, v = qkv(1, 1, 1, 100, 128, 8)
    with pytest.raises(ValueError, match=r"_adjust\(100, 128\)"):  # a larger mask: the error says how to crop it
        ta.flex_attention(q, k, v, block_mask=block_mask)


def _two_block_band(b, h, q_idx, kv_idx):
    return (kv_idx // 32 >= q_idx // 32) & (kv_idx // 32 <= q_idx // 32 + 1)


def _kv_lists(name):
    """kv block lists of a few shapes Flex's from_kv_blocks takes, and the keyword arguments to pass. The
    lists cover every block the mask_mod allows, so that torch's eager flex_attention (which evaluates the
    mask_mod everywhere, ignoring the lists) is the reference for the output too."""
    theirs = flex.create_block_mask(causal_mask, 2, 1, 96, 80, device="cpu", BLOCK_SIZE=16)
    if name == "full_pair_explicit_lengths":
        return (theirs.kv_num_blocks, theirs.kv_indices, theirs.full_kv_num_blocks, theirs.full_kv_indices), \
            dict(BLOCK_SIZE=16, mask_mod=causal_mask, seq_lengths=(96, 80))
    if name == "partial_only_default_lengths":  # every block partial; seq_lengths from the lists' shape
        counts, indices = flex._dense_to_ordered(theirs.to_dense())
        return (counts, indices), dict(BLOCK_SIZE=(16, 16), mask_mod=causal_mask)
    if name == "narrow_lists_2d":  # two entries per row (a band), no B/H dims, Flex's defaults after them
        rows = torch.arange(6)
        indices = torch.stack([rows, (rows + 1).clamp(max=5)], -1).to(torch.int32)
        counts = torch.where(rows < 5, 2, 1).to(torch.int32)
        return (counts, indices, None, None, 32, _two_block_band, (192, 192), False), {}
    raise KeyError(name)


@pytest.mark.parametrize("name", ["full_pair_explicit_lengths", "partial_only_default_lengths", "narrow_lists_2d"])
def test_from_kv_blocks_matches_flex(name):
    args, kwargs = _kv_lists(name)
    got, want = ta.BlockMask.from_kv_blocks(*args, **kwargs), flex.BlockMask.from_kv_blocks(*args, **kwargs)
    assert isinstance(got, ta.BlockMask) and got.mask_mod is (args[5] if len(args) > 5 else kwargs["mask_mod"])
    assert_same_layout(got, want)  # (compute_q_blocks=False: ours builds the q lists anyway, Flex not)
    q_len, kv_len = got.seq_lengths
    q, k, v = qkv(got.shape[0], 2, 2, q_len, kv_len, 8)
    torch.testing.assert_close(ta.flex_attention(q, k, v, block_mask=got),
                               flex.flex_attention(q, k, v, block_mask=want), **F64)
    with pytest.raises(ValueError, match="full_kv_num_blocks and full_kv_indices"):
        ta.BlockMask.from_kv_blocks(args[0], args[1], args[0], None)


def test_from_kv_blocks_without_mask_mod_attends_to_every_listed_block():
    counts, indices = torch.tensor([[[1, 2]]], dtype=torch.int32), torch.tensor([[[1, 0], [0, 1]]], dtype=torch.int32)
    block_mask = ta.BlockMask.from_kv_blocks(counts, indices, BLOCK_SIZE=16)
    assert block_mask.seq_lengths == (32, 32) and block_mask.shape == (1, 1, 32, 32)
    allowed = torch.tensor([[0, 1], [1, 1]], dtype=torch.bool).repeat_interleave(16, 0).repeat_interleave(16, 1)
    q, k, v = qkv(1, 1, 1, 32, 32, 8)
    golden, _ = dense_attention(q, k, v, mask=allowed, compute_dtype=torch.float64)
    torch.testing.assert_close(ta.flex_attention(q, k, v, block_mask=block_mask), golden, **F64)


@pytest.mark.parametrize("index", [
    (slice(None), slice(None), 2), (1, 0, -1), (slice(0, 2), slice(1, 2), torch.tensor([1], dtype=torch.int32)),
    (slice(None), slice(None), slice(1, 3)), (0, slice(None), [0, 3])], ids=str)
def test_query_block_indexing_matches_flex(index):
    ours_bm, theirs_bm = both_masks(_batch_dependent, 3, 2, 128, 128, 32)
    got, want = ours_bm[index], theirs_bm[index]
    assert_same_layout(got, want, validate=False)  # seq_lengths kept, as Flex: the rows no longer cover them
    with pytest.raises(ValueError, match="indexed on query blocks"):
        got.validate()
    q, k, v = qkv(got.shape[0], 2, 2, 128, 128, 8)
    with pytest.raises(RuntimeError, match="Cannot use mask_mod from a sliced BlockMask"):
        ta.flex_attention(q, k, v, block_mask=got)
    with pytest.raises(RuntimeError, match="Cannot use mask_mod from a sliced BlockMask"):
        flex.flex_attention(q, k, v, block_mask=want)


def test_query_block_of_a_decode_step_like_flex():
    # gpt-fast's decode step: the row of the current position, its mask_mod offset, its lengths set.
    ours_bm, theirs_bm = both_masks(causal_mask, 1, 1, 256, 256, 64)
    q, k, v = qkv(1, 2, 2, 1, 256, 16)
    for position in (0, 63, 64, 200):
        offset = torch.tensor(position)

        def at_position(b, h, q_idx, kv_idx):
            return causal_mask(b, h, q_idx + offset, kv_idx)

        masks = []
        for block_mask in (ours_bm, theirs_bm):
            row = block_mask[:, :, position // 64]
            row.mask_mod, row.seq_lengths = at_position, (1, 256)
            masks.append(row)
        torch.testing.assert_close(ta.flex_attention(q, k, v, block_mask=masks[0]),
                                   flex.flex_attention(q, k, v, block_mask=masks[1]), **F64)


@pytest.mark.parametrize("layout", ["bhld", "blhd", "lhbd", "bhdl"])
def test_output_stride_order_follows_the_query_like_flex(layout):
    shape = dict(b=2, h=3, l=40, d=16)
    stored = torch.randn(*(shape[c] for c in layout), dtype=torch.float64)
    q = stored.permute(*(layout.index(c) for c in "bhld"))
    _, k, v = qkv(2, 3, 3, 40, 40, 16)
    v = v[..., :8].contiguous()  # Dv != D: the output's own sizes give its strides
    got = ta.flex_attention(q, k, v, _bias_score)
    want = flex.flex_attention(q, k, v, _bias_score)
    torch.testing.assert_close(got, want, **F64)
    assert got.stride() == want.stride(), f"query strides {q.stride()}"
    if layout == "blhd":  # out.transpose(1, 2) is then a contiguous [B, L, H, Dv]: no copy to merge heads
        assert got.transpose(1, 2).is_contiguous()


def test_permuted_query_output_on_the_interpreter_and_its_gradient(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_ATTN_BACKEND", "interpret")
    q = torch.randn(1, 24, 2, 16).transpose(1, 2)
    k, v = torch.randn(1, 2, 24, 16), torch.randn(1, 2, 24, 16)
    out = ta.flex_attention(q, k, v)
    assert out.stride() == flex.flex_attention(q, k, v).stride() and out.transpose(1, 2).is_contiguous()
    assert_matches_golden(lambda q_, k_, v_: ta.flex_attention(q_, k_, v_, return_lse=True), q, k, v)


def test_float64_lse_like_flex_and_a_clear_error_on_the_kernel_backends():
    q, k, v = qkv(1, 2, 2, 30, 30, 8)
    out, lse = ta.flex_attention(q, k, v, return_lse=True)
    _, aux = flex.flex_attention(q, k, v, return_aux=flex.AuxRequest(lse=True))
    assert lse.dtype == aux.lse.dtype == torch.float64
    torch.testing.assert_close(lse, aux.lse, **F64)
    assert ta.attention(q, k, v, return_lse=True, backend="torch")[1].dtype == torch.float64
    pytest.importorskip("triton")
    for backend in ("interpret",):
        with pytest.raises(TypeError, match=f"float16, bfloat16 or float32 on backend '{backend}', got float64"):
            ta.attention(q, k, v, backend=backend)


# ---------------------------------------------------------------------------------------------
# BlockMask methods and fields against torch's
# ---------------------------------------------------------------------------------------------

def test_block_mask_methods_match_flex():
    mod = and_masks(causal_mask, document_mask(doc_ids(2, 128)))
    ours_bm, theirs_bm = both_masks(mod, 2, 3, 128, 96, (32, 16))
    assert_same_layout(ours_bm, theirs_bm)
    assert torch.equal(ours_bm.to_dense(), theirs_bm.to_dense()) and ours_bm.to_dense().dtype == torch.int32
    assert ours_bm.numel() == theirs_bm.numel()
    assert ours_bm.sparsity() == pytest.approx(theirs_bm.sparsity(), abs=1e-9)  # lengths are block multiples
    # to_string, every block: the same picture, except that ours tells partial (░) from full (█) blocks where
    # Flex draws every computed block █; ours frames rows with "|" and names (b, h) in its headers
    ours_rows = [line.rstrip("|").replace("░", "█")
                 for line in ours_bm.to_string(grid_size=-1, limit=2).splitlines() if not line.startswith(("(", "."))]
    their_rows = [line for line in theirs_bm.to_string(grid_size=-1, limit=2).splitlines()
                  if line and not line.startswith(("(", ".", "To ", "You "))]
    assert ours_rows == their_rows and len(ours_rows) == 2 * 4
    # as_tuple: Flex's order and entries (these tensors), as the installed torch lays it out
    got, want = ours_bm.as_tuple(), theirs_bm.as_tuple()
    assert len(got) == len(want)
    for ours_item, their_item in zip(got, want):
        if isinstance(their_item, torch.Tensor):
            assert torch.equal(ours_item, their_item)
        elif not callable(their_item):
            assert ours_item == their_item
    assert len(ours_bm.as_tuple(flatten=False)) == len(theirs_bm.as_tuple(flatten=False))
    # .to(device): a copy with every field moved, the same layout
    for device in ("cpu", "meta"):
        moved = ours_bm.to(device)
        assert moved is not ours_bm and moved.shape == ours_bm.shape and moved.device.type == device
        assert all(getattr(moved, name).device.type == device for name in ta.BlockMask._TENSOR_FIELDS)
    assert_same_layout(ours_bm.to("cpu"), theirs_bm.to("cpu"))
    # batch / head indexing keeps the dims, as Flex's does (ours keeps a usable mask_mod; Flex's refuses)
    for index in (1, (0, 2), (slice(0, 1), slice(1, 3))):
        assert_same_layout(ours_bm[index], theirs_bm[index])


# ---------------------------------------------------------------------------------------------
# The Triton kernels (interpreter, float32): the main forms against the golden result
# ---------------------------------------------------------------------------------------------

def test_main_forms_on_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_ATTN_BACKEND", "interpret")
    prefix = prefix_lm_mask(9)
    block_mask = ta.create_block_mask(prefix, None, None, 48, 48, BLOCK_SIZE=16)
    q, k, v = torch.randn(2, 4, 48, 16), torch.randn(2, 2, 48, 16), torch.randn(2, 2, 48, 16)
    # positional: score_mod, block_mask, scale, enable_gqa, return_lse
    assert_matches_golden(lambda q_, k_, v_: ta.flex_attention(q_, k_, v_, _bias_score, block_mask, 0.4, True, True),
                          q, k, v, mask_mod=prefix, score_mod=_bias_score, scale=0.4, backward=False)

    def aux_form(q_, k_, v_):  # keywords, return_aux, kernel_options hints
        out, aux = ta.flex_attention(q_, k_, v_, block_mask=block_mask, enable_gqa=True,
                                     return_aux=flex.AuxRequest(lse=True), kernel_options={"PRESCALE_QK": False})
        return out, aux.lse

    assert_matches_golden(aux_form, q, k, v, mask_mod=prefix, backward=False)
