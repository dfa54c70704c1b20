"""``triton_attn.flex_attention`` / ``create_block_mask`` as drop-ins for FlexAttention's, and the
score_mod fallback for mods the Triton kernels cannot compile."""

from __future__ import annotations

import warnings

import pytest
import torch

import triton_attn as ta
from tests.helpers.numerics import assert_matches_golden, random_qkv
from triton_attn.api.flex import flex_kernel_options
from triton_attn.dispatch import ScoreModFallbackWarning

flex = pytest.importorskip("torch.nn.attention.flex_attention")


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def test_positional_order_and_return_conventions_match_flex():
    q, k, v = random_qkv(1, 4, 2, 40, 40, 16, dtype=torch.float32)
    block_mask = ta.create_block_mask(_causal, None, None, 40, 40, "cpu", 16)  # Flex's positional device, BLOCK_SIZE

    def score_mod(score, b, h, q_idx, kv_idx):
        return score * 0.5

    out = ta.flex_attention(q, k, v, score_mod, block_mask, 0.3, True)
    expected, expected_aux = flex.flex_attention(q, k, v, score_mod, flex.create_block_mask(
        _causal, None, None, 40, 40, device="cpu", BLOCK_SIZE=16), 0.3, True, return_aux=flex.AuxRequest(lse=True))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    expected_lse = expected_aux.lse
    out, lse = ta.flex_attention(q, k, v, score_mod, block_mask, 0.3, True, True)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-5, atol=1e-5)
    out, aux = ta.flex_attention(q, k, v, score_mod, block_mask, 0.3, True, return_aux=flex.AuxRequest(lse=True))
    assert isinstance(aux, flex.AuxOutput) and aux.max_scores is None
    torch.testing.assert_close(aux.lse, expected_lse, rtol=1e-5, atol=1e-5)
    _, aux = ta.flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True, return_aux=flex.AuxRequest())
    assert aux.lse is None
    with pytest.raises(ValueError, match="return_lse or return_aux"):
        ta.flex_attention(q, k, v, enable_gqa=True, return_lse=True, return_aux=flex.AuxRequest(lse=True))
    with pytest.raises(ValueError, match="max_scores"):
        ta.flex_attention(q, k, v, enable_gqa=True, return_aux=flex.AuxRequest(max_scores=True))


def test_flex_block_mask_and_argument_forms_are_accepted():
    q, k, v = random_qkv(2, 2, 2, 48, 48, 16, dtype=torch.float32)
    theirs = flex.create_block_mask(_causal, 2, None, 48, 48, device="cpu", BLOCK_SIZE=16, _compile=False)
    ours = ta.create_block_mask(_causal, 2, None, 48, 48, device="cpu", BLOCK_SIZE=(16, 16), _compile=True)
    torch.testing.assert_close(ta.flex_attention(q, k, v, block_mask=theirs),
                               ta.flex_attention(q, k, v, block_mask=ours))
    assert ta.create_block_mask(_causal, None, None, 48, 48, torch.device("cpu"), 32).BLOCK_SIZE == (32, 32)


def test_kernel_options_map_to_the_forward_config_or_are_rejected_by_name():
    assert flex_kernel_options(None) == (None, {})
    backend, tiles = flex_kernel_options({"BLOCK_M": 32, "fwd_BLOCK_N": 16, "num_warps": 2, "num_stages": 1,
                                          "ROWS_GUARANTEED_SAFE": True, "PRESCALE_QK": False, "BACKEND": "TRITON"})
    assert backend == "triton" and tiles == {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 2, "num_stages": 1}
    for bad, message in (({"bwd_BLOCK_M1": 32}, "bwd_BLOCK_M1"), ({"BLOCK_M1": 32}, "BLOCK_M1"),
                         ({"SOMETHING": 1}, "SOMETHING"), ({"BACKEND": "FLASH"}, "BACKEND")):
        with pytest.raises(ValueError, match=message):
            flex_kernel_options(bad)
    with pytest.raises(TypeError, match="BLOCK_N"):
        flex_kernel_options({"BLOCK_N": 16.0})
    q, k, v = random_qkv(1, 1, 1, 32, 32, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="BLOCK_M"):  # the KernelConfig's check, naming the key
        ta.flex_attention(q, k, v, kernel_options={"BLOCK_M": 24, "BACKEND": "AUTO"})


def test_kernel_options_tiles_run_the_interpreted_forward(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_ATTN_BACKEND", "interpret")
    q, k, v = random_qkv(1, 2, 2, 40, 40, 16, dtype=torch.float16)
    block_mask = ta.create_block_mask(_causal, None, None, 40, 40, BLOCK_SIZE=32)
    options = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 2, "num_stages": 1, "ROWS_GUARANTEED_SAFE": True}
    assert_matches_golden(lambda q_, k_, v_: ta.flex_attention(q_, k_, v_, block_mask=block_mask, return_lse=True,
                                                               kernel_options=options),
                          q, k, v, mask_mod=_causal, backward=False)


def test_uncompilable_score_mod_warns_once_and_stays_exact():
    pytest.importorskip("triton")

    def scaled_erfcx(score, b, h, q_idx, kv_idx):  # no Triton spelling of erfcx
        return torch.special.erfcx(score * 0.1)

    q, k, v = random_qkv(1, 2, 1, 24, 24, 16, dtype=torch.float32)
    with pytest.warns(ScoreModFallbackWarning, match="scaled_erfcx.*blockwise"):
        assert_matches_golden(lambda q_, k_, v_: ta.attention(q_, k_, v_, score_mod=scaled_erfcx, enable_gqa=True,
                                                              return_lse=True, backend="interpret"),
                              q, k, v, score_mod=scaled_erfcx)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ScoreModFallbackWarning)  # once, not on every call
        ta.attention(q, k, v, score_mod=scaled_erfcx, enable_gqa=True, backend="interpret")


def test_exported_from_the_package():
    assert "flex_attention" in ta.__all__ and ta.flex_attention is ta.api.flex.flex_attention


def test_untraceable_per_element_mods_run_exactly_with_one_warning():
    # Written per element (chained indexing fails on broadcast tensors) and untraceable (erfcx):
    # the eager paths call them per element, as Flex does, and the result is Flex's.
    pytest.importorskip("triton")
    from triton_attn.kernels.attention.fallback import UntraceableMaskWarning

    weights = torch.rand(2, 48) * 3
    head_bias = torch.randn(2, 48)

    def erfcx_gate(b, h, q_idx, kv_idx):
        return (torch.special.erfcx(weights[b][kv_idx]) > 0.3) | (q_idx == kv_idx)

    def erfcx_score(score, b, h, q_idx, kv_idx):
        return torch.special.erfcx(score * 0.1) + head_bias[h][kv_idx]

    with pytest.warns(UserWarning, match="cannot be traced"):
        ours = ta.create_block_mask(erfcx_gate, 2, 2, 48, 48, BLOCK_SIZE=16)
    theirs = flex.create_block_mask(erfcx_gate, 2, 2, 48, 48, device="cpu", BLOCK_SIZE=16)
    for field in ("kv_num_blocks", "full_kv_num_blocks"):
        assert torch.equal(getattr(ours, field).long(), getattr(theirs, field).long()), field
    assert torch.equal(ta.create_mask(erfcx_gate, 2, 2, 48, 48), flex.create_mask(erfcx_gate, 2, 2, 48, 48, "cpu"))
    q, k, v = random_qkv(2, 2, 2, 48, 48, 16, dtype=torch.float32)
    with pytest.warns(UntraceableMaskWarning, match="erfcx"):  # the kernels read the mask's bits
        assert_matches_golden(lambda q_, k_, v_: ta.attention(q_, k_, v_, block_mask=ours, return_lse=True,
                                                              backend="interpret"),
                              q, k, v, mask_mod=erfcx_gate, backward=False)
    with pytest.warns(ScoreModFallbackWarning, match="erfcx_score"):  # the whole call runs blockwise
        assert_matches_golden(lambda q_, k_, v_: ta.attention(q_, k_, v_, score_mod=erfcx_score, block_mask=ours,
                                                              return_lse=True, backend="interpret"),
                              q, k, v, mask_mod=erfcx_gate, score_mod=erfcx_score)
