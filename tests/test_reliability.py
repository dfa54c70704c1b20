"""Reliability (issue 15): every bad input a clear error, no silent wrong result, no out-of-bounds read.

One test (or a few) per failure the issue found: integer 4-D masks in the registry, Triton
backends failing where the torch backend fails, BlockMask lists validated against their shape,
float64 on the torch backend, BlockMask slicing, numpy / 0-d tensor numbers, and options checked
at registration.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import triton_attn as ta
from tests.helpers.numerics import assert_matches_golden, random_qkv
from triton_attn import BlockMask
from triton_attn.masks import causal_mask, document_mask, safety, sliding_window_mask, softcap_score
from triton_attn.registry import eager_attention_function, make_attention_function, register_attention


@pytest.fixture(autouse=True)
def _fresh_checks():
    safety._checked.clear()
    yield


def _qkv(batch=1, heads=2, q_len=64, kv_len=64, dim=16, dtype=torch.float32):
    return random_qkv(batch, heads, heads, q_len, kv_len, dim, dtype=dtype)


# -- item 2: integer 4-D attention masks in the registry -------------------------------------------

class _Module(torch.nn.Module):
    num_key_value_groups, is_causal = 1, True


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_integer_4d_mask_is_boolean(dtype):
    q, k, v = _qkv(batch=2, q_len=24, kv_len=24)
    allowed = torch.rand(2, 1, 24, 24) > 0.4
    allowed[..., 0] = True
    fn = make_attention_function()
    as_bool, _ = fn(_Module(), q, k, v, allowed)
    as_int, _ = fn(_Module(), q, k, v, allowed.to(dtype))
    torch.testing.assert_close(as_int, as_bool, rtol=0, atol=0)
    reference, _ = eager_attention_function(_Module(), q, k, v, allowed.to(dtype))
    torch.testing.assert_close(reference, eager_attention_function(_Module(), q, k, v, allowed)[0], rtol=0, atol=0)


def test_integer_4d_mask_other_values_refused():
    q, k, v = _qkv(q_len=8, kv_len=8)
    bias = torch.zeros(1, 1, 8, 8, dtype=torch.int64)
    bias[..., 3] = -10000
    with pytest.raises(ValueError, match="attention_mask of integer dtype torch.int64 must hold only 0"):
        make_attention_function()(_Module(), q, k, v, bias)


# -- item 3: the Triton backends fail where the torch backend fails ----------------------------------

_TABLE = torch.randn(4)


def _index_out_of_range(score, b, h, q_idx, kv_idx):
    return score + _TABLE[q_idx]


def _divide_by_zero(score, b, h, q_idx, kv_idx):
    return score + q_idx // (kv_idx * 0)


def _bool_score(score, b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _int_score(score, b, h, q_idx, kv_idx):
    return q_idx - kv_idx


def _python_float_score(score, b, h, q_idx, kv_idx):
    return 1.5


@pytest.mark.parametrize("score_mod, error, message", [
    (_index_out_of_range, ValueError, r"score_mod '_index_out_of_range' raised IndexError: index 4 is out of bounds"),
    (_divide_by_zero, ValueError, r"score_mod '_divide_by_zero' raised RuntimeError: ZeroDivisionError"),
    (_bool_score, TypeError, r"score_mod '_bool_score' must return a floating-point tensor, got dtype torch.bool"),
    (_int_score, TypeError, r"score_mod '_int_score' must return a floating-point tensor, got dtype torch.int64"),
])
def test_kernel_backends_raise_like_torch(score_mod, error, message):
    q, k, v = _qkv()
    for backend in ("torch", "interpret"):
        with pytest.raises(error, match=message):
            ta.attention(q, k, v, score_mod=score_mod, backend=backend)


def test_python_float_score_is_the_same_answer_everywhere():
    # The torch backend takes a constant Python float as the score of every position (FlexAttention's
    # per-element calling convention); the kernels must give the same answer: uniform attention.
    q, k, v = _qkv()
    expected = v.mean(dim=2, keepdim=True).expand_as(v)
    for backend in ("torch", "interpret"):
        torch.testing.assert_close(ta.attention(q, k, v, score_mod=_python_float_score, backend=backend), expected,
                                   atol=1e-5, rtol=1e-5)


def test_mask_mod_out_of_range_batch_raises_on_kernel_backends():
    # Built with B=None (b = 0 only), called with B=2: ids has one row, so b = 1 is out of range.
    ids = torch.zeros(1, 64, dtype=torch.int64)

    def same_document(b, h, q_idx, kv_idx):
        return (ids[b, q_idx] == ids[b, kv_idx]) & (kv_idx <= q_idx)

    block_mask = ta.create_block_mask(same_document, None, None, 64, 64, BLOCK_SIZE=32)
    q, k, v = _qkv(batch=2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"mask_mod 'same_document' raised IndexError: index 1 is out of bounds"):
        ta.attention(q, k, v, block_mask=block_mask, backend="torch")  # the plain (float64) torch path
    with pytest.raises(ValueError, match=r"mask_mod 'same_document' raised IndexError: index 1 is out of bounds"):
        ta.attention(q.float(), k.float(), v.float(), block_mask=block_mask, backend="interpret")


def test_only_visited_tiles_must_be_in_range():
    # table covers the first 32 keys; the mask never visits the others, so both backends answer.
    table = torch.randn(32)

    def first_keys(b, h, q_idx, kv_idx):
        return kv_idx < 32

    def key_bias(score, b, h, q_idx, kv_idx):
        return score + table[kv_idx]

    block_mask = ta.create_block_mask(first_keys, None, None, 64, 64, BLOCK_SIZE=32)
    q, k, v = _qkv()
    def clamped_bias(score, b, h, q_idx, kv_idx):  # the same where the mask lets keys through
        return score + table[kv_idx.clamp(max=31)]

    for backend in ("torch", "interpret"):
        assert_matches_golden(lambda q, k, v: ta.attention(q, k, v, block_mask=block_mask, score_mod=key_bias,
                                                           backend=backend, return_lse=True),
                              q, k, v, mask_mod=first_keys, score_mod=clamped_bias, backward=False, context=backend)


def test_positions_past_the_sequence_are_not_checked():
    # The kernel's tiles overhang Lkv = 40 (blocks of 32), but those positions are masked, never used.
    table = torch.randn(40)

    def key_bias(score, b, h, q_idx, kv_idx):
        return score + table[kv_idx]

    q, k, v = _qkv(q_len=40, kv_len=40)
    block_mask = ta.create_block_mask(causal_mask, None, None, 40, 40, BLOCK_SIZE=32)
    assert_matches_golden(lambda q, k, v: ta.attention(q, k, v, block_mask=block_mask, score_mod=key_bias,
                                                       backend="interpret", return_lse=True),
                          q, k, v, mask_mod=causal_mask, score_mod=key_bias, backward=False)


def test_exact_pass_finds_a_bad_value_behind_an_indirection():
    # perm sends keys 32.. to 1000: interval bounds cannot clear it tile by tile; the exact pass finds it.
    perm = torch.cat([torch.arange(32), torch.full((32,), 1000)])
    table = torch.randn(32)

    def indirect(score, b, h, q_idx, kv_idx):
        return score + table[perm[kv_idx]]

    q, k, v = _qkv()
    causal = ta.create_block_mask(causal_mask, None, None, 64, 64, BLOCK_SIZE=32)
    for backend in ("torch", "interpret"):
        with pytest.raises(ValueError, match="index 1000 is out of bounds for dimension 0 with size 32"):
            ta.attention(q, k, v, block_mask=causal, score_mod=indirect, backend=backend)
    first = ta.create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx < 32, None, None, 64, 64, BLOCK_SIZE=32)
    torch.testing.assert_close(ta.attention(q, k, v, block_mask=first, score_mod=indirect, backend="interpret"),
                               ta.attention(q, k, v, block_mask=first, score_mod=indirect, backend="torch"),
                               atol=1e-5, rtol=1e-5)


def test_checks_are_cached_and_see_in_place_changes():
    table = torch.randn(64)

    def bias(score, b, h, q_idx, kv_idx):
        return score + table[perm[q_idx]]

    perm = torch.arange(64)
    q, k, v = _qkv()
    ta.attention(q, k, v, score_mod=bias, backend="interpret")
    checked = len(safety._checked)
    ta.attention(q, k, v, score_mod=bias, backend="interpret")
    assert len(safety._checked) == checked  # same mod, same captured tensors: not checked again
    perm[5] = 64  # an in-place change bumps the tensor's version: checked again, and caught
    with pytest.raises(ValueError, match="index 64 is out of bounds"):
        ta.attention(q, k, v, score_mod=bias, backend="interpret")


def test_safe_library_mods_pass_unchanged():
    ids = torch.randint(0, 3, (2, 64)).sort(dim=1).values
    block_mask = ta.create_block_mask(document_mask(ids), 2, None, 64, 64, BLOCK_SIZE=32)
    q, k, v = _qkv(batch=2)
    out = ta.attention(q, k, v, block_mask=block_mask, score_mod=softcap_score(5.0), backend="interpret")
    assert torch.isfinite(out).all()


# -- item 4: BlockMask lists validated against the layout ------------------------------------------

def _clone(block_mask: BlockMask) -> BlockMask:
    return BlockMask(**{n: getattr(block_mask, n).clone() for n in BlockMask._TENSOR_FIELDS},
                     BLOCK_SIZE=block_mask.BLOCK_SIZE, seq_lengths=block_mask.seq_lengths,
                     mask_mod=block_mask.mask_mod)


def test_flex_mask_rows_must_cover_seq_lengths():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    small = flex.create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, 1, 1, 128, 128, device="cpu")
    stretched = flex.BlockMask.from_kv_blocks(small.kv_num_blocks, small.kv_indices, small.full_kv_num_blocks,
                                              small.full_kv_indices, BLOCK_SIZE=128, mask_mod=small.mask_mod,
                                              seq_lengths=(256, 256))
    q, k, v = _qkv(q_len=256, kv_len=256)
    for backend in ("torch", "interpret"):
        with pytest.raises(ValueError, match=r"1 query block rows of 128, which do not cover .* Q_LEN=256"):
            ta.attention(q, k, v, block_mask=stretched, backend=backend)


@pytest.mark.parametrize("corrupt, message", [
    (lambda m: m.full_kv_indices.__setitem__((0, 0, 1, 0), 7), r"full_kv_indices lists a block outside \[0, 2\)"),
    (lambda m: m.kv_indices.__setitem__((0, 0, 0, 0), -1), r"kv_indices lists a block outside \[0, 2\)"),
    (lambda m: m.kv_num_blocks.__setitem__((0, 0, 0), 3), r"kv_num_blocks must be between 0 and 2"),
    (lambda m: m.full_kv_num_blocks.__setitem__((0, 0, 1), 2), r"both partial \(kv_indices\) and full"),
    (lambda m: m.q_num_blocks.__setitem__((0, 0, 1), 0), r"q_num_blocks / q_indices are not the transpose"),
])
def test_hand_built_block_mask_is_validated(corrupt, message):
    good = ta.create_block_mask(causal_mask, None, None, 256, 256)
    q, k, v = _qkv(q_len=256, kv_len=256)
    bad = _clone(good)
    ta.attention(q, k, v, block_mask=bad)  # valid as built
    corrupt(bad)  # in place, after a validated call: the version change is noticed
    for backend in ("torch", "interpret"):
        with pytest.raises(ValueError, match=message):
            ta.attention(q, k, v, block_mask=bad, backend=backend)


def test_block_mask_duplicates_and_wrong_width():
    good = ta.create_block_mask(causal_mask, None, None, 256, 256)
    dup = _clone(good)
    dup.full_kv_num_blocks[0, 0, 1] = 0
    dup.kv_indices[0, 0, 1] = torch.tensor([1, 1], dtype=torch.int32)
    dup.kv_num_blocks[0, 0, 1] = 2
    with pytest.raises(ValueError, match="lists a block twice in one row"):
        dup.validate()
    narrow = _clone(good)
    narrow.kv_indices = narrow.kv_indices[..., :1]
    with pytest.raises(ValueError, match="kv_indices has width 1, expected 2"):
        narrow.validate()


def test_validation_is_cached_per_mask():
    built = ta.create_block_mask(causal_mask, None, None, 256, 256)
    assert built.is_trusted()  # lists derived from block maps: validate() reads no values (no sync)
    block_mask = _clone(built)
    assert not block_mask.is_trusted()
    block_mask.validate()
    assert block_mask.is_trusted()
    assert block_mask[0].is_trusted() and block_mask.to("cpu").is_trusted()  # views keep it
    block_mask.kv_num_blocks = block_mask.kv_num_blocks.clone()
    assert not block_mask.is_trusted()


def test_compact_csr_is_validated():
    compact = ta.create_block_mask(causal_mask, None, None, 256, 256, layout="compact")
    compact.validate()
    ptr, cols = compact.kv_csr()
    cols[0] = 9
    with pytest.raises(ValueError, match=r"partial CSR lists a KV block outside \[0, 2\)"):
        compact.validate()


def test_from_flex_checks_indices():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    good = flex.create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, 1, 1, 256, 256, device="cpu")
    counts = good.kv_num_blocks.clone()
    counts[0, 0, 0] = 5
    bad = flex.BlockMask.from_kv_blocks(counts, good.kv_indices, good.full_kv_num_blocks, good.full_kv_indices,
                                        BLOCK_SIZE=128, mask_mod=good.mask_mod, seq_lengths=(256, 256))
    with pytest.raises(ValueError, match="kv_num_blocks must be between 0 and 2"):
        BlockMask.from_flex(bad)


# -- item 5: float64 on the torch backend -----------------------------------------------------------

def test_float64_is_computed_in_float64():
    q, k, v = random_qkv(2, 4, 2, 100, 90, 16, dtype=torch.float64)
    block_mask = ta.create_block_mask(sliding_window_mask(40), None, None, 100, 90, BLOCK_SIZE=32)
    assert_matches_golden(lambda q, k, v: ta.attention(q, k, v, block_mask=block_mask, enable_gqa=True,
                                                       score_mod=softcap_score(4.0), return_lse=True, backend="torch"),
                          q, k, v, mask_mod=sliding_window_mask(40), score_mod=softcap_score(4.0))
    out = ta.attention(q, k, v, enable_gqa=True, backend="torch")
    assert out.dtype == torch.float64


def test_float64_refused_by_kernel_backends():
    q, k, v = _qkv(dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        ta.attention(q, k, v, backend="interpret")


# -- item 11: BlockMask slicing ---------------------------------------------------------------------

def test_block_mask_slicing_errors_name_the_index():
    for layout in ("dense", "compact"):
        block_mask = ta.create_block_mask(causal_mask, 2, 3, 128, 128, BLOCK_SIZE=64, layout=layout)
        with pytest.raises(IndexError, match=r"batch index 5:9 selects nothing .*valid batch indices are 0..1"):
            block_mask[5:9]
        with pytest.raises(IndexError, match=r"batch index 1:1 selects nothing"):
            block_mask[1:1]
        with pytest.raises(IndexError, match=r"head index 3 is out of range: valid head indices are 0..2"):
            block_mask[0, 3]
        with pytest.raises(IndexError, match=r"batch index tensor\(\[0, 5\]\) is invalid"):
            block_mask[torch.tensor([0, 5])]
        assert block_mask[1:9].shape[:2] == (1, 3)  # clipped like a tensor slice
        assert block_mask[np.int64(1), -1].shape[:2] == (1, 1)


# -- item 12: numpy scalars and 0-d tensors -----------------------------------------------------------

def test_numbers_accepted():
    q, k, v = _qkv(q_len=8, kv_len=8)
    expected = ta.attention(q, k, v, scale=0.5)
    for scale in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5), 0.5, np.int64(1) / 2):
        torch.testing.assert_close(ta.attention(q, k, v, scale=scale), expected)
    mask = ta.create_block_mask(causal_mask, np.int64(1), torch.tensor(2), np.int64(8), np.int32(8),
                                BLOCK_SIZE=np.int64(4))
    assert mask.shape == (1, 2, 8, 8) and mask.BLOCK_SIZE == (4, 4)
    assert sliding_window_mask(np.int64(3)).__name__ == "sliding_window_3"
    assert softcap_score(np.float32(2.0)).__name__ == "softcap_2"
    assert ta.create_mask(causal_mask, None, None, np.int16(4), 4).shape == (1, 1, 4, 4)


@pytest.mark.parametrize("call, error, message", [
    (lambda q: ta.attention(q, q, q, scale=True), TypeError, "scale must be a finite float or None"),
    (lambda q: ta.attention(q, q, q, scale=torch.tensor([0.5])), ValueError, "scale must be a number"),
    (lambda q: ta.create_block_mask(causal_mask, None, None, 8.0, 8), ValueError, "Q_LEN must be a positive int"),
    (lambda q: ta.create_block_mask(causal_mask, None, None, True, 8), ValueError, "Q_LEN must be a positive int"),
    (lambda q: ta.create_block_mask(causal_mask, None, None, 8, 8, BLOCK_SIZE=np.float32(4)), ValueError,
     "BLOCK_SIZE must be a positive int"),
])
def test_bad_numbers_refused(call, error, message):
    with pytest.raises(error, match=message):
        call(torch.randn(1, 1, 8, 4))


# -- item 13: register_attention checks its options --------------------------------------------------

@pytest.mark.parametrize("options, message", [
    (dict(block_size=0), "block_size must be a positive int"),
    (dict(block_size=(64, -1)), "block_size must be a positive int"),
    (dict(backend="cuda"), "backend must be one of 'torch', 'triton', 'interpret' or None"),
])
def test_register_attention_checks_options(options, message, restore_registries):
    with pytest.raises(ValueError, match=message):
        register_attention("reliability_check", transformers=False, **options)


def test_register_attention_accepts_numpy_block_size(restore_registries):
    registered = register_attention("reliability_np", block_size=np.int64(64), backend="torch",
                                    mask_heads=np.int64(2), transformers=False)
    assert registered.name == "reliability_np"


# -- found by the fuzz test: a head dim with stride != 1 on the torch backend's fused CPU path ------------

def test_strided_head_dim_on_torch_backend():
    q, k, v = random_qkv(1, 2, 2, 40, 40, 16, layout="strided")
    assert q.stride(-1) == 2
    block_mask = ta.create_block_mask(causal_mask, None, None, 40, 40, BLOCK_SIZE=16)
    assert_matches_golden(lambda q, k, v: ta.attention(q, k, v, block_mask=block_mask, return_lse=True,
                                                       backend="torch"),
                          q, k, v, mask_mod=causal_mask, backward=False)


def test_to_string_checks_grid_size_and_limit():
    block_mask = ta.create_block_mask(causal_mask, None, None, 64, 64, BLOCK_SIZE=16)
    assert block_mask.to_string(grid_size=np.int64(2)).count("|") == 2
    for grid_size in (-3, 0, (2,), True):
        with pytest.raises(ValueError, match="grid_size must be -1 .every block., a positive int"):
            block_mask.to_string(grid_size=grid_size)
    with pytest.raises(ValueError, match="limit must be a non-negative int"):
        block_mask.to_string(limit=-1)
