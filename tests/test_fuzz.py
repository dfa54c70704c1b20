"""Fuzzing ``attention()`` through the public API (issue 15).

Hypothesis draws shapes, dtypes, memory layouts, BlockMasks (built, compact, FlexAttention ones,
and corrupted or mismatched ones) and mods (safe, out-of-range, wrongly typed), and runs the
torch and interpret backends. Each call must end one of two ways:

- a result (and, for half of the draws, gradients) that passes the numerics rule against the
  float64 golden result, with no NaN where the golden result has none (fully masked rows: 0,
  never NaN), or
- a ``ValueError`` / ``TypeError`` whose message names an argument. An out-of-range index in a mod
  is reported as the torch backend reports it: a ``ValueError`` that names the mod and says
  ``IndexError``; a bare ``IndexError`` is never raised by ``attention()``.

Anything else -- another exception type, a NaN, a wrong answer -- fails. Shapes stay tiny so the
interpreter keeps the test within seconds.
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

import triton_attn as ta
from tests.helpers.numerics import assert_matches_golden, random_qkv
from triton_attn import BlockMask
from triton_attn.masks import alibi_score, causal_mask, document_mask, sliding_window_mask, softcap_score
from triton_attn.reference import dense_attention

# Argument names one of which every error message must contain.
ARGUMENT_NAMES = ("query", "key", "value", "block_mask", "score_mod", "mask_mod", "scale", "enable_gqa", "backend")


def _mask_mod(kind: str, batch: Optional[int], length: int):
    """``batch`` None: a mask that does not depend on b (what B=None in create_block_mask promises)."""
    if kind == "causal":
        return causal_mask
    if kind == "window":
        return sliding_window_mask(5)
    if kind == "document":
        ids = torch.randint(0, 3, (batch or 1, length)).sort(dim=1).values
        return document_mask(ids if batch else ids[0])
    table = torch.rand(length, length) > 0.6  # an arbitrary pattern, possibly with empty rows

    def random_pattern(b, h, q_idx, kv_idx):
        return table[q_idx, kv_idx]

    return random_pattern


def _score_mod(kind: str, heads: int, kv_len: int):
    """(score_mod, dense equivalent for the golden result, expected failure)."""
    if kind == "none":
        return None, None, None
    if kind == "softcap":
        mod = softcap_score(3.0)
        return mod, mod, None
    if kind == "alibi":
        mod = alibi_score(heads)
        return mod, mod, None
    table = torch.randn(kv_len)
    if kind == "table":
        def key_bias(score, b, h, q_idx, kv_idx):
            return score + table[kv_idx]
        return key_bias, key_bias, None
    if kind == "out_of_range":
        def past_the_end(score, b, h, q_idx, kv_idx):
            return score + table[kv_idx + kv_len]  # out of range at every position
        return past_the_end, past_the_end, (ValueError, "IndexError")

    def bool_score(score, b, h, q_idx, kv_idx):
        return q_idx >= kv_idx
    return bool_score, None, (TypeError, "must return a floating-point tensor")


@st.composite
def problems(draw):
    batch, kv_heads, groups = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2]))
    q_len, kv_len = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    return dict(
        batch=batch, kv_heads=kv_heads, q_heads=kv_heads * groups, q_len=q_len, kv_len=kv_len,
        head_dim=draw(st.sampled_from([8, 16])), value_dim=draw(st.sampled_from([8, 16])),
        dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64])),
        layout=draw(st.sampled_from(["contiguous", "transposed", "strided", "expanded"])),
        mask=draw(st.sampled_from(["none", "causal", "window", "document", "random"])),
        mask_batch=draw(st.sampled_from(["broadcast", "per_batch"])),
        block_size=draw(st.sampled_from([16, 32, (16, 32)])),
        # Valid inputs are drawn more often than each kind of invalid one.
        mask_form=draw(st.sampled_from(["dense"] * 3 + ["compact", "flex", "corrupt", "wrong_length"])),
        score=draw(st.sampled_from(["none"] * 3 + ["softcap", "alibi", "table"] * 2 + ["out_of_range", "bool"])),
        enable_gqa=draw(st.sampled_from([True, True, True, False])),
        scale=draw(st.sampled_from([None, None, 0.3, float("nan")])),
        backend=draw(st.sampled_from(["torch", "interpret"])),
        backward=draw(st.booleans()),
    )


def _build_block_mask(p, mask_mod):
    """(block_mask or None, expected failure or None)."""
    if mask_mod is None:
        return None, None
    batch = p["batch"] if p["mask_batch"] == "per_batch" else None
    q_len = p["q_len"] + (8 if p["mask_form"] == "wrong_length" else 0)
    layout = "compact" if p["mask_form"] == "compact" else "dense"
    block_mask = ta.create_block_mask(mask_mod, batch, None, q_len, p["kv_len"], BLOCK_SIZE=p["block_size"],
                                      layout=layout)
    if p["mask_form"] == "wrong_length":
        return block_mask, (ValueError, "block_mask was built for")
    if p["mask_form"] == "flex":
        return block_mask.to_flex(), None
    if p["mask_form"] == "corrupt":
        fields = {name: getattr(block_mask, name).clone() for name in BlockMask._TENSOR_FIELDS}
        fields["kv_num_blocks"].fill_(1)
        fields["kv_indices"].fill_(block_mask.num_blocks[1])  # one block past the last
        corrupt = BlockMask(**fields, BLOCK_SIZE=block_mask.BLOCK_SIZE, seq_lengths=block_mask.seq_lengths,
                            mask_mod=mask_mod)
        return corrupt, (ValueError, "block_mask.kv_indices lists a block outside")
    return block_mask, None


def _expected_failure(p, mask_failure, score_failure):
    if p["q_heads"] != p["kv_heads"] and not p["enable_gqa"]:
        return ValueError, "enable_gqa=True"
    if p["scale"] is not None and p["scale"] != p["scale"]:
        return TypeError, "scale must be a finite float"
    if p["dtype"] == torch.float64 and p["backend"] != "torch":
        return TypeError, "float64"
    return mask_failure or score_failure


@given(p=problems())  # max_examples from the Hypothesis profile (conftest: 30 on CI)
def test_attention_gives_the_golden_result_or_a_named_error(p):
    torch.manual_seed(0)
    q, k, v = random_qkv(p["batch"], p["q_heads"], p["kv_heads"], p["q_len"], p["kv_len"], p["head_dim"],
                         p["value_dim"], dtype=p["dtype"], layout=p["layout"])
    mask_batch = p["batch"] if p["mask_batch"] == "per_batch" else None
    mask_mod = None if p["mask"] == "none" else _mask_mod(p["mask"], mask_batch, max(p["q_len"], p["kv_len"]) + 8)
    block_mask, mask_failure = _build_block_mask(p, mask_mod)
    score_mod, dense_score_mod, score_failure = _score_mod(p["score"], p["q_heads"], p["kv_len"])
    expected = _expected_failure(p, mask_failure, score_failure)
    visits_nothing = mask_mod is not None and not ta.create_mask(mask_mod, p["batch"], None, p["q_len"],
                                                                 p["kv_len"]).any()

    def run(q, k, v):
        return ta.attention(q, k, v, block_mask=block_mask, score_mod=score_mod, scale=p["scale"],
                            enable_gqa=p["enable_gqa"], return_lse=True, backend=p["backend"])

    if expected is score_failure and p["score"] == "out_of_range" and visits_nothing:
        # The mod is never run where nothing attends: no error, and every row is empty.
        out, lse = run(q, k, v)
        assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())
        return
    event(f"{p['backend']}: " + ("error" if expected is not None else "result"))
    if expected is not None:
        error, words = expected
        with pytest.raises((ValueError, TypeError)) as caught:
            run(q, k, v)
        message = str(caught.value)
        assert any(name in message for name in ARGUMENT_NAMES), f"error names no argument: {message}"
        assert caught.type is error and words in message, f"expected {error.__name__} with {words!r}: {message}"
        return
    out, lse = run(q, k, v)
    golden, _ = dense_attention(q, k, v, mask_mod=mask_mod, score_mod=dense_score_mod, scale=p["scale"],
                                compute_dtype=torch.float64)
    assert not torch.isnan(out).any() or torch.isnan(golden).any(), "NaN where the golden result has none"
    assert_matches_golden(run, q, k, v, mask_mod=mask_mod, score_mod=dense_score_mod, scale=p["scale"],
                          backward=p["backward"], context=str(p))
