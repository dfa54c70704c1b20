"""``paged_attention`` against the float64 golden result, its input checks, and ``PagedKVCache``.

Backends: ``torch`` (reads pages in chunks) everywhere, ``interpret`` (the decode kernel reading pages under
the Triton interpreter) on a few small shapes. Decode-kernel specifics (splits, packing, routing
from ``attention()``) live in tests/kernels/test_decode_interpret.py.
"""

from __future__ import annotations

import pytest
import torch

import triton_attn as ta
from tests.helpers.mask_cases import document_ids
from tests.helpers.numerics import assert_matches_golden
from tests.helpers.paged_cases import contiguous_kv, logical_mask, logical_score, make_paged, ragged_lengths
from triton_attn.masks import alibi_score, document_mask, sliding_window_mask, softcap_score


def check_paged(inputs, *, mask_mod=None, score_mod=None, backend="torch", context=""):
    """Run paged_attention and compare with the golden result over the contiguous equivalent."""
    key, value = contiguous_kv(inputs)
    q_len = inputs.query.shape[2]

    def candidate(q_, k_, v_):
        return ta.paged_attention(q_, inputs.key_cache, inputs.value_cache, inputs.page_table, inputs.kv_lens,
                                  mask_mod=mask_mod, score_mod=score_mod, return_lse=True, backend=backend)

    return assert_matches_golden(candidate, inputs.query, key, value, backward=False,
                                 mask_mod=logical_mask(mask_mod, inputs.kv_lens, q_len),
                                 score_mod=logical_score(score_mod, inputs.kv_lens, q_len), context=context)


# -- torch backend ------------------------------------------------------------------------------------

@pytest.mark.parametrize("q_len", [1, 3, 16])
@pytest.mark.parametrize("groups", [1, 4, 8])
def test_torch_backend_ragged_gqa(q_len, groups):
    inputs = make_paged(ragged_lengths(3, 2000, q_len), q_len, 2 * groups, 2, 32, 16)
    check_paged(inputs, context=f"Lq={q_len} groups={groups}")


@pytest.mark.parametrize("page_size", [16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_page_sizes_dtypes(page_size, dtype):
    inputs = make_paged([1, 130, 700], 1, 4, 1, 64, page_size, dtype=dtype)
    check_paged(inputs, context=f"page_size={page_size} {dtype}")


@pytest.mark.parametrize("case", ["sliding", "document", "softcap", "alibi"])
def test_torch_backend_mods(case):
    lengths = [300, 45, 190]
    inputs = make_paged(lengths, 4, 8, 2, 32, 16)
    ids = document_ids(3, 300)
    mask_mod = {"sliding": sliding_window_mask(40), "document": document_mask(ids)}.get(case)
    score_mod = {"softcap": softcap_score(3.0), "alibi": alibi_score(8)}.get(case)
    check_paged(inputs, mask_mod=mask_mod, score_mod=score_mod, context=case)


def test_lse_equals_attention_on_the_contiguous_cache():
    """One sequence, no ragged tail: paged_attention and attention() with the mask at the offset agree."""
    inputs = make_paged([200], 5, 4, 2, 32, 16, dtype=torch.float32)
    key, value = contiguous_kv(inputs)
    out, lse = ta.paged_attention(*inputs.args, return_lse=True, backend="torch")

    def causal_at_end(b, h, q_idx, kv_idx):
        return q_idx + 195 >= kv_idx

    block_mask = ta.create_block_mask(causal_at_end, None, None, 5, 200)
    ref_out, ref_lse = ta.attention(inputs.query, key, value, block_mask=block_mask, enable_gqa=True,
                                    return_lse=True, backend="torch")
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=0)


def test_fully_masked_rows_give_zero_and_minus_inf():
    inputs = make_paged([40, 33], 2, 2, 2, 16, 16, dtype=torch.float32)

    def nothing_for_sequence_one(b, h, q_idx, kv_idx):
        return (b == 0) & (kv_idx <= q_idx)

    out, lse = ta.paged_attention(*inputs.args, mask_mod=nothing_for_sequence_one, return_lse=True, backend="torch")
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isinf(lse[1]).all() and (lse[1] < 0).all()
    assert torch.isfinite(out).all() and torch.isfinite(lse[0]).all()


# -- interpreter (the decode kernel reading pages) ------------------------------------------------------

@pytest.mark.parametrize("q_len,groups,page_size,lengths", [
    (1, 4, 16, [1, 257, 96]),
    (7, 1, 64, [300, 7]),
    (16, 8, 16, [64, 250]),
])
def test_interpret_ragged_shuffled_pages(q_len, groups, page_size, lengths):
    pytest.importorskip("triton")
    inputs = make_paged(lengths, q_len, 2 * groups, 2, 32, page_size)
    check_paged(inputs, backend="interpret", context=f"Lq={q_len} groups={groups} page={page_size}")


@pytest.mark.parametrize("case", ["sliding_softcap", "document"])
def test_interpret_mods(case):
    pytest.importorskip("triton")
    lengths = [260, 90]
    inputs = make_paged(lengths, 3, 4, 1, 32, 16, dtype=torch.bfloat16)
    mask_mod = sliding_window_mask(70) if case == "sliding_softcap" else document_mask(document_ids(2, 260))
    score_mod = softcap_score(4.0) if case == "sliding_softcap" else None
    check_paged(inputs, mask_mod=mask_mod, score_mod=score_mod, backend="interpret", context=case)


def test_interpret_chunked_prefill_long_query():
    """Lq beyond the decode sizes (chunked prefill into a paged cache) runs the same kernel."""
    pytest.importorskip("triton")
    inputs = make_paged([150, 40], 40, 4, 2, 16, 16, dtype=torch.float32)
    check_paged(inputs, backend="interpret", context="Lq=40")


# -- bad input ------------------------------------------------------------------------------------------

def _good():
    return make_paged([20, 33], 2, 4, 2, 16, 16, dtype=torch.float32)


@pytest.mark.parametrize("change,message", [
    (lambda i: i.page_table.__setitem__((1, 1), 999), r"page_table\[1, 1\]=999 is not a page"),
    (lambda i: i.page_table.__setitem__((0, 0), -1), r"page_table\[0, 0\]=-1"),
    (lambda i: i.kv_lens.__setitem__(0, 1000), r"kv_lens\[0\]=1000 exceeds .*capacity"),
    (lambda i: i.kv_lens.__setitem__(1, 1), r"kv_lens\[1\]=1 is shorter than the query \(Lq=2\)"),
])
def test_bad_values_name_the_argument(change, message):
    inputs = _good()
    change(inputs)
    with pytest.raises(ValueError, match=message):
        ta.paged_attention(*inputs.args)


def test_unused_page_table_slots_are_not_checked():
    inputs = _good()
    inputs.page_table[0, 2] = -7  # sequence 0 uses 2 pages: slot 2 is free
    ta.paged_attention(*inputs.args)


@pytest.mark.parametrize("field,bad,error,message", [
    ("page_table", lambda t: t.long(), TypeError, "page_table must be int32"),
    ("kv_lens", lambda t: t.float(), TypeError, "kv_lens must be int32"),
    ("key_cache", lambda t: t.half(), TypeError, "share one dtype"),
    ("query", lambda t: t[0], ValueError, r"query must be a 4-D tensor"),
    ("value_cache", lambda t: t[:, :1], ValueError, "value_cache must be"),
    ("page_table", lambda t: t[:1], ValueError, "query's batch size B=2"),
    ("kv_lens", lambda t: t.view(2, 1), ValueError, r"kv_lens must be a 1-D tensor"),
    ("query", lambda t: t[:, :3], ValueError, r"Hq=3 must be a multiple of .*Hkv=2"),
])
def test_bad_shapes_and_dtypes_name_the_argument(field, bad, error, message):
    inputs = _good()
    setattr(inputs, field, bad(getattr(inputs, field)))
    with pytest.raises(error, match=message):
        ta.paged_attention(*inputs.args)


def test_page_size_must_be_a_multiple_of_16():
    inputs = _good()
    with pytest.raises(ValueError, match="page_size .* multiple of 16, got 8"):
        ta.paged_attention(inputs.query, inputs.key_cache[:, :, :8], inputs.value_cache[:, :, :8], inputs.page_table,
                           inputs.kv_lens.clamp(max=8))


def test_no_silent_missing_gradient_on_the_kernel_backends():
    pytest.importorskip("triton")
    inputs = _good()
    query = inputs.query.clone().requires_grad_()
    with pytest.raises(NotImplementedError, match="no backward pass on backend 'interpret'"):
        ta.paged_attention(query, *inputs.args[1:], backend="interpret")
    out = ta.paged_attention(query, *inputs.args[1:], backend="torch")  # the reference differentiates
    out.sum().backward()
    assert query.grad is not None and torch.isfinite(query.grad).all()


def test_bad_backend_and_device():
    inputs = _good()
    with pytest.raises(ValueError, match="backend 'triton' needs CUDA"):
        ta.paged_attention(*inputs.args, backend="triton")
    if torch.cuda.is_available():  # pragma: no cover - CPU CI
        with pytest.raises(ValueError, match="page_table must be on query's device"):
            ta.paged_attention(inputs.query, inputs.key_cache, inputs.value_cache, inputs.page_table.cuda(),
                               inputs.kv_lens)


# -- PagedKVCache -----------------------------------------------------------------------------------------

def test_cache_append_free_and_reuse_pages():
    cache = ta.PagedKVCache(num_pages=6, page_size=16, num_kv_heads=2, head_dim=8)
    first, second = cache.allocate(2)
    k1, v1 = torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
    cache.append([first], k1, v1)
    cache.append([second], torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8))
    assert cache.kv_lens([first, second]).tolist() == [20, 5] and cache.free_pages == 3
    table = cache.page_table([first, second])
    assert table.dtype == torch.int32 and table.shape == (2, 2)
    key_cache, _ = cache.layer(0)
    gathered = torch.cat([key_cache[int(table[0, 0])], key_cache[int(table[0, 1])]], dim=1)[:, :20]
    assert torch.equal(gathered, k1[0])
    cache.free(first)
    assert cache.free_pages == 5
    third = cache.allocate()[0]
    cache.append([third], torch.randn(1, 2, 80, 8), torch.randn(1, 2, 80, 8))  # reuses the freed pages
    assert cache.free_pages == 0
    with pytest.raises(RuntimeError, match="out of pages"):
        cache.append([second], torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8))
    with pytest.raises(KeyError, match="unknown sequence"):
        cache.kv_lens([first])


def test_cache_batch_append_matches_contiguous_attention():
    """Two decode steps appended for a batch at once: paged_attention equals attention() on the concatenation."""
    cache = ta.PagedKVCache(num_pages=16, page_size=16, num_kv_heads=1, head_dim=16)
    seqs = cache.allocate(2)
    keys, values = torch.randn(2, 1, 30, 16), torch.randn(2, 1, 30, 16)
    cache.append(seqs, keys[:, :, :29], values[:, :, :29])
    cache.append(seqs, keys[:, :, 29:], values[:, :, 29:])
    query = torch.randn(2, 2, 1, 16)
    out = ta.paged_attention(query, *cache.layer(0), cache.page_table(seqs), cache.kv_lens(seqs))
    expected = ta.attention(query, keys, values, enable_gqa=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_cache_rejects_bad_sizes():
    with pytest.raises(ValueError, match="page_size must be a multiple of 16"):
        ta.PagedKVCache(4, 24, 1, 8)
    with pytest.raises(ValueError, match="num_pages must be a positive int"):
        ta.PagedKVCache(0, 16, 1, 8)
    cache = ta.PagedKVCache(4, 16, 2, 8)
    seqs = cache.allocate(1)
    cache.reserve(seqs, 3)
    with pytest.raises(ValueError, match=r"key must be \[B=1, Hkv=2, S, D=8\]"):
        cache.write(0, seqs, torch.randn(1, 3, 3, 8), torch.randn(1, 3, 3, 8))


# -- ReferenceDecoder --------------------------------------------------------------------------------------

@pytest.mark.parametrize("sliding", [False, True])
def test_reference_decoder_generates_the_same_tokens_with_a_paged_cache(sliding):
    from triton_attn.models import ModelConfig, ReferenceDecoder

    config = ModelConfig(num_heads=4, num_kv_heads=2, hidden_size=64, num_layers=2,
                         sliding_window=6 if sliding else None, softcap=20.0 if sliding else None)
    model = ReferenceDecoder(config).eval()
    ids = torch.randint(0, 128, (3, 9))
    attention_mask = torch.ones(3, 9, dtype=torch.long)
    attention_mask[1, :3] = 0  # left padding
    contiguous = model.generate(ids, attention_mask=attention_mask, max_new_tokens=12)
    paged = model.generate(ids, attention_mask=attention_mask, max_new_tokens=12, cache="paged")
    assert torch.equal(contiguous, paged)


def test_reference_decoder_paged_logits_match_each_step():
    from triton_attn.models import KVCache, ModelConfig, ReferenceDecoder

    model = ReferenceDecoder(ModelConfig(num_heads=4, num_kv_heads=1, hidden_size=32, num_layers=2)).eval()
    ids = torch.randint(0, 128, (2, 20))
    contiguous, paged = KVCache(), model.paged_cache(2, 20)
    with torch.no_grad():
        for start, stop in ((0, 7), (7, 8), (8, 20)):  # a prompt, one token, a chunk
            expected = model(ids[:, start:stop], cache=contiguous).logits
            got = model(ids[:, start:stop], cache=paged).logits
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cache must be 'contiguous' or 'paged'"):
        model.generate(ids, cache="pages")


@pytest.mark.parametrize("q_len", [1, 5, 128])
def test_closed_form_causal_layout_equals_the_mask_compiler(q_len):
    from triton_attn.masks.paged import causal_paged_block_mask, logical_mask_mod

    kv_lens = torch.tensor([q_len, 128, 129, 1000, 1024 + q_len - 1, 2048], dtype=torch.int32)
    closed = causal_paged_block_mask(kv_lens, q_len, 2048)
    compiled = ta.create_block_mask(logical_mask_mod(None, kv_lens, q_len), 6, None, q_len, 2048, BLOCK_SIZE=128)
    assert torch.equal(closed.to_dense(), compiled.to_dense())
    assert torch.equal(closed.partial_blocks(), compiled.partial_blocks())
    assert torch.equal(closed.full_blocks(), compiled.full_blocks())
