"""Ahead-of-time compiles of the decode kernels for sm_80 / sm_90 (no GPU needed).

Every entry of the decode config table compiles for both targets within the shared-memory
budget; the main configs (16-bit inputs, head_dim 128, MHA and packed GQA) do not spill, also with
paged K/V, a captured-tensor mask and a score_mod; the combine kernel compiles for both.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.toolchain import nvidia_toolchain_available

pytest.importorskip("triton")

from triton_attn.kernels.decode.aot import compile_combine, compile_decode  # noqa: E402
from triton_attn.kernels.decode.configs import DECODE_CONFIGS, MAIN_DECODE_CONFIGS  # noqa: E402
from triton_attn.kernels.tuning.aot import ARCHS  # noqa: E402
from triton_attn.kernels.tuning.search import shared_memory_limit  # noqa: E402
from triton_attn.masks import causal_mask, document_mask, softcap_score  # noqa: E402

pytestmark = pytest.mark.skipif(not nvidia_toolchain_available(80, 90),
                                reason="Triton's NVIDIA backend is not installed")


def causal_at_end(b, h, q_idx, kv_idx):
    return q_idx + 4095 >= kv_idx


@pytest.mark.parametrize("config", DECODE_CONFIGS, ids=lambda c: c.name)
def test_every_decode_config_compiles_for_sm80_and_sm90(config):
    dtype = torch.bfloat16 if config.max_head_dim <= 128 else torch.float16
    groups = 4 if config.BLOCK_M > 16 else 1
    for arch in ARCHS:
        result = compile_decode(config, arch=arch, dtype=dtype, head_dim=config.max_head_dim, q_heads=8 * groups,
                                kv_heads=8, q_len=1 if groups == 1 else 16, mask_mod=causal_at_end)
        assert result.shared_bytes <= shared_memory_limit(arch), str(result)
        if config in MAIN_DECODE_CONFIGS:
            assert not result.spills, f"register spills: {result}"


@pytest.mark.parametrize("config", MAIN_DECODE_CONFIGS, ids=lambda c: c.name)
def test_main_configs_paged_with_mods_do_not_spill(config):
    ids = torch.zeros(1, 4096, dtype=torch.int64)
    groups = 8 if config.BLOCK_M > 16 else 1
    for arch in ARCHS:
        result = compile_decode(config, arch=arch, dtype=torch.bfloat16, head_dim=128, q_heads=8 * groups, kv_heads=8,
                                q_len=8 if groups > 1 else 1, paged=True, page_size=16, kv_len=4096,
                                mask_mod=document_mask(ids), score_mod=softcap_score(30.0))
        assert not result.spills, str(result)
        assert result.shared_bytes <= shared_memory_limit(arch), str(result)


def test_float32_and_unsplit_builds():
    result = compile_decode(DECODE_CONFIGS[4], arch=80, dtype=torch.float32, head_dim=64, q_heads=4, kv_heads=4,
                            num_splits=1, mask_mod=causal_mask)
    assert result.shared_bytes <= shared_memory_limit(80), str(result)


@pytest.mark.parametrize("arch", ARCHS)
def test_combine_kernel_compiles(arch):
    result = compile_combine(arch=arch, head_dim_v=128, num_splits=64)
    assert not result.spills, str(result)
