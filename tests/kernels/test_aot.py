"""Ahead-of-time compilation for sm_80 / sm_90 without a GPU (Triton + the bundled ptxas).

Proves that every config of the table compiles for both targets within the register and
shared-memory budget, that the sm_90 builds use wgmma, and that kernels generated for the
whole range of mask/score constructs pass the real compiler (the interpreter is more lenient).
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.toolchain import compile_mods, nvidia_toolchain_available

pytest.importorskip("triton")

from triton_attn.kernels.attention.aot import compile_forward  # noqa: E402
from triton_attn.kernels.attention.configs import FLOAT32_CONFIGS, FORWARD_CONFIGS, MAIN_CONFIGS, default_config  # noqa: E402
from triton_attn.kernels.jit import functions  # noqa: E402
from triton_attn.kernels.tuning import aot  # noqa: E402
from triton_attn.kernels.tuning.search import shared_memory_limit  # noqa: E402
from triton_attn.masks import (  # noqa: E402
    alibi_score,
    and_masks,
    causal_mask,
    document_mask,
    padding_mask,
    prefix_lm_mask,
    sliding_window_mask,
    softcap_score,
)

pytestmark = pytest.mark.skipif(not nvidia_toolchain_available(80, 90),
                                reason="Triton's NVIDIA backend is not installed")


@pytest.mark.parametrize("config", FORWARD_CONFIGS, ids=lambda c: c.name)
def test_every_config_compiles_for_sm80_and_sm90_within_budget(config):
    kernel = compile_mods()
    for arch in aot.ARCHS:
        result = compile_forward(config, arch=arch, head_dim=config.max_head_dim, dtype=torch.bfloat16, **kernel)
        assert result.shared_bytes <= shared_memory_limit(arch), str(result)
        assert not result.spills, f"register spills: {result}"
        if arch == 90 and config.BLOCK_M >= 64:  # wgmma needs 64-row warp groups
            assert result.ptx_has_wgmma, f"no wgmma in the sm_90 PTX: {result}"


@pytest.mark.parametrize("head_dim", sorted(MAIN_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_main_configs_have_no_spills_and_use_wgmma(head_dim, dtype):
    kernel = compile_mods()
    config = default_config(head_dim, head_dim, dtype, (128, 128), 4096)
    for arch in aot.ARCHS:
        result = compile_forward(config, arch=arch, head_dim=head_dim, dtype=dtype, inspect_sass=arch == 90,
                                 **kernel)
        assert not result.spills, str(result)
        assert result.shared_bytes <= shared_memory_limit(arch), str(result)
        if arch == 90:
            assert result.ptx_has_wgmma, str(result)
            assert result.sass_has_wgmma in (True, None), f"no HGMMA in the SASS: {result}"


@pytest.mark.parametrize("head_dim", sorted(FLOAT32_CONFIGS))
def test_float32_configs_compile_within_shared_memory(head_dim):
    config = default_config(head_dim, head_dim, torch.float32, (128, 128), 4096)
    for arch in aot.ARCHS:
        result = compile_forward(config, arch=arch, head_dim=head_dim, dtype=torch.float32, **compile_mods())
        assert result.shared_bytes <= shared_memory_limit(arch), str(result)
        assert result.spill_stores <= 2048, f"float32 spills grew: {result}"


def _variants():
    ids = torch.randint(0, 4, (2, 64)).cumsum(1)
    table = torch.randn(127, dtype=torch.bfloat16)

    def relative_bias(score, b, h, q_idx, kv_idx):
        return score + table[q_idx - kv_idx + 63]

    def signed_arithmetic(b, h, q_idx, kv_idx):
        return ((q_idx - kv_idx) // 7 % 3 != 1) & (torch.abs(q_idx - kv_idx) < 40)

    return {
        "document_softcap": (and_masks(causal_mask, document_mask(ids)), softcap_score(30.0), functions.MASK_TRACED),
        "prefix_per_batch_alibi": (prefix_lm_mask(torch.tensor([3, 9])), alibi_score(8), functions.MASK_TRACED),
        "padding_bool_relative_bias": (padding_mask(ids > 1), relative_bias, functions.MASK_TRACED),
        "signed_arithmetic": (signed_arithmetic, None, functions.MASK_TRACED),
        "window_no_partial": (sliding_window_mask(128), None, functions.MASK_NONE),
        "bitmask_fallback": (causal_mask, None, functions.MASK_BITMASK),
    }


@pytest.mark.parametrize("name", list(_variants()))
def test_generated_variants_compile_for_sm90(name):
    mask_mod, score_mod, mode = _variants()[name]
    kernel = compile_mods(mask_mod, score_mod, mode)
    config = MAIN_CONFIGS[64]
    for block_size, kv_len in (((128, 128), 4096), ((64, 48), 1000)):  # aligned, and ragged sub-tiles
        result = compile_forward(config.fitted(*block_size), arch=90, head_dim=64, kv_len=kv_len,
                                 block_size=block_size, **kernel)
        assert result.ptx_has_wgmma and not result.spills, str(result)


def test_interpreter_leaves_triton_ready_to_compile():
    """An interpreted launch in this process must not leave triton.language patched."""
    import triton.language as tl

    import triton_attn as ta

    before = {name: value for name, value in vars(tl.core).items()}
    q, k, v = (torch.randn(1, 1, 20, 16) for _ in range(3))
    ta.attention(q, k, v, block_mask=ta.create_block_mask(causal_mask, None, None, 20, 20, BLOCK_SIZE=16),
                 backend="interpret")
    changed = [name for name, value in vars(tl.core).items() if before.get(name) is not value and name in before]
    assert not changed, f"triton.language.core left patched: {changed[:5]}"
    result = compile_forward(MAIN_CONFIGS[64], arch=90, head_dim=64, **compile_mods())
    assert result.ptx_has_wgmma
