"""Ahead-of-time builds of the attention-dropout variants for sm_80 / sm_90 without a GPU.

The forward, dK/dV (or its split dV and dK) and dQ kernels with ``DROPOUT``, on the tiles a dropout launch
takes (``default_config(..., dropout=True)``: at most 16 keep decisions per thread and step), and the
keep-mask kernel: each compiles, spills nothing (bf16, causal, head_dim 64 and 128, where the builds
without dropout spill nothing either), draws Philox (its round constant is in the PTX), keeps its loads
pipelined and, on sm_90, multiplies on wgmma.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.toolchain import compile_mods, nvidia_toolchain_available

pytest.importorskip("triton")

from triton_attn.kernels import targets  # noqa: E402
from triton_attn.kernels.attention import aot as attention_aot  # noqa: E402
from triton_attn.kernels.attention.configs import default_backward_config, default_config  # noqa: E402
from triton_attn.kernels.tuning import aot  # noqa: E402
from triton_attn.kernels.tuning.search import shared_memory_limit  # noqa: E402

pytestmark = pytest.mark.skipif(not nvidia_toolchain_available(80, 90),
                                reason="Triton's NVIDIA backend is not installed")

SEQ_LEN = 4096
# Philox4x32's round multiplier 0xD2511F53, as the signed 32-bit immediate of the PTX's mul.hi.u32.
PHILOX_ROUND = str(0xD2511F53 - 2 ** 32)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("arch", aot.ARCHS)
def test_dropout_kernels_build_without_spills(arch, head_dim):
    target = targets.get(arch)
    dtype = torch.bfloat16
    shapes = dict(arch=arch, dtype=dtype, head_dim=head_dim, q_len=SEQ_LEN, kv_len=SEQ_LEN, dropout=True,
                  **compile_mods())
    forward = default_config(head_dim, head_dim, dtype, (128, 128), SEQ_LEN, target=target, dropout=True)
    backward = default_backward_config(head_dim, head_dim, dtype, (128, 128), SEQ_LEN, SEQ_LEN, target=target,
                                       dropout=True)
    results = {"forward": attention_aot.compile_forward(forward, **shapes)}
    results.update(attention_aot.compile_backward(backward, **shapes))
    # sm_90 at D = 128 splits dK/dV into two launches, as without dropout.
    expected = {"forward", "dq", *(("dv", "dk") if backward.split_dkdv else ("dkdv",))}
    assert set(results) == expected
    for name, result in results.items():
        assert not result.spills, f"{name}: {result}"
        assert result.shared_bytes <= shared_memory_limit(arch), f"{name}: {result}"
        assert PHILOX_ROUND in result.ptx, f"{name}: no Philox in the build"
        assert result.async_waits > 0, f"{name}: loads not pipelined: {result}"
        if arch == 90:
            assert result.ptx_has_wgmma, f"{name}: {result}"


def test_dropout_mask_kernel_builds():
    for arch in aot.ARCHS:
        result = attention_aot.compile_dropout_mask(arch=arch)
        assert ".entry" in result.ptx and PHILOX_ROUND in result.ptx
        assert not result.spills, str(result)


def test_a_build_without_dropout_draws_nothing():
    """DROPOUT=False compiles the kernel as it was: its dropout arguments are constants (None), no Philox."""
    config = default_config(64, 64, torch.bfloat16, (128, 128), SEQ_LEN, target=targets.get(80))
    result = attention_aot.compile_forward(config, arch=80, dtype=torch.bfloat16, head_dim=64, **compile_mods())
    assert PHILOX_ROUND not in result.ptx


def test_the_matrix_builds_the_dropout_variants():
    """``matrix.cases(..., dropout=True)``: the dropout variant of every family that has one (the kernels the
    builds above already compiled, so this mostly reads Triton's cache) and the keep-mask kernel."""
    from triton_attn.kernels import matrix

    cases = matrix.cases(["sm_80"], fast=True, dropout=True)
    assert {case.family for case in cases} == set(matrix.DROPOUT_FAMILIES) and all(case.dropout for case in cases)
    rows = matrix.run(cases)
    assert all(row.ok and not row.spill_bytes for row in rows), matrix.format_table(rows)
    assert all("+drop" in line for line in matrix.format_table(rows).splitlines()[2:])
