"""FlexAttention mods written per element, each idiom on its own, on the torch backend.

Every mask idiom must (1) trace natively (no fallback warning), (2) give the dense mask of
FlexAttention's own ``create_mask`` (per-element, under vmap) both through our ``create_mask`` and
through the traced graph, (3) give the block layout of Flex's ``create_block_mask``, and (4) give
attention that matches the float64 golden result. Every score idiom must trace, emit Triton code
(value and derivative) and match the golden result forward and backward. The interpreter runs of
the same idioms, grouped to keep them few, live in ``test_flex_interpret.py``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import triton_attn as ta
from tests.helpers.numerics import assert_matches_golden, random_qkv
from triton_attn.masks.tracing import evaluate, trace_mask_mod, trace_score_mod

flex = pytest.importorskip("torch.nn.attention.flex_attention")

# A whole number of blocks: in a ragged tail Flex counts the padding against "full", we do not.
LENGTH, BATCH, HEADS, BLOCK = 64, 2, 3, 16


def _captured(seed: int = 0, heads: int = HEADS):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 4, (LENGTH,), generator=generator).sort().values
    starts = torch.tensor([0, 10, 30, 50])
    return {
        "bias": torch.randn(BATCH, LENGTH, generator=generator) > 0,
        "table": torch.randint(0, 3, (heads, LENGTH, LENGTH), generator=generator),
        "ids": ids,
        "intervals": torch.stack([starts, starts + torch.tensor([12, 25, 18, 30])], dim=1),
        "offsets": torch.randint(0, 20, (LENGTH,), generator=generator),
        "allowed": torch.tensor([0, 3, 5, 7, 40]),
        "lengths": torch.tensor([60, 45]),
        "shift": torch.tensor(2),
        "row_bias": torch.randn(1, LENGTH, generator=generator) > -0.5,
    }


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _window(b, h, q_idx, kv_idx):
    return q_idx - kv_idx < 20


def mask_idioms(c):
    """name -> mask_mod, each written the way a FlexAttention user writes it (per element)."""
    return {
        "chained_index": lambda b, h, q_idx, kv_idx: c["bias"][b][kv_idx],
        "nested_3d_index": lambda b, h, q_idx, kv_idx: c["table"][h][q_idx][kv_idx] > 0,
        "index_pair_of_loaded_value": lambda b, h, q_idx, kv_idx: (
            (kv_idx >= c["intervals"][c["ids"][q_idx]][0]) & (kv_idx < c["intervals"][c["ids"][q_idx]][1])),
        "ellipsis_then_index": lambda b, h, q_idx, kv_idx: c["table"][..., kv_idx][h, q_idx] != 1,
        "size1_slice": lambda b, h, q_idx, kv_idx: c["row_bias"][:, kv_idx][0] | (q_idx == kv_idx),
        "computed_index": lambda b, h, q_idx, kv_idx: kv_idx <= c["offsets"][c["offsets"][q_idx] + 1] + q_idx,
        "zero_dim_tensor_index": lambda b, h, q_idx, kv_idx: c["table"][c["shift"]][q_idx, kv_idx] == 2,
        "new_ones": lambda b, h, q_idx, kv_idx: b.new_ones((), dtype=torch.bool) & (q_idx >= kv_idx),
        "new_zeros_new_full": lambda b, h, q_idx, kv_idx: (
            b.new_zeros((), dtype=torch.bool) | (q_idx.new_full((), 3) * q_idx >= kv_idx)),
        "new_tensor": lambda b, h, q_idx, kv_idx: kv_idx < q_idx.new_tensor(30) + q_idx,
        "ones_zeros_like": lambda b, h, q_idx, kv_idx: (
            (torch.ones_like(q_idx) * q_idx >= kv_idx) & (torch.zeros_like(kv_idx, dtype=torch.bool) | True)),
        "shifts": lambda b, h, q_idx, kv_idx: (q_idx >> 3) == (kv_idx >> 3),
        "shift_left_or_xor": lambda b, h, q_idx, kv_idx: (((kv_idx << 1) | 1) ^ q_idx) > 40,
        "bitwise_and_int": lambda b, h, q_idx, kv_idx: ((q_idx & kv_idx) & 7) == 0,
        "bitwise_not_int": lambda b, h, q_idx, kv_idx: (~kv_idx & 3) != 0,
        "isin": lambda b, h, q_idx, kv_idx: torch.isin(kv_idx, c["allowed"]) | (q_idx == kv_idx),
        "isin_invert": lambda b, h, q_idx, kv_idx: torch.isin(q_idx % 8, c["allowed"], invert=True) & (q_idx >= kv_idx),
        "any_over_captured": lambda b, h, q_idx, kv_idx: (kv_idx == c["allowed"]).any() | (q_idx - kv_idx < 3),
        "where_scalars": lambda b, h, q_idx, kv_idx: torch.where(q_idx > 36, 10, 40) > (q_idx - kv_idx).abs(),
        "to_dtype": lambda b, h, q_idx, kv_idx: (q_idx.to(torch.float32) * 0.5).to(torch.int64) >= kv_idx,
        "abs_neg_clamp": lambda b, h, q_idx, kv_idx: (-(q_idx - kv_idx)).abs().clamp(min=2, max=9) < 5,
        "min_max": lambda b, h, q_idx, kv_idx: torch.minimum(q_idx, kv_idx + 3) >= torch.max(kv_idx, q_idx - 9),
        "floor_ceil_round": lambda b, h, q_idx, kv_idx: (
            (torch.floor(q_idx / 4) == torch.floor(kv_idx / 4)) | (torch.ceil(q_idx / 5) == torch.round(kv_idx / 5))),
        "remainder_fmod": lambda b, h, q_idx, kv_idx: (
            torch.remainder(q_idx - kv_idx, 5) == torch.fmod(q_idx - kv_idx - 30, 5).abs()),
        "sign": lambda b, h, q_idx, kv_idx: torch.sign(q_idx - kv_idx) >= 0,
        "true_division": lambda b, h, q_idx, kv_idx: q_idx / (kv_idx + 1) >= 1.5,
        "lengths_per_batch": lambda b, h, q_idx, kv_idx: (kv_idx < c["lengths"][b]) & (q_idx >= kv_idx),
        "torch_and_masks": flex.and_masks(_causal, _window),
        "torch_or_masks": flex.or_masks(_window, lambda b, h, q_idx, kv_idx: kv_idx < 4),
        "torch_noop_mask": flex.noop_mask,
    }


_IDIOMS = sorted(mask_idioms(_captured()))


def _index_grids():
    return (torch.arange(BATCH).view(-1, 1, 1, 1), torch.arange(HEADS).view(1, -1, 1, 1),
            torch.arange(LENGTH).view(1, 1, -1, 1), torch.arange(LENGTH).view(1, 1, 1, -1))


def assert_same_as_flex(ours, theirs):
    """Same blocks (partial and full) per (b, h, row); Flex orders the valid indices ascending too."""
    shape = (BATCH, HEADS) + tuple(theirs.kv_num_blocks.shape[2:])
    for field in ("kv_num_blocks", "full_kv_num_blocks"):
        assert torch.equal(getattr(ours, field).expand(shape).long(),
                           getattr(theirs, field).expand(shape).long()), field
    for counts, field in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
        count = getattr(theirs, counts).expand(shape)
        mine = getattr(ours, field).expand(shape + getattr(ours, field).shape[-1:]).long()
        flex_indices = getattr(theirs, field).expand(shape + getattr(theirs, field).shape[-1:]).long()
        valid = torch.arange(mine.shape[-1]) < count.unsqueeze(-1)
        assert torch.equal(torch.where(valid, mine, -1),
                           torch.where(valid, flex_indices[..., :mine.shape[-1]], -1)), field


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # Flex's own vmap of isin
@pytest.mark.parametrize("name", _IDIOMS)
def test_mask_idiom_traces_and_matches_flex(name):
    mask_mod = mask_idioms(_captured())[name]
    expected = flex.create_mask(mask_mod, BATCH, HEADS, LENGTH, LENGTH, device="cpu")
    traced = trace_mask_mod(mask_mod)  # natively: no UntraceableModError
    b, h, q_idx, kv_idx = _index_grids()
    graph_value = evaluate(traced, {"b": b, "h": h, "q_idx": q_idx, "kv_idx": kv_idx}).broadcast_to(expected.shape)
    assert torch.equal(graph_value, expected), "traced graph"
    assert torch.equal(ta.create_mask(mask_mod, BATCH, HEADS, LENGTH, LENGTH), expected), "eager evaluation"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "cannot be traced" fallback
        ours = ta.create_block_mask(mask_mod, BATCH, HEADS, LENGTH, LENGTH, BLOCK_SIZE=BLOCK)
    theirs = flex.create_block_mask(mask_mod, BATCH, HEADS, LENGTH, LENGTH, device="cpu", BLOCK_SIZE=BLOCK)
    assert_same_as_flex(ours, theirs)


@pytest.mark.parametrize("name", ["chained_index", "index_pair_of_loaded_value", "shifts", "isin", "torch_and_masks"])
def test_mask_idiom_attention_matches_golden_on_torch_backend(name):
    mask_mod = mask_idioms(_captured(1))[name]
    q, k, v = random_qkv(BATCH, HEADS, HEADS, LENGTH, LENGTH, 16, dtype=torch.float32)
    block_mask = ta.create_block_mask(mask_mod, BATCH, HEADS, LENGTH, LENGTH, BLOCK_SIZE=BLOCK)
    assert_matches_golden(lambda q_, k_, v_: ta.flex_attention(q_, k_, v_, block_mask=block_mask, return_lse=True),
                          q, k, v, mask_mod=mask_mod)


def score_idioms(c):
    table = c["table"][0, :, :8].float() / 3
    head_bias = torch.randn(c["table"].shape[0], LENGTH, generator=torch.Generator().manual_seed(3))
    return {
        "sin_cos": lambda score, b, h, q_idx, kv_idx: torch.sin(score) + torch.cos(score * 0.5),
        "erf": lambda score, b, h, q_idx, kv_idx: 2.0 * torch.erf(score / 2.0),
        "gelu_exact": lambda score, b, h, q_idx, kv_idx: F.gelu(score),
        "gelu_tanh": lambda score, b, h, q_idx, kv_idx: F.gelu(score, approximate="tanh"),
        "silu": lambda score, b, h, q_idx, kv_idx: F.silu(score),
        "sigmoid": lambda score, b, h, q_idx, kv_idx: 4.0 * torch.sigmoid(score),
        "softplus": lambda score, b, h, q_idx, kv_idx: F.softplus(score, beta=2.0, threshold=1.0),
        "log1p": lambda score, b, h, q_idx, kv_idx: torch.log1p(score.abs()) * torch.sign(score),
        "expm1": lambda score, b, h, q_idx, kv_idx: torch.expm1(score * 0.3),
        "pow_constants": lambda score, b, h, q_idx, kv_idx: score ** 3 * 0.1 + score.abs() ** 1.5 - score ** 2.0,
        "reduction_sum": lambda score, b, h, q_idx, kv_idx: score + (table[q_idx] * table[kv_idx]).sum(-1),
        "reduction_dot": lambda score, b, h, q_idx, kv_idx: score + torch.dot(table[q_idx], table[kv_idx]),
        "chained_bias": lambda score, b, h, q_idx, kv_idx: score + head_bias[h][kv_idx],
        "where_scalar": lambda score, b, h, q_idx, kv_idx: torch.where(q_idx >= kv_idx, score, score * 0.5),
        "to_dtype_division": lambda score, b, h, q_idx, kv_idx: score - (q_idx - kv_idx).abs().to(score.dtype) / 16,
    }


_SCORES = sorted(score_idioms(_captured()))


@pytest.mark.parametrize("name", _SCORES)
def test_score_idiom_compiles_and_matches_golden_on_torch_backend(name):
    from triton_attn.dispatch import score_mod_fallback_reason

    score_mod = score_idioms(_captured())[name]
    trace_score_mod(score_mod)
    assert score_mod_fallback_reason(score_mod, needs_grad=True) is None  # value and derivative emit
    q, k, v = random_qkv(1, HEADS, HEADS, 40, 40, 16, dtype=torch.float32)
    assert_matches_golden(lambda q_, k_, v_: ta.flex_attention(q_, k_, v_, score_mod, return_lse=True),
                          q, k, v, score_mod=score_mod)


def test_traced_score_idioms_equal_eager_per_element():
    # The graph of every score idiom equals the mod called per element (Flex's way) on random scores.
    b, h, q_idx, kv_idx = (t[:1] if i == 0 else t for i, t in enumerate(_index_grids()))
    q_idx, kv_idx = q_idx[..., :40, :], kv_idx[..., :40]
    score = torch.randn(1, HEADS, 40, 40) * 3
    for name, score_mod in score_idioms(_captured()).items():
        traced = trace_score_mod(score_mod)
        got = evaluate(traced, {"score": score, "b": b, "h": h, "q_idx": q_idx, "kv_idx": kv_idx})
        from triton_attn.masks.evaluate import per_element

        expected = per_element(score_mod, [score, b, h, q_idx, kv_idx])
        torch.testing.assert_close(got.broadcast_to(expected.shape), expected, rtol=1e-5, atol=1e-5, msg=name)


def _bitwise_mods():
    values = torch.randint(-50, 50, (LENGTH,), generator=torch.Generator().manual_seed(4))
    return {
        "shift_of_negative": lambda b, h, q_idx, kv_idx: ((q_idx - kv_idx) >> 2) > -3,
        "shift_by_loaded_amount": lambda b, h, q_idx, kv_idx: (kv_idx << (values[q_idx] & 3)) < q_idx + 20,
        "and_of_negative": lambda b, h, q_idx, kv_idx: ((q_idx - 40) & (kv_idx - 7)) >= 0,
        "or_xor_of_negative": lambda b, h, q_idx, kv_idx: (((values[kv_idx] | 5) ^ (q_idx - kv_idx)) % 3) == 0,
        "invert_of_difference": lambda b, h, q_idx, kv_idx: ~(q_idx - kv_idx) < 4,
        "fmod_round_sign": lambda b, h, q_idx, kv_idx: (
            torch.fmod(values[q_idx], 7) + torch.sign(values[kv_idx]) < torch.round(values[kv_idx] / 9)),
    }


@pytest.mark.parametrize("name", sorted(_bitwise_mods()))
def test_interval_bounds_of_bitwise_and_composite_nodes_are_sound(name):
    # Interval analysis may be loose on these nodes, never wrong: the result equals the exact compiler's.
    from triton_attn.masks import compiler

    mask_mod = _bitwise_mods()[name]
    for block_size in (16, (8, 32)):
        fast = ta.create_block_mask(mask_mod, None, None, 61, 57, BLOCK_SIZE=block_size)
        exact = compiler.create_block_mask_exact(mask_mod, None, None, 61, 57, BLOCK_SIZE=block_size)
        for field in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
            assert torch.equal(getattr(fast, field), getattr(exact, field)), (name, block_size, field)
