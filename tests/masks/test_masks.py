"""The mask library against hand-written dense definitions (docs/design.md "Semantics (pinned)").

Each reference below is written with plain Python loops over (b, h, q, kv), independent of the
library's broadcasting code, on small odd shapes.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import triton_attn as ta
from triton_attn.masks import (
    alibi_score,
    and_masks,
    causal_mask,
    chunked_mask,
    document_mask,
    full_mask,
    not_mask,
    or_masks,
    padding_mask,
    prefix_lm_mask,
    sliding_window_mask,
    softcap_score,
)


def loop_mask(predicate, B, H, Q, KV) -> torch.Tensor:
    """Dense bool [B, H, Q, KV] from a scalar predicate(b, h, q, kv) -> bool, by plain loops."""
    out = torch.zeros(B, H, Q, KV, dtype=torch.bool)
    for b, h, q, kv in itertools.product(range(B), range(H), range(Q), range(KV)):
        out[b, h, q, kv] = bool(predicate(b, h, q, kv))
    return out


def assert_mask_equal(actual: torch.Tensor, expected: torch.Tensor, what: str):
    assert actual.dtype == torch.bool, f"{what}: dtype {actual.dtype}, expected bool"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual != expected).nonzero()
    assert diff.numel() == 0, (f"{what}: {diff.shape[0]} positions differ from the definition, first (b, h, q, kv) = "
                               f"{tuple(diff[0].tolist())}, got {bool(actual[tuple(diff[0])])}")


B, H, Q, KV = 2, 3, 13, 17  # odd, Lq != Lkv


# ---------------------------------------------------------------------------------------------
# mask_mods
# ---------------------------------------------------------------------------------------------
def test_causal_is_top_left_aligned():
    assert_mask_equal(ta.create_mask(causal_mask, B, H, Q, KV), loop_mask(lambda b, h, q, k: k <= q, B, H, Q, KV),
                      "causal_mask")


def test_full_mask_attends_everywhere():
    assert bool(ta.create_mask(full_mask, B, H, Q, KV).all()), "full_mask must be True everywhere"


@pytest.mark.parametrize("window", [1, 2, 5, 13, 40])
def test_sliding_window_includes_current_token(window):
    expected = loop_mask(lambda b, h, q, k: 0 <= q - k < window, 1, 1, Q, KV)
    assert_mask_equal(ta.create_mask(sliding_window_mask(window), None, None, Q, KV), expected,
                      f"sliding_window_mask({window})")
    diagonal = ta.create_mask(sliding_window_mask(window), None, None, Q, KV)[0, 0].diagonal()
    assert bool(diagonal.all()), "the window must include the current token (q_idx == kv_idx)"


def test_sliding_window_one_is_the_diagonal():
    dense = ta.create_mask(sliding_window_mask(1), None, None, Q, Q)[0, 0]
    assert torch.equal(dense, torch.eye(Q, dtype=torch.bool))


@pytest.mark.parametrize("chunk", [1, 3, 4, 16])
def test_chunked_is_not_causal(chunk):
    expected = loop_mask(lambda b, h, q, k: q // chunk == k // chunk, 1, 1, Q, KV)
    assert_mask_equal(ta.create_mask(chunked_mask(chunk), None, None, Q, KV), expected, f"chunked_mask({chunk})")
    if chunk > 1:
        assert bool(ta.create_mask(chunked_mask(chunk), None, None, Q, KV)[0, 0, 0, 1]), \
            "chunked_mask alone is bidirectional inside a chunk"


def test_chunked_and_causal():
    mod = and_masks(causal_mask, chunked_mask(4))
    expected = loop_mask(lambda b, h, q, k: q // 4 == k // 4 and k <= q, 1, 1, Q, KV)
    assert_mask_equal(ta.create_mask(mod, None, None, Q, KV), expected, "and(causal, chunked_4)")


@pytest.mark.parametrize("prefix", [0, 1, 5, 17, 30])
def test_prefix_lm_int(prefix):
    expected = loop_mask(lambda b, h, q, k: k < prefix or k <= q, 1, 1, Q, KV)
    assert_mask_equal(ta.create_mask(prefix_lm_mask(prefix), None, None, Q, KV), expected, f"prefix_lm_mask({prefix})")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_prefix_lm_per_batch_tensor(dtype):
    prefix = torch.tensor([3, 11], dtype=dtype)
    expected = loop_mask(lambda b, h, q, k: k < int(prefix[b]) or k <= q, B, H, Q, KV)
    assert_mask_equal(ta.create_mask(prefix_lm_mask(prefix), B, H, Q, KV), expected, "prefix_lm_mask(tensor [B])")


def test_document_ids_batched():
    ids = torch.tensor([[0] * 5 + [1] * 7 + [2] * 5, [0] * 2 + [1] * 14 + [3]])
    expected = loop_mask(lambda b, h, q, k: int(ids[b, q]) == int(ids[b, k]), B, H, Q, KV)
    assert_mask_equal(ta.create_mask(document_mask(ids), B, H, Q, KV), expected, "document_mask(ids [B, S])")


def test_document_ids_shared_1d():
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3, 4, 4, 4], dtype=torch.int32)
    expected = loop_mask(lambda b, h, q, k: int(ids[q]) == int(ids[k]), B, H, Q, KV)
    assert_mask_equal(ta.create_mask(document_mask(ids), B, H, Q, KV), expected, "document_mask(ids [S])")


def test_document_ids_non_sorted_are_compared_not_ranged():
    ids = torch.tensor([[1, 0, 1, 0, 2, 1]])  # not contiguous documents: equality is what counts
    expected = loop_mask(lambda b, h, q, k: int(ids[0, q]) == int(ids[0, k]), 1, 1, 6, 6)
    assert_mask_equal(ta.create_mask(document_mask(ids), 1, 1, 6, 6), expected, "document_mask(unsorted ids)")


@pytest.mark.parametrize("kind", ["int64", "int32", "uint8", "bool"])
def test_padding_mask_from_0_1_and_bool(kind):
    raw = torch.tensor([[1] * 12 + [0] * 5, [0] * 3 + [1] * 14])
    am = raw.bool() if kind == "bool" else raw.to(getattr(torch, kind))
    expected = loop_mask(lambda b, h, q, k: bool(raw[b, k]), B, H, Q, KV)
    assert_mask_equal(ta.create_mask(padding_mask(am), B, H, Q, KV), expected, f"padding_mask({kind})")


def test_and_or_not_semantics():
    a, b = sliding_window_mask(3), chunked_mask(5)
    defs = {
        "and": (and_masks(a, b), lambda q, k: (0 <= q - k < 3) and (q // 5 == k // 5)),
        "or": (or_masks(a, b), lambda q, k: (0 <= q - k < 3) or (q // 5 == k // 5)),
        "not": (not_mask(a), lambda q, k: not (0 <= q - k < 3)),
        "and3": (and_masks(a, b, not_mask(causal_mask)), lambda q, k: False),
        "or1": (or_masks(a), lambda q, k: 0 <= q - k < 3),
    }
    for what, (mod, ref) in defs.items():
        assert_mask_equal(ta.create_mask(mod, None, None, Q, KV),
                          loop_mask(lambda b_, h_, q, k: ref(q, k), 1, 1, Q, KV), what)


def test_head_dependent_captured_tensor():
    windows = torch.tensor([1, 4, 9])

    def per_head_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < windows[h])

    expected = loop_mask(lambda b, h, q, k: 0 <= q - k < int(windows[h]), B, H, Q, KV)
    assert_mask_equal(ta.create_mask(per_head_window, B, H, Q, KV), expected, "per-head window")


def test_python_bool_result_broadcasts():
    dense = ta.create_mask(lambda b, h, q, k: True, 2, 1, 3, 4)
    assert dense.shape == (2, 1, 3, 4) and bool(dense.all())


# ---------------------------------------------------------------------------------------------
# create_mask
# ---------------------------------------------------------------------------------------------
def test_create_mask_shape_dtype_and_broadcast():
    dense = ta.create_mask(causal_mask, None, None, 5, 7)
    assert dense.shape == (1, 1, 5, 7) and dense.dtype == torch.bool and dense.device.type == "cpu"
    assert ta.create_mask(causal_mask, 3, None, 5, 7).shape == (3, 1, 5, 7)
    assert ta.create_mask(causal_mask, None, 4, 5, 7).shape == (1, 4, 5, 7)


def test_create_mask_device_follows_captured_tensor():
    ids = torch.zeros(4, dtype=torch.long)
    assert ta.create_mask(document_mask(ids), 1, 1, 4, 4).device == ids.device
    assert ta.create_mask(causal_mask, 1, 1, 4, 4, device="cpu").device.type == "cpu"


def test_create_mask_matches_create_block_mask_to_dense():
    mod = and_masks(causal_mask, not_mask(chunked_mask(7)))
    dense = ta.create_mask(mod, 1, 1, 50, 40)
    bm = ta.create_block_mask(mod, 1, 1, 50, 40, BLOCK_SIZE=16)
    blocks = torch.nn.functional.pad(dense, (0, 8, 0, 14)).reshape(1, 1, 4, 16, 3, 16).any(5).any(3)
    assert torch.equal(bm.to_dense().bool(), blocks)


# ---------------------------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mod, name", [
    (sliding_window_mask(512), "sliding_window_512"),
    (sliding_window_mask(3), "sliding_window_3"),
    (chunked_mask(64), "chunked_64"),
    (prefix_lm_mask(10), "prefix_lm_10"),
    (prefix_lm_mask(torch.tensor([1, 2])), "prefix_lm_per_batch"),
    (document_mask(torch.zeros(4, dtype=torch.long)), "document"),
    (padding_mask(torch.ones(1, 4, dtype=torch.long)), "padding"),
    (softcap_score(30.0), "softcap_30"),
    (softcap_score(2.5), "softcap_2.5"),
    (alibi_score(8), "alibi_8"),
    (and_masks(causal_mask, sliding_window_mask(4)), "and(causal_mask, sliding_window_4)"),
    (or_masks(causal_mask, chunked_mask(2)), "or(causal_mask, chunked_2)"),
    (not_mask(causal_mask), "not(causal_mask)"),
])
def test_closure_names(mod, name):
    assert mod.__name__ == name, f"expected __name__ {name!r}, got {mod.__name__!r}"
    assert mod.__qualname__ == mod.__name__ or mod.__name__ in ("causal_mask",)


def test_names_nest():
    mod = not_mask(and_masks(sliding_window_mask(8), or_masks(chunked_mask(2), prefix_lm_mask(3))))
    assert mod.__name__ == "not(and(sliding_window_8, or(chunked_2, prefix_lm_3)))"


# ---------------------------------------------------------------------------------------------
# score_mods
# ---------------------------------------------------------------------------------------------
def _grids(Bn, Hn, Qn, KVn):
    return (torch.arange(Bn).view(-1, 1, 1, 1), torch.arange(Hn).view(1, -1, 1, 1),
            torch.arange(Qn).view(1, 1, -1, 1), torch.arange(KVn).view(1, 1, 1, -1))


@pytest.mark.parametrize("cap", [0.5, 1, 20.0])
def test_softcap_definition(cap):
    score = torch.randn(2, 3, 5, 7, dtype=torch.float64) * 10
    b, h, q, k = _grids(2, 3, 5, 7)
    got = softcap_score(cap)(score, b, h, q, k)
    expected = torch.tensor([cap * math.tanh(s / cap) for s in score.flatten().tolist()],
                            dtype=torch.float64).view_as(score)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert bool((got.abs() <= cap).all()), "softcap output must lie in [-cap, cap]"


def _alibi_expected(score, num_heads):
    expected = score.clone()
    Bn, _, Qn, KVn = score.shape
    for b, h, q, k in itertools.product(range(Bn), range(num_heads), range(Qn), range(KVn)):
        expected[b, h, q, k] += 2 ** (-8 * (h + 1) / num_heads) * (k - q)
    return expected


@pytest.mark.parametrize("num_heads", [1, 3, 8, 12])
def test_alibi_definition(num_heads):
    Qn, KVn = 6, 9
    score = torch.randn(2, num_heads, Qn, KVn, dtype=torch.float64)
    got = alibi_score(num_heads)(score, *_grids(2, num_heads, Qn, KVn))
    # float32-accurate slopes (see test_alibi_exact_in_float64 for the float64 golden path).
    torch.testing.assert_close(got, _alibi_expected(score, num_heads), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("num_heads", [3, 12])
def test_alibi_exact_in_float64(num_heads):
    Qn, KVn = 6, 9
    score = torch.randn(1, num_heads, Qn, KVn, dtype=torch.float64)
    got = alibi_score(num_heads)(score, *_grids(1, num_heads, Qn, KVn))
    torch.testing.assert_close(got, _alibi_expected(score, num_heads), rtol=1e-12, atol=1e-12)


def test_alibi_last_head_slope_is_one_over_256():
    score = torch.zeros(1, 8, 1, 2, dtype=torch.float64)
    got = alibi_score(8)(score, *_grids(1, 8, 1, 2))
    assert float(got[0, 7, 0, 1]) == pytest.approx(2 ** -8)
    assert float(got[0, 0, 0, 1]) == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------
# random compositions vs. a hand-written evaluation
# ---------------------------------------------------------------------------------------------
@st.composite
def composed(draw, depth=2):
    """(mask_mod, scalar predicate (q, k) -> bool) built from the library."""
    if depth == 0 or draw(st.booleans()):
        kind = draw(st.sampled_from(["causal", "full", "window", "chunk", "prefix"]))
        if kind == "causal":
            return causal_mask, lambda q, k: k <= q
        if kind == "full":
            return full_mask, lambda q, k: True
        if kind == "window":
            w = draw(st.integers(1, 20))
            return sliding_window_mask(w), lambda q, k: 0 <= q - k < w
        if kind == "chunk":
            c = draw(st.integers(1, 9))
            return chunked_mask(c), lambda q, k: q // c == k // c
        p = draw(st.integers(0, 20))
        return prefix_lm_mask(p), lambda q, k: k < p or k <= q
    op = draw(st.sampled_from(["and", "or", "not"]))
    if op == "not":
        mod, ref = draw(composed(depth=depth - 1))
        return not_mask(mod), lambda q, k: not ref(q, k)
    parts = draw(st.lists(composed(depth=depth - 1), min_size=1, max_size=3))
    mods, refs = zip(*parts)
    if op == "and":
        return and_masks(*mods), lambda q, k: all(r(q, k) for r in refs)
    return or_masks(*mods), lambda q, k: any(r(q, k) for r in refs)


@given(composed(), st.integers(1, 19), st.integers(1, 19))
def test_random_compositions_match_definition(mod_ref, q_len, kv_len):
    mod, ref = mod_ref
    expected = loop_mask(lambda b, h, q, k: ref(q, k), 1, 1, q_len, kv_len)
    assert_mask_equal(ta.create_mask(mod, None, None, q_len, kv_len), expected, mod.__name__)
