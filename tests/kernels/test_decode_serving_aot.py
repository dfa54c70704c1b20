"""The decode kernel at serving scale, proven from its compiled output for sm_80 / sm_90 (no GPU needed).

- Its block loops keep K/V loads in flight, paged and contiguous: the next step's block index (and,
  paged, its keys' row offsets from the page table) is loaded one step ahead, so the pipeliner sees
  direct K/V loads -- shared-memory rings of ``num_stages - 1`` buffers (``mma.sync`` operands leave
  the ring once in registers) and ``async_wait`` with a nonzero count. (At ``num_stages`` 2 Triton keeps
  one buffer for ``mma.sync`` operands whatever the loads: the prefill forward's loops look the same.)
- A softcap score_mod uses the hardware ``tanh.approx.f32`` for 16-bit inputs, not for float32.
- Per-row / per-key offsets and block-list offsets are 64-bit exactly when the launch needs them (a
  long paged query, a big page pool, a long contiguous cache; a block layout of 2**31 entries).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.helpers.toolchain import nvidia_toolchain_available

pytest.importorskip("triton")

from triton_attn.kernels.decode.aot import compile_decode  # noqa: E402
from triton_attn.kernels.decode.configs import DECODE_CONFIGS, DECODE_PICKS, needs_64bit_rows  # noqa: E402
from triton_attn.kernels.host import layout_arguments, needs_64bit_layout  # noqa: E402
from triton_attn.kernels.tuning.compiled import (  # noqa: E402
    pipelined_loops,
    ptx_instruction_count,
    scalar_products,
    tensor_products,
)
from triton_attn.masks import softcap_score  # noqa: E402
from triton_attn.masks.block_mask import BlockMask  # noqa: E402

pytestmark = pytest.mark.skipif(not nvidia_toolchain_available(80, 90),
                                reason="Triton's NVIDIA backend is not installed")

FEW_ROWS = DECODE_PICKS["few_rows"]   # m16_n64_w4: MHA decode, 16-bit, D <= 128


def causal_at_end(b, h, q_idx, kv_idx):
    return q_idx + 4095 >= kv_idx


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("arch,num_stages", [(80, 3), (90, 3), (90, 4)])
def test_decode_loops_keep_kv_loads_in_flight(arch, num_stages, paged):
    """Both block loops (partial blocks, then full ones): K/V rings of num_stages - 1 buffers, a nonzero
    async_wait, and only the K and V tiles copied asynchronously. (Before: the index, and the pages, loaded
    inside the step made K/V indirect loads -- rings of one buffer and async_wait 0, the index and page
    vectors copied through shared memory too.)"""
    result = compile_decode(replace(FEW_ROWS, num_stages=num_stages), arch=arch, dtype=torch.bfloat16,
                            head_dim=128, q_heads=8, kv_heads=8, q_len=1, paged=paged, mask_mod=causal_at_end)
    loops = pipelined_loops(result.ttgir)
    assert len(loops) == 2, f"{result}: {[str(loop) for loop in loops]}"
    for loop in loops:
        assert loop.copies == 2, f"{result}: {loop}"
        assert loop.buffers() and min(loop.buffers()) >= num_stages - 1, f"{result}: {loop}"
        assert loop.waits and min(loop.waits) >= 1, f"{result}: {loop}"
    assert not result.spills, str(result)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("pick,head_dim,q_heads,kv_heads", [("few_rows", 128, 8, 8), ("packed", 128, 64, 2),
                                                            ("wide_packed", 256, 64, 2)])
def test_the_default_decode_picks_keep_kv_loads_in_flight(arch, pick, head_dim, q_heads, kv_heads):
    """The 16-bit picks a paged decode launches with by default (the target's table) are pipelined: at two
    stages no pick was (one buffer, async_wait 0: each K/V copy waited for before its dot)."""
    from triton_attn.kernels import targets

    config = targets.get(f"sm_{arch}").tables.decode[pick]
    result = compile_decode(config, arch=arch, dtype=torch.bfloat16, head_dim=head_dim, q_heads=q_heads,
                            kv_heads=kv_heads, q_len=1, paged=True, mask_mod=causal_at_end)
    loops = pipelined_loops(result.ttgir)
    assert len(loops) == 2, f"{result}: {[str(loop) for loop in loops]}"
    for loop in loops:
        assert loop.buffers() and min(loop.buffers()) >= 2, f"{pick} {config.name}: {loop}"
        assert loop.waits and min(loop.waits) >= 1, f"{pick} {config.name}: {loop}"
    assert not result.spills, str(result)


def test_softcap_decode_uses_the_hardware_tanh_for_16_bit_inputs_only():
    softcap = softcap_score(30.0)
    capped = compile_decode(FEW_ROWS, arch=90, dtype=torch.bfloat16, head_dim=128, q_heads=8, kv_heads=8,
                            mask_mod=causal_at_end, score_mod=softcap)
    assert ptx_instruction_count(capped.ptx, "tanh.approx.f32") > 0, str(capped)
    assert not capped.spills, str(capped)
    exact = compile_decode(DECODE_PICKS["wide"], arch=90, dtype=torch.float32, head_dim=128, q_heads=8, kv_heads=8,
                           mask_mod=causal_at_end, score_mod=softcap)
    assert ptx_instruction_count(exact.ptx, "tanh.approx.f32") == 0, str(exact)


def test_row_offsets_are_64_bit_exactly_when_the_launch_needs_them():
    """32 query heads x D = 128: a sequence's rows pass 2**31 elements at 524,288 query rows; 8 KV heads x
    16-row pages: the pool at 131,072 pages (2.1M tokens); a contiguous (sequence, KV head) at 16.8M keys."""
    shapes = dict(arch=90, dtype=torch.bfloat16, head_dim=128, q_heads=32, kv_heads=8)
    narrow = {"contiguous": compile_decode(FEW_ROWS, q_len=1, kv_len=4096, **shapes),
              "paged": compile_decode(FEW_ROWS, q_len=1, kv_len=4096, paged=True, **shapes)}
    for name, result in narrow.items():
        assert tensor_products(result.ttgir)[64] == 0, f"{name}: 64-bit row products where 32 bits suffice"
    wide = {"long paged query": compile_decode(FEW_ROWS, q_len=600_000, kv_len=4096, paged=True, num_splits=1,
                                               **shapes),
            "big page pool": compile_decode(FEW_ROWS, q_len=1, kv_len=2_200_000, paged=True, **shapes),
            "long contiguous cache": compile_decode(FEW_ROWS, q_len=1, kv_len=17_000_000, **shapes)}
    for name, result in wide.items():
        assert tensor_products(result.ttgir)[64] > 0, f"{name}: no 64-bit row products: {result}"
        assert not result.spills, f"{name}: {result}"

    meta = dict(device="meta", dtype=torch.bfloat16)
    query, out = torch.empty(1, 32, 600_000, 128, **meta), torch.empty(1, 32, 600_000, 128, **meta)
    small_query = torch.empty(1, 32, 1, 128, **meta)
    pool = torch.empty(140_000, 8, 16, 128, **meta)
    cache = torch.empty(1, 8, 17_000_000, 128, **meta)
    small_cache = torch.empty(512, 8, 4096, 128, **meta)  # 2**31 elements in all, 2**19 per (sequence, head)
    assert needs_64bit_rows(query, out, small_cache, small_cache, None, paged=False)
    assert needs_64bit_rows(small_query, small_query, pool, pool, None, paged=True)
    assert needs_64bit_rows(small_query, small_query, cache, cache, None, paged=False)
    assert not needs_64bit_rows(small_query, small_query, small_cache, small_cache, None, paged=False)


def meta_block_mask(batch: int, kv_blocks: int) -> BlockMask:
    """A one-row BlockMask per sequence over ``kv_blocks`` blocks of 128, on meta tensors (shapes only)."""
    ints = dict(device="meta", dtype=torch.int32)
    rows = dict(kv_num_blocks=torch.empty(batch, 1, 1, **ints), kv_indices=torch.empty(batch, 1, 1, kv_blocks, **ints))
    columns = dict(q_num_blocks=torch.empty(batch, 1, kv_blocks, **ints),
                   q_indices=torch.empty(batch, 1, kv_blocks, 1, **ints))
    return BlockMask(**rows, **{f"full_{name}": tensor for name, tensor in rows.items()}, **columns,
                     **{f"full_{name}": tensor for name, tensor in columns.items()}, BLOCK_SIZE=(128, 128),
                     seq_lengths=(1, kv_blocks * 128), mask_mod=None)


def test_block_list_offsets_are_64_bit_exactly_when_the_layout_needs_them():
    """4,096 sequences x 2**20 KV blocks (2**32 index entries): ``batch * stride + row * stride`` of the block
    lists in 64 bits; 4 sequences x 32 blocks: in 32."""
    big, small = meta_block_mask(4096, 2 ** 20), meta_block_mask(4, 32)

    def layout(mask):
        return layout_arguments(mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices,
                                mask.kv_num_blocks.device, ("a", "b", "c", "d"), "m")

    assert needs_64bit_layout(layout(big)) and not needs_64bit_layout(layout(small))
    shapes = dict(arch=90, dtype=torch.bfloat16, head_dim=128, q_heads=32, kv_heads=8, q_len=1, kv_len=4096)
    wide = compile_decode(FEW_ROWS, batch=4096, block_mask=big, **shapes)
    narrow = compile_decode(FEW_ROWS, batch=4, block_mask=small, **shapes)
    # The block-list offsets are computed by attention/blocks.py's layout_offsets.
    assert scalar_products(wide.ttgir, file="attention/blocks.py")[64] > 0, str(wide)
    assert scalar_products(narrow.ttgir, file="attention/blocks.py")[64] == 0, str(narrow)
    assert tensor_products(wide.ttgir)[64] == 0, "the block lists alone need no 64-bit row products"
    assert not wide.spills, str(wide)


def test_every_decode_config_still_fits_with_64_bit_offsets():
    """The widest specialization (64-bit rows and block lists, paged, split) of each table entry fits the
    shared memory it had and stays within the registers (no new spills for the main configs)."""
    big = meta_block_mask(4096, 2 ** 20)
    for config in DECODE_CONFIGS[:2]:
        groups = 4 if config.BLOCK_M > 16 else 1
        result = compile_decode(config, arch=90, dtype=torch.bfloat16, head_dim=128, q_heads=8 * groups, kv_heads=8,
                                q_len=1 if groups == 1 else 16, kv_len=2_200_000, paged=True, batch=4096,
                                block_mask=big)
        assert tensor_products(result.ttgir)[64] > 0, str(result)
        assert not result.spills, str(result)
