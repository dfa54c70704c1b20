"""A BlockMask built before a CUDA graph capture can be used for the first time inside it: no call of
``attention`` reads a tensor value on the host (``tests/helpers/host_reads.py``), on the kernels' routes
(``interpret``: the Triton kernels under the interpreter), for a decode step and a prefill forward +
backward. Everything a launch needs to know about the mask is planned when the mask is built."""

from __future__ import annotations

import pytest
import torch

import triton_attn as ta
from tests.helpers.host_reads import no_host_reads
from tests.helpers.numerics import assert_matches_golden
from triton_attn.masks import causal_mask, sliding_window_mask

pytest.importorskip("triton")


def test_a_decode_step_with_a_fresh_block_mask_reads_nothing():
    q, k, v = torch.randn(2, 4, 1, 32), torch.randn(2, 2, 200, 32), torch.randn(2, 2, 200, 32)

    def last_row_causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + 199

    block_mask = ta.create_block_mask(last_row_causal, None, None, 1, 200, BLOCK_SIZE=64)
    with no_host_reads():
        out, lse = ta.attention(q, k, v, block_mask=block_mask, enable_gqa=True, backend="interpret", return_lse=True)
    assert ta.explain(q, k, v, block_mask=block_mask, enable_gqa=True, backend="interpret").family == "decode"
    assert_matches_golden(lambda *_: (out, lse), q, k, v, mask_mod=last_row_causal, backward=False)


@pytest.mark.parametrize("mask_mod", [causal_mask, sliding_window_mask(40)], ids=["causal", "window"])
def test_a_prefill_forward_and_backward_with_a_fresh_block_mask_read_nothing(mask_mod):
    q, k, v = (torch.randn(1, 2, 96, 32, requires_grad=True) for _ in range(3))
    block_mask = ta.create_block_mask(mask_mod, None, None, 96, 96, BLOCK_SIZE=32)

    def candidate(q_, k_, v_):
        with no_host_reads():
            return ta.attention(q_, k_, v_, block_mask=block_mask, backend="interpret", return_lse=True)

    assert_matches_golden(candidate, q, k, v, mask_mod=mask_mod)
    # The backward launches (dQ, dK/dV, delta) under the guard too.
    out = ta.attention(q, k, v, block_mask=block_mask, backend="interpret")
    grad = torch.randn_like(out)
    with no_host_reads():
        out.backward(grad)
    assert q.grad is not None and torch.isfinite(q.grad).all()
