"""Models that compute with their attention mask as a tensor (``registry/tensor_mask_models.py``), and the
``indices`` keyword of DeepSeek sparse attention.

The architecture sweep runs every model of the table against sdpa / eager (logits, gradients, generate); the
tests here pin the pieces: the mask function's tensor for a table model (against ``dense_mask_function``),
``indices`` against the dense reference (eager attention under ``mask & selected``), and their errors.
"""

from __future__ import annotations

import types

import pytest
import torch

from tests.helpers.numerics import FORWARD_FACTOR, compare
from triton_attn.masks import causal_mask
from triton_attn.registry import (
    ModelBlockMask,
    dense_mask_function,
    eager_attention_function,
    make_attention_function,
    make_mask_function,
)
from triton_attn.registry.keywords import ATTENTION_KEYWORDS
from triton_attn.registry.tensor_mask_models import TENSOR_MASK_MODELS


def _padding(batch: int, length: int) -> torch.Tensor:
    padding = torch.ones(batch, length, dtype=torch.long)
    padding[0, :3] = 0  # left padding of the first sequence
    return padding


def _config(model_type: str):
    return types.SimpleNamespace(model_type=model_type)


@pytest.mark.parametrize("model_type", ["deepseek_v32", "qwen4_exp_text", "t5gemma2_decoder"])
def test_table_models_get_sdpas_bool_mask(model_type):
    """A table model of form "bool" gets the dense bool mask the reference implementations get."""
    batch, q_len, kv_len, q_offset = 2, 5, 9, 4
    padding = _padding(batch, kv_len)
    mask_function = make_mask_function()
    got = mask_function(batch, q_len, kv_len, q_offset, 0, causal_mask, padding, config=_config(model_type))
    expected = dense_mask_function(batch, q_len, kv_len, q_offset, 0, causal_mask, padding)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.bool and got.shape == (batch, 1, q_len, kv_len)
    assert torch.equal(got, expected)
    other = mask_function(batch, q_len, kv_len, q_offset, 0, causal_mask, padding, config=_config("llama"))
    assert isinstance(other, ModelBlockMask)


def test_models_without_sdpa_get_eagers_additive_mask():
    """deepseek_v4 (no sdpa; its code extends the mask with an additive block bias) gets eager's float mask:
    0 where allowed, the dtype's minimum elsewhere."""
    assert TENSOR_MASK_MODELS["deepseek_v4"].form == "additive"
    batch, length = 2, 7
    padding = _padding(batch, length)
    got = make_mask_function()(batch, length, length, 0, 0, causal_mask, padding, config=_config("deepseek_v4"),
                               dtype=torch.float16)
    allowed = dense_mask_function(batch, length, length, 0, 0, causal_mask, padding)
    expected = torch.zeros(allowed.shape, dtype=torch.float16).masked_fill(~allowed, torch.finfo(torch.float16).min)
    assert got.dtype == torch.float16 and torch.equal(got, expected)


def test_table_entries_have_a_form_and_a_reason():
    for model_type, entry in TENSOR_MASK_MODELS.items():
        assert entry.form in ("bool", "additive"), model_type
        assert len(entry.reason) > 20, model_type


def _qkv(batch=2, q_heads=4, kv_heads=2, q_len=6, kv_len=10, dim=16):
    return (torch.randn(batch, q_heads, q_len, dim), torch.randn(batch, kv_heads, kv_len, dim),
            torch.randn(batch, kv_heads, kv_len, dim))


def _module(q_heads=4, kv_heads=2):
    return types.SimpleNamespace(is_causal=True, num_key_value_groups=q_heads // kv_heads, training=False)


def _top_k(batch, q_len, kv_len, k, allowed=None):
    """Top-k keys [B, Lq, k] of random index scores, masked keys scored -inf (a DeepSeek indexer's selection:
    a query with an allowed key selects one)."""
    scores = torch.randn(batch, q_len, kv_len)
    if allowed is not None:
        scores = scores.masked_fill(~allowed[:, 0], float("-inf"))
    return scores.topk(k, dim=-1).indices


@pytest.mark.parametrize("backend", ["torch", "interpret"])
@pytest.mark.parametrize("mask_kind", ["bool", "additive", "none"])
def test_indices_restrict_attention_to_the_selected_keys(backend, mask_kind):
    """``indices`` [B, Lq, top_k]: a query attends to the keys its mask and its indices both allow, as eager
    attention under ``mask & scatter(indices)`` (DeepSeek sparse attention's eager path); no mask: the causal
    pattern (queries the last Lq positions) and the indices."""
    batch, q_len, kv_len = 2, 6, 10
    query, key, value = _qkv(batch, q_len=q_len, kv_len=kv_len)
    padding = _padding(batch, kv_len) if mask_kind != "none" else None
    allowed = dense_mask_function(batch, q_len, kv_len, kv_len - q_len, 0, causal_mask, padding)
    indices = _top_k(batch, q_len, kv_len, 3, allowed).to(torch.int32)
    selected = torch.zeros(batch, q_len, kv_len, dtype=torch.bool).scatter(-1, indices.long(), True).unsqueeze(1)
    minimum = torch.finfo(torch.float64).min
    if mask_kind == "bool":
        mask = allowed
    elif mask_kind == "additive":
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    else:
        mask = None
    reference_bias = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~(allowed & selected), minimum)
    module = _module()
    ours, _ = make_attention_function(backend=backend)(module, query, key, value, mask, indices=indices)
    golden, _ = eager_attention_function(module, query.double(), key.double(), value.double(), reference_bias)
    baseline, _ = eager_attention_function(module, query, key, value, reference_bias.float())
    unselected, _ = eager_attention_function(module, query.double(), key.double(), value.double(),
                                             torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed,
                                                                                                         minimum))
    comparison = compare("out", ours, baseline, golden, FORWARD_FACTOR, torch.float32)
    assert comparison.error <= comparison.bound, str(comparison)
    assert (unselected - golden).abs().max() > 1e-2  # the selection changes the result


@pytest.mark.parametrize("indices, message", [
    (torch.zeros(2, 6, 3), "integer top-k key indices"),
    (torch.zeros(2, 5, 3, dtype=torch.long), r"\[2 or 1, 6, top_k\]"),
    (torch.full((2, 6, 3), 10), r"\[0, Lkv\) = \[0, 10\)"),
    (torch.full((2, 6, 3), -1), r"\[0, Lkv\) = \[0, 10\)"),
])
def test_bad_indices_are_errors_naming_them(indices, message):
    query, key, value = _qkv()
    with pytest.raises(ValueError, match=message):
        make_attention_function(backend="torch")(_module(), query, key, value, None, indices=indices)


def test_indices_with_a_block_mask_are_refused():
    """A ``ModelBlockMask`` is not restricted by indices (no exact layout for a per-query key set): an error
    that points at the tensor-mask table, never a silent drop of the selection."""
    query, key, value = _qkv(q_len=10)
    block_mask = make_mask_function()(2, 10, 10, 0, 0, causal_mask, None)
    with pytest.raises(ValueError, match="indices .* tensor attention_mask"):
        make_attention_function(backend="torch")(_module(), query, key, value, block_mask,
                                                 indices=_top_k(2, 10, 10, 3))


def test_new_keywords_are_classified():
    assert ATTENTION_KEYWORDS["indices"].kind == "implemented"
    assert ATTENTION_KEYWORDS["cross_attention_mask"].kind == "harmless"
    assert ATTENTION_KEYWORDS["full_text_row_masked_out_mask"].kind == "harmless"
