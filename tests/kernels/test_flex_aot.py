"""The FlexAttention constructs' generated code through the real compiler (sm_90).

The interpreter is lenient (numpy does the math); this proves that the new constructs (shifts,
nested loads, an unrolled isin and a reduction over a captured dim, sin/cos/erf, the log1p/expm1
corrections, constant powers, and their derivatives) compile ahead of time, forward and backward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.toolchain import nvidia_toolchain_available

pytest.importorskip("triton")

from triton_attn.kernels.attention.aot import compile_backward, compile_forward  # noqa: E402
from triton_attn.kernels.attention.configs import (
    BACKWARD_CONFIGS,  # noqa: E402
    MAIN_CONFIGS,  # noqa: E402
)
from triton_attn.kernels.tuning.search import shared_memory_limit  # noqa: E402
from triton_attn.masks.tracing import trace_mask_mod, trace_score_mod  # noqa: E402

pytestmark = pytest.mark.skipif(not nvidia_toolchain_available(80, 90),
                                reason="Triton's NVIDIA backend is not installed")


def _mods() -> dict:
    ids = torch.randint(0, 4, (2, 64)).sort(-1).values
    starts = torch.tensor([0, 10, 30, 50])
    allowed = torch.tensor([0, 3, 5, 7])
    table = torch.randn(64, 4)

    def flex_mask(b, h, q_idx, kv_idx):
        document = kv_idx >= starts[ids[b][q_idx]]
        return document & (((q_idx >> 3) ^ (kv_idx >> 3)) <= 1) | torch.isin(kv_idx, allowed)

    def flex_score(score, b, h, q_idx, kv_idx):
        smooth = F.gelu(score) + torch.sin(score) * torch.cos(score) + torch.log1p(score.abs())
        return smooth + torch.expm1(score * 0.1) + score.abs() ** 1.5 + torch.dot(table[q_idx], table[kv_idx])

    return dict(mask=trace_mask_mod(flex_mask), score=trace_score_mod(flex_score))


def test_flex_constructs_compile_forward_and_backward():
    mods = _mods()
    # One target: the constructs are target-independent math; tests/kernels/test_aot.py covers sm_80 configs.
    result = compile_forward(MAIN_CONFIGS[64], arch=90, head_dim=64, dtype=torch.float16, **mods)
    assert result.shared_bytes <= shared_memory_limit(90), str(result)
    results = compile_backward(BACKWARD_CONFIGS[0], arch=90, head_dim=64, dtype=torch.float16, **mods)
    assert {"dq", "dkdv"} <= set(results)
