"""``masks.recognize.is_causal``: the causal family recognized from the traced graph, in any spelling, and
nothing else (a wrong True would send a call to SDPA's ``is_causal`` and compute the wrong attention)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from triton_attn.masks import (
    and_masks,
    causal_mask,
    chunked_mask,
    document_mask,
    full_mask,
    not_mask,
    or_masks,
    padding_mask,
    prefix_lm_mask,
    recognize,
    sliding_window_mask,
)
from triton_attn.masks.recognize import is_causal

CAUSAL_SPELLINGS = {
    "library": causal_mask,
    "reversed": lambda b, h, q_idx, kv_idx: kv_idx <= q_idx,
    "difference": lambda b, h, q_idx, kv_idx: q_idx - kv_idx >= 0,
    "difference_reversed": lambda b, h, q_idx, kv_idx: 0 <= q_idx - kv_idx,
    "negated_difference": lambda b, h, q_idx, kv_idx: kv_idx - q_idx <= 0,
    "strict_plus_one": lambda b, h, q_idx, kv_idx: q_idx + 1 > kv_idx,
    "strict_minus_one": lambda b, h, q_idx, kv_idx: kv_idx - 1 < q_idx,
    "scaled": lambda b, h, q_idx, kv_idx: 2 * q_idx - 2 * kv_idx + 1 >= 0,
    "not_less": lambda b, h, q_idx, kv_idx: ~(q_idx < kv_idx),
    "not_mask_of_future": not_mask(lambda b, h, q_idx, kv_idx: kv_idx > q_idx),
    "torch_ge": lambda b, h, q_idx, kv_idx: torch.ge(q_idx, kv_idx),
    "where": lambda b, h, q_idx, kv_idx: torch.where(q_idx >= kv_idx, True, False),
    "greater_or_equal_parts": lambda b, h, q_idx, kv_idx: (q_idx > kv_idx) | (q_idx == kv_idx),
    "and_of_one": and_masks(causal_mask),
    "and_with_itself": and_masks(causal_mask, lambda b, h, q_idx, kv_idx: kv_idx <= q_idx),
    "or_with_subset": or_masks(causal_mask, lambda b, h, q_idx, kv_idx: q_idx - kv_idx > 5),
    "and_with_true": lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx - kv_idx > -7),
    "double_negation": lambda b, h, q_idx, kv_idx: ~~(q_idx >= kv_idx),
    "shifted_both": lambda b, h, q_idx, kv_idx: q_idx + 3 >= kv_idx + 3,
}


@pytest.mark.parametrize("name", sorted(CAUSAL_SPELLINGS))
def test_causal_spellings_are_recognized(name):
    assert is_causal(CAUSAL_SPELLINGS[name])


GRID = 24  # positions of the dense check below: past every window and prefix used here


def _document_ids():
    return torch.arange(GRID) // 5


NOT_CAUSAL = {
    "strict": lambda b, h, q_idx, kv_idx: q_idx > kv_idx,
    "anti_causal": lambda b, h, q_idx, kv_idx: q_idx <= kv_idx,
    "shifted_by_one": lambda b, h, q_idx, kv_idx: q_idx + 1 >= kv_idx,
    "scaled_off_by_one": lambda b, h, q_idx, kv_idx: 2 * q_idx - 2 * kv_idx + 2 >= 0,
    "diagonal": lambda b, h, q_idx, kv_idx: q_idx == kv_idx,
    "not_diagonal": lambda b, h, q_idx, kv_idx: q_idx != kv_idx,
    "xor": lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) ^ (q_idx == kv_idx),
    "sliding_window": sliding_window_mask(16),
    "prefix_lm": prefix_lm_mask(4),
    "prefix_lm_per_batch": prefix_lm_mask(torch.tensor([2, 3])),
    "document": document_mask(_document_ids()),
    "causal_document": and_masks(causal_mask, document_mask(_document_ids())),
    "causal_and_window": and_masks(causal_mask, sliding_window_mask(8)),
    "causal_and_padding": and_masks(causal_mask, padding_mask(torch.ones(2, GRID, dtype=torch.bool))),
    "causal_and_chunked": and_masks(causal_mask, chunked_mask(4)),
    "causal_or_prefix": or_masks(causal_mask, lambda b, h, q_idx, kv_idx: kv_idx < 4),
    "full": full_mask,
    "per_head": lambda b, h, q_idx, kv_idx: q_idx + h >= kv_idx,
    "per_batch": lambda b, h, q_idx, kv_idx: q_idx >= kv_idx + b,
    "float_positions": lambda b, h, q_idx, kv_idx: q_idx.float() >= kv_idx.float(),
    "captured_offset": lambda b, h, q_idx, kv_idx: q_idx >= kv_idx + torch.tensor(0),
    "scaled_query_only": lambda b, h, q_idx, kv_idx: 2 * q_idx >= kv_idx,
    "product": lambda b, h, q_idx, kv_idx: q_idx * q_idx >= kv_idx * kv_idx,
    "floor_division": lambda b, h, q_idx, kv_idx: q_idx // 1 >= kv_idx,
    "nothing": lambda b, h, q_idx, kv_idx: q_idx < q_idx,
}


# Equal to causal on non-negative positions (floats: below 2**24 only), refused because the analysis does not
# model their operations (float conversion, products, //, captured tensors): a safe False.
CAUSAL_IN_VALUE_BUT_REFUSED = {"float_positions", "floor_division", "captured_offset", "causal_and_padding", "product"}


@pytest.mark.parametrize("name", sorted(NOT_CAUSAL))
def test_other_masks_are_not_causal(name):
    assert not is_causal(NOT_CAUSAL[name])


def test_untraceable_and_missing_mods_are_not_causal():
    def branching(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx if q_idx > 0 else True   # Python control flow on a traced value

    assert not is_causal(branching)
    assert not is_causal(None)
    assert not is_causal(lambda b, h, q_idx, kv_idx: q_idx - kv_idx)   # an int, not a bool


def test_recognition_agrees_with_dense_evaluation():
    """Every mask of both tables evaluated densely: the recognized ones equal ``q_idx >= kv_idx``, and each
    rejected one differs from it somewhere (except the few named ones that are causal in value but refused
    because the analysis does not model their operations), so the False answers are real differences."""
    q_idx, kv_idx = torch.arange(GRID).view(-1, 1), torch.arange(GRID).view(1, -1)
    b, h = torch.tensor(1), torch.tensor(1)
    causal = (q_idx >= kv_idx).expand(GRID, GRID)
    for name, mod in CAUSAL_SPELLINGS.items():
        assert torch.equal(torch.as_tensor(mod(b, h, q_idx, kv_idx)).expand(GRID, GRID), causal), name
    for name, mod in NOT_CAUSAL.items():
        if name in CAUSAL_IN_VALUE_BUT_REFUSED:
            continue
        assert not torch.equal(torch.as_tensor(mod(b, h, q_idx, kv_idx)).expand(GRID, GRID), causal), name


def test_answer_follows_a_rebound_closure_variable():
    """The cache is per mod *and* what it reads: rebinding the offset it captures changes the answer."""
    offset = 0

    def shifted(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    assert is_causal(shifted)
    offset = 1
    assert not is_causal(shifted)
    offset = 0
    assert is_causal(shifted)


def test_cache_holds_graphs_weakly_and_answers_repeated_calls():
    def fresh(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    assert is_causal(fresh)
    before = len(recognize._BY_GRAPH)
    for _ in range(5):
        assert is_causal(fresh)
    assert len(recognize._BY_GRAPH) == before
    reference = weakref.ref(fresh)
    del fresh
    gc.collect()
    assert reference() is None   # nothing here keeps the mod alive


def test_interval_algebra_against_brute_force():
    """The integer-set operations the analysis combines with, against Python sets on a window."""
    window = range(-12, 13)

    def members(values):
        return {d for d in window if any((lo is None or lo <= d) and (hi is None or d <= hi) for lo, hi in values)}

    sets = [recognize.EVERYTHING, recognize.NOTHING, [(0, None)], [(None, -3)], [(-2, 4)],
            [(None, -5), (1, 2), (7, None)]]
    for left in sets:
        assert members(recognize._complement(left)) == set(window) - members(left)
        for right in sets:
            assert members(recognize._intersect(left, right)) == members(left) & members(right)
            assert members(recognize._union(left, right)) == members(left) | members(right)


def test_a_traced_mod_is_answered_without_tracing_again(monkeypatch):
    from triton_attn.masks.tracing import trace_mask_mod, trace_score_mod

    causal, window = trace_mask_mod(causal_mask), trace_mask_mod(sliding_window_mask(4))
    monkeypatch.setattr(recognize, "trace_mask_mod", lambda mod: pytest.fail("traced again"))
    assert is_causal(causal) and not is_causal(window)
    with pytest.raises(ValueError, match="is_causal: expected a mask_mod or a traced mask_mod, got a traced score_mod"):
        is_causal(trace_score_mod(lambda score, b, h, q_idx, kv_idx: score))
