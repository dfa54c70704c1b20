"""The ``torch`` backend of ``paged_attention`` (``backends/torch/paged.py``): pages read a bounded chunk at a time.

What it guarantees beyond tests/test_paged.py: no copy of K/V as large as a sequence (each gather from the
caches is one chunk), the same results as the float64 golden across chunk boundaries, regions, groups of
equal-length sequences and query blocks (the chunk and block sizes are shrunk so that small shapes cross
many of them), non-finite values a mask hides stay out of the rows that do not see them, and with
``lengths`` given nothing is read back from the device.
"""

from __future__ import annotations

import math

import pytest
import torch

import triton_attn as ta
from tests.helpers.host_reads import no_host_reads
from tests.helpers.mask_cases import document_ids
from tests.helpers.numerics import assert_matches_golden
from tests.helpers.paged_cases import contiguous_kv, logical_mask, logical_score, make_paged
from triton_attn.backends.torch import paged
from triton_attn.masks import document_mask, sliding_window_mask, softcap_score


def check_paged(inputs, *, mask_mod=None, score_mod=None, context=""):
    """paged_attention on the torch backend against the golden result over the contiguous equivalent."""
    key, value = contiguous_kv(inputs)
    q_len = inputs.query.shape[2]

    def candidate(q_, k_, v_):
        with torch.no_grad():
            return ta.paged_attention(q_, inputs.key_cache, inputs.value_cache, inputs.page_table, inputs.kv_lens,
                                      mask_mod=mask_mod, score_mod=score_mod, return_lse=True, backend="torch")

    return assert_matches_golden(candidate, inputs.query, key, value, backward=False,
                                 mask_mod=logical_mask(mask_mod, inputs.kv_lens, q_len),
                                 score_mod=logical_score(score_mod, inputs.kv_lens, q_len), context=context)


def small_chunks(monkeypatch, pages: int, page_size: int, kv_heads: int, head_dim: int, dtype) -> int:
    """Shrink the chunk to ``pages`` pages of keys (of one sequence, or shared by up to ``pages`` sequences of one
    length); returns the most elements one gather may hold."""
    token_bytes = kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()
    monkeypatch.setattr(paged, "CHUNK_BYTES", pages * page_size * token_bytes, raising=False)
    monkeypatch.setattr(paged, "MIN_CHUNK_TOKENS", page_size, raising=False)
    monkeypatch.setattr(paged, "MERGE_EVERY", 3, raising=False)  # collapse the chunk results mid-way too
    return pages * page_size * kv_heads * head_dim


@pytest.fixture
def gathers(monkeypatch):
    """The number of elements of every ``index_select`` taken out of a tensor named in ``sources``."""
    record = {"sources": [], "sizes": []}

    def reads_a_cache(source):
        return any(source.untyped_storage().data_ptr() == cache.untyped_storage().data_ptr()
                   for cache in record["sources"])

    original_function, original_method = torch.index_select, torch.Tensor.index_select

    def index_select(source, dim, index, *, out=None):
        result = original_function(source, dim, index) if out is None else original_function(source, dim, index,
                                                                                             out=out)
        if reads_a_cache(source):
            record["sizes"].append(result.numel())
        return result

    def index_select_method(source, dim, index):
        result = original_method(source, dim, index)
        if reads_a_cache(source):
            record["sizes"].append(result.numel())
        return result

    monkeypatch.setattr(torch, "index_select", index_select)
    monkeypatch.setattr(torch.Tensor, "index_select", index_select_method)
    return record


# -- bounded reads ------------------------------------------------------------------------------------------

def test_no_gather_is_as_large_as_a_sequence(monkeypatch, gathers):
    """Each read of the caches is one chunk, far smaller than a sequence's K; the results stay exact."""
    kv_heads, head_dim, page_size = 2, 16, 16
    limit = small_chunks(monkeypatch, 2, page_size, kv_heads, head_dim, torch.float32)
    inputs = make_paged([300, 131, 300], 3, 4, kv_heads, head_dim, page_size, dtype=torch.float32)
    gathers["sources"] = [inputs.key_cache, inputs.value_cache]
    check_paged(inputs, context="2-page chunks")
    shortest_sequence = kv_heads * 131 * head_dim
    assert gathers["sizes"], "the caches were not read with index_select"
    assert max(gathers["sizes"]) <= limit < shortest_sequence, (max(gathers["sizes"]), limit, shortest_sequence)


def test_the_default_chunk_is_bounded_for_a_long_batch(gathers):
    """At the default chunk size: a batch of equal long sequences is read in chunks of at most CHUNK_BYTES."""
    inputs = make_paged([4096, 4096], 1, 8, 4, 64, 16, dtype=torch.float32, spare_pages=0)
    gathers["sources"] = [inputs.key_cache, inputs.value_cache]
    with torch.no_grad():
        out = ta.paged_attention(*inputs.args, backend="torch")
    assert torch.isfinite(out).all()
    bound = getattr(paged, "CHUNK_BYTES", 0) // inputs.key_cache.element_size()
    assert max(gathers["sizes"]) <= bound < 4 * 4096 * 64, (max(gathers["sizes"]), bound)


# -- against the golden result --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("q_len,groups", [(1, 4), (3, 1), (5, 2)])
def test_ragged_lengths_across_chunks(monkeypatch, dtype, q_len, groups):
    """Random page permutations; lengths: a page multiple (64), fewer keys than a chunk (5 + q_len), ragged,
    and two equal lengths apart in the batch (one group, read together, written back to rows 0 and 3)."""
    small_chunks(monkeypatch, 3, 16, 2, 32, dtype)
    lengths = [200, 64, 5 + q_len, 200, 97]
    inputs = make_paged(lengths, q_len, 2 * groups, 2, 32, 16, dtype=dtype)
    check_paged(inputs, context=f"{dtype} Lq={q_len} groups={groups}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["sliding", "softcap", "sliding_softcap", "document"])
def test_mods_at_logical_positions(monkeypatch, dtype, case):
    """Sliding window (keys outside the window skipped, its edges partial), softcap (matrix products on full
    chunks), both, and a document mask (not a function of the distance: every key partial)."""
    small_chunks(monkeypatch, 2, 16, 2, 32, dtype)
    lengths = [250, 48, 131]
    inputs = make_paged(lengths, 4, 8, 2, 32, 16, dtype=dtype)
    mask_mod = {"sliding": sliding_window_mask(45), "sliding_softcap": sliding_window_mask(70),
                "document": document_mask(document_ids(3, 250))}.get(case)
    score_mod = softcap_score(2.5) if "softcap" in case else None
    check_paged(inputs, mask_mod=mask_mod, score_mod=score_mod, context=f"{case} {dtype}")


def test_bfloat16_with_many_chunks(monkeypatch):
    small_chunks(monkeypatch, 2, 16, 1, 64, torch.bfloat16)
    inputs = make_paged([260, 37], 2, 4, 1, 64, 16, dtype=torch.bfloat16)
    check_paged(inputs, mask_mod=sliding_window_mask(100), context="bfloat16")


def test_query_blocks(monkeypatch):
    """A query longer than the query block: each block sees its own regions (a causal prefill chunk)."""
    monkeypatch.setattr(paged, "QUERY_BLOCK", 4, raising=False)
    small_chunks(monkeypatch, 1, 16, 2, 16, torch.float32)
    inputs = make_paged([120, 11], 11, 4, 2, 16, 16, dtype=torch.float32)
    check_paged(inputs, context="causal, 3 query blocks")
    check_paged(inputs, mask_mod=sliding_window_mask(9), score_mod=softcap_score(5.0), context="window, 3 blocks")


def test_a_mask_that_hides_everything_from_one_sequence(monkeypatch):
    small_chunks(monkeypatch, 1, 16, 2, 16, torch.float32)
    inputs = make_paged([70, 70, 33], 2, 4, 2, 16, 16, dtype=torch.float32)

    def nothing_for_sequence_one(b, h, q_idx, kv_idx):
        return (b != 1) & (kv_idx <= q_idx)

    with torch.no_grad():
        out, lse = ta.paged_attention(*inputs.args, mask_mod=nothing_for_sequence_one, return_lse=True,
                                      backend="torch")
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(lse[1], torch.full_like(lse[1], -math.inf))
    assert torch.isfinite(out).all() and torch.isfinite(lse[[0, 2]]).all()
    check_paged(inputs, mask_mod=nothing_for_sequence_one, context="sequence 1 fully masked")


def test_a_distance_mask_that_hides_everything():
    """A mask of the distance that no key satisfies here: no chunk is read, out 0 and lse -inf."""
    inputs = make_paged([40, 20], 1, 2, 1, 16, 16, dtype=torch.float32)

    def far_back(b, h, q_idx, kv_idx):
        return q_idx - kv_idx > 100

    with torch.no_grad():
        out, lse = ta.paged_attention(*inputs.args, mask_mod=far_back, return_lse=True, backend="torch")
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(lse, torch.full_like(lse, -math.inf))


# -- non-finite values the mask hides -------------------------------------------------------------------------

def test_hidden_non_finite_values_stay_hidden(monkeypatch):
    """NaN/inf past kv_lens (the last page's tail, pages only unused page-table slots point to) and in values
    the mask hides: outside the window (a skipped key), at the window's edge (a partial chunk: only the row
    that sees it turns NaN) and the newest key (hidden from the earlier query rows by the causal mask)."""
    small_chunks(monkeypatch, 2, 16, 2, 16, torch.float32)
    inputs = make_paged([90, 40], 3, 4, 2, 16, 16, dtype=torch.float32, spare_pages=2)
    table, window = inputs.page_table, sliding_window_mask(30)
    used = {int(p) for p in table[0, :6]} | {int(p) for p in table[1, :3]}
    spare = sorted(set(range(inputs.key_cache.shape[0])) - used)
    table[1, 3:] = spare[0]                                          # unused slots of sequence 1

    def attend(mask_mod):
        with torch.no_grad():
            return ta.paged_attention(*inputs.args, mask_mod=mask_mod, backend="torch")

    def set_value(sequence, position, what=float("nan")):
        inputs.value_cache[int(table[sequence, position // 16]), :, position % 16] = what

    clean_window, clean_causal = attend(window), attend(None)
    clean_values = inputs.value_cache.clone()
    inputs.value_cache[spare], inputs.key_cache[spare] = float("nan"), float("inf")
    for position in range(90, 96):                                   # the last page's tail
        set_value(0, position)
        inputs.key_cache[int(table[0, 5]), :, position % 16] = float("inf")
    torch.testing.assert_close(attend(None), clean_causal, atol=0, rtol=0)
    set_value(0, 3)                                                  # 84 keys back: outside every row's window
    torch.testing.assert_close(attend(window), clean_window, atol=0, rtol=0)

    set_value(0, 58, float("inf"))  # rows at 87, 88, 89: only row 0 (87) sees 58 through the window of 30
    out = attend(window)
    assert torch.isnan(out[0, :, 0]).all()
    torch.testing.assert_close(out[0, :, 1:], clean_window[0, :, 1:], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1], clean_window[1], atol=0, rtol=0)

    for position in (3, 58):
        set_value(0, position, clean_values[int(table[0, position // 16]), :, position % 16])
    set_value(0, 89)                                                 # the newest key: only the last row sees it
    out = attend(None)
    assert torch.isnan(out[0, :, 2]).all()
    torch.testing.assert_close(out[0, :, :2], clean_causal[0, :, :2], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1], clean_causal[1], atol=0, rtol=0)


# -- plans: lengths given --------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["causal", "sliding_softcap", "document", "lq_blocks"])
def test_lengths_given_reads_nothing_from_the_device(monkeypatch, case):
    """With the host copy of kv_lens, the call reads no tensor value back (tests/helpers/host_reads.py) and
    gives what the call that reads kv_lens itself gives."""
    small_chunks(monkeypatch, 2, 16, 2, 16, torch.float32)
    if case == "lq_blocks":
        monkeypatch.setattr(paged, "QUERY_BLOCK", 2, raising=False)
    lengths = [100, 37, 100]
    inputs = make_paged(lengths, 5, 4, 2, 16, 16, dtype=torch.float32)
    mask_mod = {"sliding_softcap": sliding_window_mask(20), "document": document_mask(document_ids(3, 100))}.get(case)
    score_mod = softcap_score(3.0) if case == "sliding_softcap" else None
    kwargs = dict(mask_mod=mask_mod, score_mod=score_mod, scale=0.25)
    expected = paged.paged_attention_torch(*inputs.args, **kwargs)
    with no_host_reads():
        got = paged.paged_attention_torch(*inputs.args, **kwargs, lengths=list(lengths))
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_gradients_match_the_inference_path(monkeypatch):
    """A call that needs gradients takes the differentiable path; its values equal the chunked path's."""
    small_chunks(monkeypatch, 2, 16, 2, 16, torch.float32)
    inputs = make_paged([80, 45], 2, 4, 2, 16, 16, dtype=torch.float32)
    with torch.no_grad():
        expected = ta.paged_attention(*inputs.args, mask_mod=sliding_window_mask(20), backend="torch")
    query = inputs.query.clone().requires_grad_()
    out = ta.paged_attention(query, *inputs.args[1:], mask_mod=sliding_window_mask(20), backend="torch")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    out.sum().backward()
    assert query.grad is not None and torch.isfinite(query.grad).all()


@pytest.mark.parametrize("distances,length,rows,expected", [
    ([(0, None)], 100, (99, 99), [(0, 100, True)]),                               # causal decode: all full
    ([(0, None)], 100, (95, 99), [(0, 96, True), (96, 100, False)]),              # causal, 5 rows
    ([(0, 29)], 100, (95, 99), [(66, 70, False), (70, 96, True), (96, 100, False)]),  # window 30
    ([(0, 2)], 100, (90, 99), [(88, 100, False)]),                                # window shorter than the rows
    (None, 100, (95, 99), [(0, 100, False)]),                                     # any other mask
    ([], 100, (95, 99), []),                                                      # a mask that is never True
    ([(None, 2), (4, None)], 100, (95, 99), [(0, 100, False)]),                   # several intervals: hull
])
def test_key_regions(distances, length, rows, expected):
    assert paged.key_regions(distances, length, *rows) == expected


def test_value_dim_and_caches_that_are_views(monkeypatch):
    """Dv != D (matrix products on full chunks), caches with other strides (one with no (page, head) row view:
    read by (page, head) index), and a query whose head_dim is strided."""
    small_chunks(monkeypatch, 2, 16, 2, 16, torch.float32)
    inputs = make_paged([150, 33], 2, 4, 2, 16, 16, dtype=torch.float32, value_dim=24)
    check_paged(inputs, mask_mod=sliding_window_mask(60), context="Dv=24")
    wide = make_paged([150, 33], 2, 4, 2, 32, 16, dtype=torch.float32)
    wide.page_table, wide.kv_lens = inputs.page_table, inputs.kv_lens
    # Heads outermost in memory: no [num_pages * Hkv, ...] view; values: every other element of wider rows.
    inputs.key_cache = wide.key_cache[:, :, :, ::2].transpose(0, 1).contiguous().transpose(0, 1)
    inputs.value_cache = wide.value_cache[:, :, :, 1::2]
    inputs.query = wide.query[..., 1::2]
    assert paged._rows_view(inputs.key_cache) is None and paged._rows_view(inputs.value_cache) is not None
    check_paged(inputs, context="strided caches")


def test_distance_sets_of_masks():
    """``recognize.distance_set``, which decides the regions: exact sets for masks of the distance only."""
    from triton_attn.masks import causal_mask
    from triton_attn.masks.recognize import distance_set

    def window_spelled_differently(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (kv_idx + 8 > q_idx)

    assert distance_set(causal_mask) == [(0, None)]
    assert distance_set(sliding_window_mask(30)) == [(0, 29)]
    assert distance_set(window_spelled_differently) == [(0, 7)]
    assert distance_set(document_mask(document_ids(2, 50))) is None
    assert distance_set(lambda b, h, q_idx, kv_idx: (b == 0) & (kv_idx <= q_idx)) is None
    assert distance_set(None) is None
