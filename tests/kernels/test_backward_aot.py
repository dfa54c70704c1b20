"""Ahead-of-time compilation of the backward kernels for sm_80 / sm_90 without a GPU.

Every entry of ``BACKWARD_CONFIGS`` compiles (dK/dV and dQ kernels) for both targets within the
shared-memory budget; the main configs spill no registers; the 64-row sm_90 builds use wgmma;
kernels generated for the range of mask/score constructs (score derivatives, captured tensors,
the transposed bitmask fallback, ragged sub-tiles) pass the real compiler.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.toolchain import compile_mods, nvidia_toolchain_available

pytest.importorskip("triton")

from triton_attn.kernels import targets  # noqa: E402
from triton_attn.kernels.attention import aot as backward_aot  # noqa: E402
from triton_attn.kernels.attention.configs import (  # noqa: E402
    BACKWARD_CONFIGS,
    FLOAT32_BACKWARD_CONFIGS,
    MAIN_BACKWARD_CONFIGS,
    SPILLING_CONFIGS,
    default_backward_config,
)
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


def _dtype_of(config) -> torch.dtype:
    return torch.float32 if config in FLOAT32_BACKWARD_CONFIGS.values() else torch.bfloat16


@pytest.mark.parametrize("config", BACKWARD_CONFIGS, ids=lambda c: f"{c.name}_d{c.max_head_dim}")
@pytest.mark.parametrize("arch", aot.ARCHS)
def test_every_backward_config_compiles_within_budget(config, arch):
    dtype = _dtype_of(config)
    results = backward_aot.compile_backward(config, arch=arch, head_dim=config.max_head_dim, dtype=dtype,
                                            **compile_mods())
    for name, result in results.items():
        assert result.shared_bytes <= shared_memory_limit(arch), f"{name}: {result}"
        if config not in SPILLING_CONFIGS:
            assert not result.spills, f"{name} register spills: {result}"
    if arch == 90 and dtype != torch.float32:
        # wgmma needs 64-row warp groups: the dQ tile's query rows, the dK/dV tile's keys.
        if config.dq.BLOCK_M >= 64:
            assert results["dq"].ptx_has_wgmma, str(results["dq"])
        if config.dkdv.BLOCK_N >= 64:
            assert results["dkdv"].ptx_has_wgmma, str(results["dkdv"])


@pytest.mark.parametrize("head_dim", [64, 96])
def test_main_fp16_configs_have_no_spills(head_dim):
    for arch in aot.ARCHS:
        config = MAIN_BACKWARD_CONFIGS[128 if head_dim > 64 else 64]
        results = backward_aot.compile_backward(config, arch=arch, head_dim=head_dim, dtype=torch.float16,
                                                inspect_sass=arch == 90, **compile_mods())
        for name, result in results.items():
            assert not result.spills, f"{name}: {result}"
            if arch == 90:
                assert result.ptx_has_wgmma and result.sass_has_wgmma in (True, None), f"{name}: {result}"


def test_hopper_backward_at_a_ragged_length_has_no_spills():
    """Lengths that are not a multiple of the tile run the bounds-checked dK/dV loop, whose padding rows
    must not turn a large position bias into NaN (their exponent is clamped at 64). Making their shift
    +inf instead cost ~30 registers and a 32-byte spill in the dK launch at head_dim 128 bf16 on sm_90."""
    for head_dim in (64, 128):
        config = default_backward_config(head_dim, head_dim, torch.bfloat16, (128, 128), 4000, 4000,
                                         target=targets.get(90))
        results = backward_aot.compile_backward(config, arch=90, head_dim=head_dim, dtype=torch.bfloat16,
                                                q_len=4000, kv_len=4000)  # no mask: every tile bounds-checked
        for name, result in results.items():
            assert not result.spills, f"D={head_dim} {name}: {result}"


def _variants():
    ids = torch.randint(0, 4, (2, 64)).cumsum(1)
    table = torch.randn(127, dtype=torch.bfloat16)

    def relative_bias(score, b, h, q_idx, kv_idx):
        return score + table[q_idx - kv_idx + 63]

    def smooth(score, b, h, q_idx, kv_idx):
        return torch.where(q_idx > kv_idx, torch.sigmoid(score) * 4.0 + torch.log(score * score + 1.0), score)

    return {
        "document_softcap": (and_masks(causal_mask, document_mask(ids)), softcap_score(30.0), functions.MASK_TRACED),
        "prefix_per_batch_alibi": (prefix_lm_mask(torch.tensor([3, 9])), alibi_score(8), functions.MASK_TRACED),
        "padding_bool_relative_bias": (padding_mask(ids > 1), relative_bias, functions.MASK_TRACED),
        "window_smooth_score": (sliding_window_mask(100), smooth, functions.MASK_TRACED),
        "window_no_partial": (sliding_window_mask(128), None, functions.MASK_NONE),
        "bitmask_fallback": (causal_mask, None, functions.MASK_BITMASK),
    }


@pytest.mark.parametrize("name", list(_variants()))
def test_generated_backward_variants_compile_for_sm90(name):
    mask_mod, score_mod, mode = _variants()[name]
    kernels = compile_mods(mask_mod, score_mod, mode)
    for block_size, q_len, kv_len in (((128, 128), 4096, 4096), ((64, 48), 1000, 999)):  # aligned; ragged
        results = backward_aot.compile_backward(MAIN_BACKWARD_CONFIGS[64], arch=90, head_dim=64,
                                                block_size=block_size, q_len=q_len, kv_len=kv_len, **kernels)
        for kernel_name, result in results.items():
            assert not result.spills, f"{name} {kernel_name}: {result}"


def test_preprocess_kernel_compiles():
    for arch in aot.ARCHS:
        result = backward_aot.compile_preprocess(arch=arch, head_dim_v=80)
        assert ".entry" in result.ptx and not result.spills
