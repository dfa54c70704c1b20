"""Launch limits of the prefill kernels (issue 23): any number of (batch, head) pairs, 64-bit offsets.

- CUDA takes at most 65,535 programs on grid axes 1 and 2: the forward, dQ and delta kernels launch
  B * Hq pairs and the dK/dV kernel B * Hkv, so 2,048 sequences x 32 heads did not launch. Past the
  limit the pair index is folded over axes 1 and 2 (``tiling.batch_head_axes``). The interpreter has
  no limit, so the tests below make ``tiling.MAX_GRID_YZ`` small and check every launched grid
  against it, as CUDA would, while the results still match the float64 golden result.
- Offsets past 2**31 elements: the launch picks 64-bit row offsets (also in the delta kernel now)
  and 64-bit block-list offsets from the tensors' sizes (``host.needs_64bit_rows``,
  ``host.needs_64bit_offsets``); checked on meta tensors, and through a launch with the threshold
  made small (the 64-bit paths then run, in the interpreter, on tiny inputs).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import triton_attn as ta  # noqa: E402
from tests.helpers.numerics import assert_matches_golden, random_qkv  # noqa: E402
from triton_attn.kernels import host  # noqa: E402
from triton_attn.kernels.attention import backward_launch, forward_launch, tiling  # noqa: E402
from triton_attn.kernels.attention.backward_launch import attention_backward  # noqa: E402
from triton_attn.kernels.attention.configs import KernelConfig  # noqa: E402
from triton_attn.kernels.attention.forward_launch import attention_forward  # noqa: E402
from triton_attn.kernels.host import new_softmax_stats  # noqa: E402
from triton_attn.masks import causal_mask  # noqa: E402

CUDA_GRID_YZ = 65535
META = torch.device("meta")


class InterpretedAttention(torch.autograd.Function):
    """apply(q, k, v, block_mask) -> (out, lse): the prefill forward and the Triton backward, both on the
    interpreter, called through their launchers (the kernels under test, whatever a call would route to)."""

    @staticmethod
    def forward(ctx, query, key, value, block_mask):
        stats = new_softmax_stats(query)
        out, lse = attention_forward(query, key, value, block_mask, score_mod=None, scale=query.shape[-1] ** -0.5,
                                     interpret=True, stats=stats)
        ctx.save_for_backward(query, key, value, out, lse, stats)
        ctx.block_mask = block_mask
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        query, key, value, out, lse, stats = ctx.saved_tensors
        grads = attention_backward(query, key, value, out, lse, grad_out, grad_lse, ctx.block_mask, score_mod=None,
                                   scale=query.shape[-1] ** -0.5, interpret=True, softmax_stats=stats)
        return (*grads, None)


def per_pair_window(b, h, q_idx, kv_idx):
    """Causal with a window that differs per (batch, head): a program reading another pair's layout or
    rows gets a different answer."""
    return (q_idx >= kv_idx) & (q_idx - kv_idx < 5 + 7 * b + 3 * h)


def spy_launches(monkeypatch, limit=None):
    """Record every prefill launch as (kernel name, grid, named arguments) and still run it; with ``limit``,
    refuse a grid with more than ``limit`` programs on axis 1 or 2, as CUDA refuses more than 65,535."""
    launched = []

    def make_spy(real):
        def spy(kernel, grid, named, **options):
            name = getattr(kernel, "__name__", None) or kernel.fn.__name__
            if limit is not None:
                assert all(size <= limit for size in grid[1:]), f"{name}: grid {grid} passes the limit {limit}"
            launched.append((name, tuple(grid), named))
            real(kernel, grid, named, **options)
        return spy

    monkeypatch.setattr(forward_launch, "launch", make_spy(forward_launch.launch))
    monkeypatch.setattr(backward_launch, "launch", make_spy(backward_launch.launch))
    return launched


def covered_pairs(grid) -> list:
    """The (batch, head) pair indices the programs of one tile read, ``program_id(1) + program_id(2) *
    num_programs(1)`` (``blocks.batch_head_program``), spares included."""
    rows, layers = grid[1], grid[2] if len(grid) > 2 else 1
    return [row + layer * rows for layer in range(layers) for row in range(rows)]


# -- grids ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch, q_heads, kv_heads", [(4096, 32, 8), (2048, 32, 32), (1, 65535, 65535), (7, 3, 1)])
def test_every_grid_stays_within_cuda_limits_and_covers_every_pair(batch, q_heads, kv_heads):
    """Forward / dQ (B * Hq), dK/dV (B * Hkv) and delta (B * Hq) grids: axes 1 and 2 within 65,535, every
    pair launched exactly once, fewer spare programs than layers, and the kernels told to fold exactly
    when the grid does."""
    out = torch.empty(batch, q_heads, 1000, 64, dtype=torch.bfloat16, device=META)
    grids = {
        "forward/dq": (lambda: tiling.launch_grid(1000, 8, 128, 64, batch * q_heads), batch * q_heads),
        "dkdv": (lambda: tiling.launch_grid(1000, 8, 128, 128, batch * kv_heads), batch * kv_heads),
        "preprocess": (lambda: backward_launch.preprocess_grid(out), batch * q_heads),
    }
    for name, (make_grid, pairs) in grids.items():
        grid = make_grid()
        assert len(grid) == 3 and all(1 <= size <= CUDA_GRID_YZ for size in grid[1:]), f"{name}: {grid}"
        assert grid[0] == (16 if name != "dkdv" else 8), f"{name}: {grid}"  # the tiles, unchanged on axis 0
        indices = covered_pairs(grid)
        assert sorted(indices[:pairs]) == list(range(pairs)), name
        assert len(indices) - pairs < grid[2], f"{name}: {len(indices) - pairs} spare programs in {grid}"
        folded = tiling.kernel_constexprs(head_dim=64, head_dim_v=64, dtype=torch.bfloat16, block_size=(128, 128),
                                          config=KernelConfig(64, 64, 4, 2), kv_len=1000, interpret=False,
                                          batch_heads=pairs)["FOLD_BATCH_HEADS"]
        assert folded == (grid[2] > 1), f"{name}: FOLD_BATCH_HEADS {folded} for grid {grid}"
        if name == "preprocess":
            assert backward_launch.preprocess_constexprs(out, out, has_grad_lse=False)["FOLD_BATCH_HEADS"] == folded
        assert folded == (pairs > CUDA_GRID_YZ), name


def test_pairs_past_two_axes_are_refused_with_a_clear_error():
    with pytest.raises(ValueError, match=r"batch \* heads .*batch_heads"):
        tiling.batch_head_axes(2 ** 31)


def test_folded_grid_forward_and_backward_match_golden(monkeypatch):
    """B * Hq = 8 pairs on a limit of 3: 3 x 3 programs per tile (one spare), dK/dV 4 pairs on 2 x 2; per-pair
    layouts and windows, GQA, causal tiles launched last-first: every kernel, forward and backward, within
    the limit and matching the golden result."""
    monkeypatch.setattr(tiling, "MAX_GRID_YZ", 3, raising=False)
    launched = spy_launches(monkeypatch, limit=3)
    batch, q_heads, kv_heads, length = 4, 2, 1, 40
    q, k, v = random_qkv(batch, q_heads, kv_heads, length, length + 8, 16, dtype=torch.float32)
    block_mask = ta.create_block_mask(per_pair_window, batch, q_heads, length, length + 8, BLOCK_SIZE=16)
    assert_matches_golden(lambda q_, k_, v_: InterpretedAttention.apply(q_, k_, v_, block_mask), q, k, v,
                          mask_mod=per_pair_window)
    kernels = {name: (grid, named) for name, grid, named in launched}
    assert set(kernels) == {"attention_forward_kernel", "attention_backward_preprocess",
                            "attention_backward_dkdv_kernel", "attention_backward_dq_kernel"}
    for name, (grid, named) in kernels.items():
        assert grid[1:] == ((2, 2) if name == "attention_backward_dkdv_kernel" else (3, 3)), f"{name}: {grid}"
        assert named["FOLD_BATCH_HEADS"], name
    assert kernels["attention_forward_kernel"][1]["HEAVY_TILES_LAST"]


# -- 64-bit offsets ------------------------------------------------------------------------------

def test_64_bit_offsets_chosen_from_the_tensors_sizes():
    """Block layouts: the index lists of 2,048 sequences x 32 heads x 256 x 256 blocks pass 2**31 elements
    (a broadcast layout, or fewer pairs, does not); decided on meta tensors, nothing allocated."""
    def layout(batch, heads, rows, columns):
        counts = torch.empty(batch, heads, rows, dtype=torch.int32, device=META)
        indices = torch.empty(batch, heads, rows, columns, dtype=torch.int32, device=META)
        return host.layout_arguments(counts, indices, counts, indices, META, forward_launch.FORWARD_LAYOUT, "m")

    assert host.needs_64bit_layout(layout(2048, 32, 256, 256))
    assert not host.needs_64bit_layout(layout(1, 1, 256, 256))
    assert not host.needs_64bit_layout(layout(2048, 32, 16, 16))
    # The largest offset decides: 2**31 - 1 still fits, one element more does not; empty never needs it.
    assert not host.needs_64bit_offsets(torch.empty(2 ** 31, dtype=torch.int32, device=META))
    assert host.needs_64bit_offsets(torch.empty(2 ** 31 + 1, dtype=torch.int32, device=META))
    assert not host.needs_64bit_offsets(torch.empty(0, 2 ** 40, dtype=torch.int32, device=META), None)
    # Strides count, not sizes: every other element of a wider tensor.
    assert host.needs_64bit_offsets(torch.empty(2 ** 30 + 1, 2, dtype=torch.int8, device=META)[:, 0])


def test_launch_sets_64_bit_flags_from_the_tensor_sizes(monkeypatch):
    """With the threshold made small, a tiny call crosses it exactly where a huge one would: dO as a
    [B, S, H, D] view (row stride H * D) needs 64-bit rows in the delta, dQ and dK/dV kernels but not
    the forward; a per-(batch, head) layout needs 64-bit block-list offsets, a broadcast one does not.
    The 64-bit paths still match the golden result."""
    batch, heads, length, dim = 2, 2, 40, 16
    # Contiguous q/k/v/out rows reach (40 - 1) * 16 + 15 = 639; the transposed dO's (40 - 1) * 32 + 15 = 1263;
    # the per-pair index lists [2, 2, 3, 3] reach 35, the broadcast ones [1, 1, 3, 3] 8.
    monkeypatch.setattr(host, "INT32_LIMIT", 1000)
    launched = spy_launches(monkeypatch)
    q, k, v = random_qkv(batch, heads, heads, length, length, dim, dtype=torch.float32)
    grad_out = torch.randn(batch, length, heads, dim).transpose(1, 2)
    block_mask = ta.create_block_mask(per_pair_window, batch, heads, length, length, BLOCK_SIZE=16)
    assert_matches_golden(lambda q_, k_, v_: InterpretedAttention.apply(q_, k_, v_, block_mask), q, k, v,
                          mask_mod=per_pair_window, grad_out=grad_out)
    flags = {name: (named["ROW_OFFSETS_64"], named.get("LAYOUT_OFFSETS_64")) for name, _, named in launched}
    assert flags == {"attention_forward_kernel": (False, False), "attention_backward_preprocess": (True, None),
                     "attention_backward_dkdv_kernel": (True, False), "attention_backward_dq_kernel": (True, False)}

    monkeypatch.setattr(host, "INT32_LIMIT", 30)  # now the per-pair index lists cross it, and every row
    launched.clear()
    assert_matches_golden(lambda q_, k_, v_: InterpretedAttention.apply(q_, k_, v_, block_mask), q, k, v,
                          mask_mod=per_pair_window, grad_out=grad_out)
    assert all(named["ROW_OFFSETS_64"] for _, _, named in launched)
    assert all(named["LAYOUT_OFFSETS_64"] for name, _, named in launched if name != "attention_backward_preprocess")

    shared = ta.create_block_mask(causal_mask, None, None, length, length, BLOCK_SIZE=16)  # [1, 1, 3, 3]
    launched.clear()
    assert_matches_golden(lambda q_, k_, v_: InterpretedAttention.apply(q_, k_, v_, shared), q, k, v,
                          mask_mod=causal_mask, grad_out=grad_out)
    assert not any(named["LAYOUT_OFFSETS_64"] for name, _, named in launched
                   if name != "attention_backward_preprocess")


# -- the folded kernels, compiled ----------------------------------------------------------------

def test_folded_kernels_compile_for_sm90_at_no_register_cost(monkeypatch):
    """Every folded kernel reads grid axis 2 (a plain one does not) and costs no more registers, without
    spills (bf16, D = 64, causal). The example builds launch 16 query-head pairs and 4 key-head pairs: a
    limit of 5 folds the forward, dQ and delta kernels, 3 the dK/dV kernel."""
    from tests.helpers.toolchain import nvidia_toolchain_available

    if not nvidia_toolchain_available(90):
        pytest.skip("Triton's NVIDIA backend is not installed")
    from triton_attn.kernels.attention import aot
    from triton_attn.kernels.attention.configs import default_backward_config, default_config
    from triton_attn.kernels.targets import get as get_target
    from triton_attn.masks.tracing import trace_mask_mod

    mask = trace_mask_mod(causal_mask)
    forward_config = default_config(64, 64, torch.bfloat16, (128, 128), 4096)
    backward_config = default_backward_config(64, 64, torch.bfloat16, (128, 128), 4096, 4096, target=get_target(90))
    assert not backward_config.split_dkdv

    def build(dkdv_limit: int, limit: int) -> dict:
        monkeypatch.setattr(tiling, "MAX_GRID_YZ", dkdv_limit)
        results = aot.compile_backward(backward_config, arch=90, mask=mask, head_dim=64, only="dkdv")
        monkeypatch.setattr(tiling, "MAX_GRID_YZ", limit)
        results["dq"] = aot.compile_backward(backward_config, arch=90, mask=mask, head_dim=64, only="dq")["dq"]
        results["forward"] = aot.compile_forward(forward_config, arch=90, mask=mask, head_dim=64)
        results["preprocess"] = aot.compile_preprocess(arch=90, head_dim_v=64)
        return results

    plain, folded = build(CUDA_GRID_YZ, CUDA_GRID_YZ), build(3, 5)
    for name, result in folded.items():
        assert "get_program_id z" in result.ttgir and "get_program_id z" not in plain[name].ttgir, name
        assert not result.spills, str(result)
        assert result.registers <= plain[name].registers, f"{result} vs {plain[name]}"
