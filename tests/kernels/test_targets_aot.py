"""Every target of ``kernels.targets`` builds ahead of time (no GPU): the fast subset of the AOT matrix (one build
per target and kernel family, D = 128 bf16 causal: the default configs a launch there would use), and the
failures issue 22 found on other GPU families, each as its own test.

The whole matrix (every family x D {64, 128, 256} x {fp16, bf16, fp32} x {none, causal, document, softcap}) is
``triton-attn check --targets all``; its last run is summarized in the README's "Supported GPUs".
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.helpers.toolchain import compile_mods, nvidia_toolchain_available

pytest.importorskip("triton")

from triton_attn.kernels import matrix, targets  # noqa: E402
from triton_attn.kernels.attention import aot  # noqa: E402
from triton_attn.kernels.attention.configs import (  # noqa: E402
    MAIN_CONFIGS,
    default_backward_config,
    default_config,
)

NVIDIA = [name for name, t in targets.TARGETS.items() if not t.is_amd]
AMD = [name for name, t in targets.TARGETS.items() if t.is_amd]


def amd_toolchain_available() -> bool:
    try:
        from triton.backends.amd.compiler import HIPBackend  # noqa: F401
    except ImportError:
        return False
    return True


def needs_toolchain(name: str):
    target = targets.get(name)
    available = amd_toolchain_available() if target.is_amd else nvidia_toolchain_available(target.arch)
    return pytest.mark.skipif(not available, reason=f"no Triton toolchain for {name}")


def _table(rows) -> str:
    return "\n" + matrix.format_table(rows)


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs_toolchain(n)) for n in targets.TARGETS])
def test_fast_matrix_every_family_builds_and_fits(name):
    """One build per kernel family on ``name``: compiles, fits its shared memory (LDS, which our own code checks:
    Triton's AMD backend does not), no spill outside the target's list, the target's tensor-core instructions."""
    rows = matrix.run(matrix.cases([name], fast=True))
    assert {row.case.family for row in rows} == set(matrix.FAMILIES)
    assert all(row.ok for row in rows), _table([row for row in rows if not row.ok])
    target = targets.get(name)
    dots = [row for row in rows if row.case.family in matrix.DOT_FAMILIES]
    if target.is_amd:
        assert all("mfma" in row.instructions for row in dots), _table(dots)
    elif name == "sm_90":
        assert all("wgmma" in row.instructions for row in dots if row.case.family != "decode"), _table(dots)
    elif name == "sm_100":
        assert any("tcgen05" in row.instructions for row in dots), _table(dots)
    else:
        assert all(row.instructions == "mma.sync" for row in dots), _table(dots)


# -- the failures found by building for other targets (each failed on the main of 2026-12-07) -------------------

@needs_toolchain("sm_120")
def test_sm120_backward_fits_its_shared_memory_and_dq_does_not_spill():
    """sm_120 got the Hopper backward table: dK needed 132,608 B and dQ 118,784 B of 101,376, and dQ spilled."""
    target = targets.get("sm_120")
    config = default_backward_config(128, 128, torch.bfloat16, (128, 128), 4096, 4096, target=target)
    results = aot.compile_backward(config, arch=target, head_dim=128, dtype=torch.bfloat16, **compile_mods())
    for name, result in results.items():
        assert result.shared_bytes <= target.shared_memory, f"{name}: {result}"
    assert not results["dq"].spills, results["dq"]


@pytest.mark.skipif(not amd_toolchain_available(), reason="no Triton AMD backend")
@pytest.mark.parametrize("name", ["gfx90a", "gfx950"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cdna2_and_cdna4_compile_every_dtype(name, dtype):
    """gfx90a and gfx950 accept neither "tf32" nor "tf32x3": every forward and backward failed to compile."""
    target = targets.get(name)
    forward = aot.compile_forward(default_config(64, 64, dtype, (128, 128), 4096, target=target), arch=target,
                                  head_dim=64, dtype=dtype, **compile_mods())
    assert forward.uses("mfma") and forward.shared_bytes <= target.shared_memory, forward
    config = default_backward_config(64, 64, dtype, (128, 128), 4096, 4096, target=target)
    for result in aot.compile_backward(config, arch=target, head_dim=64, dtype=dtype, **compile_mods()).values():
        assert result.uses("mfma") and result.shared_bytes <= target.shared_memory, result


@pytest.mark.skipif(not amd_toolchain_available(), reason="no Triton AMD backend")
def test_gfx942_forward_fits_lds_and_float32_compiles():
    """gfx942: the D = 128 forward needed 81,920 B of LDS (limit 65,536; the launch fails at run time, the
    compiler says nothing), and the float32 forward did not compile ("tf32x3")."""
    target = targets.get("gfx942")
    sm80_config = aot.compile_forward(MAIN_CONFIGS[128], arch=target, head_dim=128, **compile_mods())
    assert sm80_config.shared_bytes > target.shared_memory  # what our own check must catch
    for dtype in (torch.bfloat16, torch.float32):
        config = default_config(128, 128, dtype, (128, 128), 4096, target=target)
        result = aot.compile_forward(config, arch=target, head_dim=128, dtype=dtype, **compile_mods())
        assert result.shared_bytes <= target.shared_memory and not result.spills, result
        assert result.uses("mfma"), result


def test_the_matrix_fails_a_build_over_the_lds_limit(monkeypatch):
    """Our own LDS check: a build that compiles but needs more shared memory than the target has is a failure."""
    if not amd_toolchain_available():
        pytest.skip("no Triton AMD backend")
    with_sm80_tables = dataclasses.replace(targets.get("gfx942"), tables=targets.get("sm_80").tables)
    monkeypatch.setitem(targets.TARGETS, "gfx942", with_sm80_tables)
    rows = matrix.run([matrix.Case("gfx942", "forward", 128, "bfloat16", "causal")])
    assert not rows[0].ok and "shared memory 81920 B > 65536 B" in rows[0].problems[0], _table(rows)


@needs_toolchain("sm_100")
def test_sm100_backward_dk_does_not_spill_beyond_its_list():
    """sm_100 ran the Hopper backward, whose dK spilled 224-408 B at D = 128."""
    rows = matrix.run([matrix.Case("sm_100", "dkdv", 128, dtype, "causal") for dtype in ("float16", "bfloat16")])
    assert all(row.ok for row in rows), _table(rows)
    assert not any(row.spill_bytes for row in rows), _table(rows)
    assert all("tcgen05" in row.instructions or "mma.sync" in row.instructions for row in rows), _table(rows)


def test_no_target_lists_a_spill_for_16bit_forward_or_dq_up_to_d128():
    for target in targets.TARGETS.values():
        for spill in target.known_spills:
            assert spill.spill_bytes > 0 and spill.why, spill
            assert not (spill.kernel in ("forward", "dq") and spill.dtype != "float32" and spill.head_dim <= 128), \
                (target.name, spill)


@needs_toolchain("sm_89")
def test_consumer_forward_leaves_shared_memory_headroom():
    """sm_86/sm_89/sm_120 (101,376 B): the D = 128 forward used 98,304 B, no room for a mod's captured tensor."""
    for name in ("sm_86", "sm_89", "sm_120"):
        target = targets.get(name)
        config = default_config(128, 128, torch.bfloat16, (128, 128), 4096, target=target)
        result = aot.compile_forward(config, arch=target, head_dim=128, **compile_mods())
        assert result.shared_bytes <= 0.8 * target.shared_memory and not result.spills, result
