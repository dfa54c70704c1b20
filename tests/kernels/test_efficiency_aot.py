"""Hopper efficiency of the attention kernels, proven from the compiler's own output (no GPU needed).

Each test compiles a kernel ahead of time for sm_90 (D = 128, bf16 unless said otherwise) and reads
its TTGIR / PTX / ptxas report with ``kernels/tuning/compiled.py``:

- the forward's two block loops (partial and full blocks) and the backward's loops keep
  ``num_stages - 1`` tile loads in flight for kv_len a multiple of the block size (shared-memory
  rings of ``num_stages`` buffers, ``async_wait`` with a nonzero count);
- the Hopper backward tiles use wgmma with N >= 64 for every product, without spills;
- the default configs do not spill;
- row offsets are 64-bit exactly when the launch needs them (the delta kernel's too), block-list
  offsets exactly when the layout needs them, and captured-tensor index products always are;
- a softcap score_mod uses the hardware ``tanh.approx.f32`` for 16-bit inputs;
- the softmax scales each score once, in one FMA (the row max is taken on raw scores).
"""

from __future__ import annotations

import functools
import inspect

import pytest
import torch

from tests.helpers.toolchain import nvidia_toolchain_available

pytest.importorskip("triton")

from triton_attn.kernels.attention import aot, blocks  # noqa: E402
from triton_attn.kernels.attention.configs import (  # noqa: E402
    HOPPER_BACKWARD_CONFIGS,
    default_backward_config,
    default_config,  # noqa: E402
)
from triton_attn.kernels.host import needs_64bit_rows  # noqa: E402
from triton_attn.kernels.jit import functions  # noqa: E402
from triton_attn.kernels.targets import get as get_target  # noqa: E402
from triton_attn.kernels.tuning.compiled import (  # noqa: E402
    pipelined_loops,
    ptx_instruction_count,
    scalar_products,
    wgmma_shapes,
    wide_row_products,
)
from triton_attn.masks import causal_mask, softcap_score  # noqa: E402
from triton_attn.masks.tracing import trace_mask_mod, trace_score_mod  # noqa: E402

pytestmark = pytest.mark.skipif(not nvidia_toolchain_available(90), reason="Triton's NVIDIA backend is not installed")

HOPPER = 90
LONG = 2_200_000  # tokens: L x row stride passes 2**31 in the example builds' [B, L, 8, 128] query view
# Tokens (a multiple of the block size) at which per-(batch, head) block lists [2, 8, 17000, 17000] pass 2**31
# elements, while contiguous rows (L x 128) stay below it.
LAYOUT_LONG = 17_000 * 128


def _forward(**kwargs):
    config = default_config(128, 128, torch.bfloat16, (128, 128), 4096)
    return config, aot.compile_forward(config, arch=HOPPER, **kwargs)


def _assert_pipelined(result, num_stages: int, expected_loops: int = 2, every_ring: bool = True) -> None:
    loops = pipelined_loops(result.ttgir)
    assert len(loops) == expected_loops, f"{result}: {[str(loop) for loop in loops]}"
    for loop in loops:
        rings = loop.buffers()
        assert rings, f"{result}: no tile ring in {loop}"
        deepest = max(rings)
        assert deepest == num_stages, f"{result}: {loop} should hold {num_stages} buffers"
        if every_ring:
            assert min(rings) == num_stages, f"{result}: {loop}"
        else:
            assert min(rings) >= 2, f"{result}: a tile load is not pipelined at all in {loop}"
        # num = 0 at the top of every step would mean nothing stays in flight while it computes.
        assert loop.waits and min(loop.waits) > 0, f"{result}: {loop}"


def test_forward_block_loops_keep_num_stages_minus_one_loads_in_flight():
    """Partial-block and full-block loops alike: K and V rings of num_stages buffers (kv_len % 128 == 0)."""
    config, result = _forward(mask=trace_mask_mod(causal_mask), kv_len=4096)
    assert config.num_stages >= 3
    _assert_pipelined(result, config.num_stages)
    for loop in pipelined_loops(result.ttgir):
        assert loop.loads_in_flight() == config.num_stages - 1, str(loop)


def test_forward_without_partial_blocks_is_pipelined_too():
    config, result = _forward(kv_len=4096)  # no mask: the full-block loop is the only one that runs
    _assert_pipelined(result, config.num_stages)


@functools.lru_cache(maxsize=None)
def _hopper_backward(head_dim: int):
    """The default sm_90 bf16 backward for ``head_dim`` under a causal mask (kv_len = 4096, a multiple of
    the block size), compiled once for the tests below: (config, {kernel name: AotResult})."""
    config = default_backward_config(head_dim, head_dim, torch.bfloat16, (128, 128), 4096, 4096,
                                     target=get_target(HOPPER))
    return config, aot.compile_backward(config, arch=HOPPER, mask=trace_mask_mod(causal_mask), head_dim=head_dim,
                                        q_len=4096, kv_len=4096)


def test_backward_loops_keep_loads_in_flight():
    """dQ: K/V rings of num_stages; dK/dV (both launches of the split head_dim 128 default): Q, dO rings
    of num_stages, so num_stages - 1 query tiles in flight."""
    config, results = _hopper_backward(128)
    assert config.split_dkdv and set(results) == {"dv", "dk", "dq"}
    for name, result in results.items():
        stages = config.dq.num_stages if name == "dq" else config.dkdv.num_stages
        assert stages >= 3
        _assert_pipelined(result, stages)
        for loop in pipelined_loops(result.ttgir):
            assert loop.loads_in_flight() == stages - 1, f"{name}: {loop}"


@pytest.mark.parametrize("head_dim", [64, 128])
def test_hopper_backward_tiles_use_wide_wgmma_without_spills(head_dim):
    """Every product of every backward kernel on wgmma N >= 64 per warpgroup: dQ on 128 query rows x 64 keys,
    dK/dV on 128 keys x 64 query rows with the scores computed keys first (the old 128 x 32 dK/dV step
    compiled its K Q^T and V dO^T to m64n32)."""
    config, results = _hopper_backward(head_dim)
    for name, result in results.items():
        assert not result.spills, str(result)
        assert result.shared_bytes <= 232448, str(result)
        shapes = wgmma_shapes(result.ptx)
        assert shapes and min(n for _, n, _ in shapes) >= 64, f"{result}: {dict(shapes)}"
    if head_dim == 128:
        assert max(n for _, n, _ in wgmma_shapes(results["dk"].ptx)) == 128  # the dK product runs on N = D


@pytest.mark.parametrize("head_dim", [64, 128])
def test_default_forward_configs_do_not_spill_on_sm90(head_dim):
    config = default_config(head_dim, head_dim, torch.bfloat16, (128, 128), 4096)
    result = aot.compile_forward(config, arch=HOPPER, mask=trace_mask_mod(causal_mask), head_dim=head_dim)
    assert not result.spills, str(result)
    assert result.ptx_has_wgmma, str(result)


def test_row_offsets_are_64_bit_exactly_when_the_launch_needs_them():
    meta = torch.device("meta")
    # A transformers [B, S, H, D] view: row stride H * D = 4096 elements; 2**31 / 4096 = 524288 rows.
    long_view = torch.empty(1, 600_000, 32, 128, dtype=torch.bfloat16, device=meta).transpose(1, 2)
    short_view = torch.empty(1, 4096, 32, 128, dtype=torch.bfloat16, device=meta).transpose(1, 2)
    assert needs_64bit_rows(long_view) and not needs_64bit_rows(short_view)

    # The example build has 8 query heads: row stride 8 * 128 = 1024 elements, 2**31 at 2M rows.
    mask = trace_mask_mod(causal_mask)
    config = default_config(128, 128, torch.bfloat16, (128, 128), 4096)
    wide = aot.compile_forward(config, arch=HOPPER, mask=mask, q_len=LONG, kv_len=LONG, transposed=True)
    narrow = aot.compile_forward(config, arch=HOPPER, mask=mask, q_len=4096, kv_len=4096, transposed=True)
    assert wide_row_products(wide.ttgir)[64] > 0, f"no 64-bit row products: {wide}"
    assert wide_row_products(narrow.ttgir)[64] == 0, "64-bit row products where 32 bits suffice"
    assert not wide.spills, str(wide)

    backward = aot.compile_backward(HOPPER_BACKWARD_CONFIGS[128], arch=HOPPER, mask=mask, q_len=LONG, kv_len=LONG,
                                    transposed=True)
    for name, result in backward.items():
        assert wide_row_products(result.ttgir)[64] > 0, f"{name}: no 64-bit row products: {result}"


def test_delta_row_offsets_are_64_bit_exactly_when_the_launch_needs_them():
    """The delta kernel reads dO, through transformers a [B, S, H, D] view of row stride H * D: its row
    offsets pass 2**31 at 2**31 / (8 * 128) = 2M tokens in the example build (524k at 32 heads x 128)."""
    wide = aot.compile_preprocess(arch=HOPPER, q_len=LONG, transposed=True)
    assert wide_row_products(wide.ttgir)[64] > 0, f"no 64-bit row products: {wide}"
    assert not wide.spills, str(wide)
    for narrow in (aot.compile_preprocess(arch=HOPPER, q_len=LONG),            # contiguous: L x 128 fits
                   aot.compile_preprocess(arch=HOPPER, q_len=4096, transposed=True)):
        products = wide_row_products(narrow.ttgir)
        assert products[64] == 0 and products[32] > 0, f"64-bit row products where 32 bits suffice: {products}"


def _layout_products(result):
    """Width -> count of the scalar products computed in ``blocks.layout_offsets`` (block count and block
    list offsets of one layout row) in ``result``'s TTGIR."""
    source, start = inspect.getsourcelines(blocks.layout_offsets.fn)
    return scalar_products(result.ttgir, "attention/blocks.py", range(start, start + len(source)))


def test_block_list_offsets_are_64_bit_exactly_when_the_layout_needs_them():
    """``batch * stride_b + head * stride_h + row * stride_row`` into the [B, H, NQ, NKV] block lists passes
    2**31 with many (batch, head) pairs and blocks (2,048 sequences x 32 heads at 32k tokens): 64-bit in
    every kernel when a layout tensor has 2**31 elements, 32-bit otherwise (same lengths, broadcast layout)."""
    mask = trace_mask_mod(causal_mask)
    config = default_config(128, 128, torch.bfloat16, (128, 128), 4096)
    lengths = dict(q_len=LAYOUT_LONG, kv_len=LAYOUT_LONG)
    wide = {"forward": aot.compile_forward(config, arch=HOPPER, mask=mask, per_head_layout=True, **lengths)}
    narrow = {"forward": aot.compile_forward(config, arch=HOPPER, mask=mask, **lengths)}
    backward_config = default_backward_config(64, 64, torch.bfloat16, (128, 128), 4096, 4096,
                                              target=get_target(HOPPER))
    wide.update(aot.compile_backward(backward_config, arch=HOPPER, mask=mask, head_dim=64, per_head_layout=True,
                                     **lengths))
    narrow.update(aot.compile_backward(backward_config, arch=HOPPER, mask=mask, head_dim=64, **lengths))
    assert set(wide) == {"forward", "dkdv", "dq"}
    for name, result in wide.items():
        products = _layout_products(result)
        assert products[64] > 0 and products[32] == 0, f"{name}: {products} in {result}"
        assert not result.spills, str(result)
        products = _layout_products(narrow[name])
        assert products[32] > 0 and products[64] == 0, f"{name}: 64-bit block-list products where 32 bits suffice"


def test_captured_tensor_index_products_are_64_bit():
    """``bias[h, q_idx, kv_idx]`` on an [H, L, L] table passes 2**31 elements at L ~ 8k."""
    table = torch.randn(2, 64, 64)

    def table_bias(score, b, h, q_idx, kv_idx):
        return score + table[h, q_idx, kv_idx]

    source = functions.score_source(trace_score_mod(table_bias))
    assert ".to(tl.int64) * cap0_stride1" in source and ".to(tl.int64) * cap0_stride2" in source, source
    config = default_config(128, 128, torch.bfloat16, (128, 128), 4096)
    result = aot.compile_forward(config, arch=HOPPER, mask=trace_mask_mod(causal_mask),
                                 score=trace_score_mod(table_bias))
    assert wide_row_products(result.ttgir)[64] > 0, str(result)


def test_softcap_uses_the_hardware_tanh_for_16_bit_inputs():
    config = default_config(128, 128, torch.bfloat16, (128, 128), 4096)
    plain = aot.compile_forward(config, arch=HOPPER, mask=trace_mask_mod(causal_mask))
    capped = aot.compile_forward(config, arch=HOPPER, mask=trace_mask_mod(causal_mask),
                                 score=trace_score_mod(softcap_score(30.0)))
    assert ptx_instruction_count(capped.ptx, "tanh.approx.f32") > 0
    # The exact form costs a division per score; the hardware tanh adds none.
    assert ptx_instruction_count(capped.ptx, "div.full.f32") == ptx_instruction_count(plain.ptx, "div.full.f32")
    assert not capped.spills, str(capped)


def test_one_fma_per_score_and_no_separate_scaling_multiply():
    """The row max is taken on the raw scores, so the scale enters once, inside the exp2's FMA: per
    thread and step, BLOCK_M * BLOCK_N / threads FMAs and as many ex2; the remaining multiplies are the
    accumulator's rescale (BLOCK_M * D / threads per step) plus a few per row. (Before: one extra
    multiply per score, qk * scale kept for the max next to the fused copy.)"""
    config, result = _forward(kv_len=4096)
    threads = 32 * config.num_warps
    scores_per_step = config.BLOCK_M * config.BLOCK_N // threads
    rescale_per_step = config.BLOCK_M * 128 // threads
    loops = len(pipelined_loops(result.ttgir))
    assert ptx_instruction_count(result.ptx, "fma.rn.f32") >= loops * scores_per_step
    assert ptx_instruction_count(result.ptx, "ex2.approx.ftz.f32") <= loops * (scores_per_step + 4)
    assert ptx_instruction_count(result.ptx, "mul.f32") <= loops * (rescale_per_step + 16), result.ptx.count("mul.f32")
