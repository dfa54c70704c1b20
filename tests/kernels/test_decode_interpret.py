"""The split-KV decode kernel under the Triton interpreter (``backend="interpret"``, CPU tensors).

``attention()`` routes short queries (Lq <= 16) to it; every result is checked against the float64
golden result (numerics rule), against the prefill kernel (same out and LSE), across split counts,
and for determinism. Paged K/V is covered in tests/test_paged.py; here also several splits over several
sequences and heads, paged and not, with 32- and (forced) 64-bit offsets, the launch grid's limits at
serving batch sizes, and which score functions use the hardware tanh.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import triton_attn as ta
from tests.helpers.mask_cases import document_ids
from tests.helpers.numerics import assert_matches_golden, random_qkv
from tests.helpers.paged_cases import contiguous_kv, logical_mask, make_paged
from triton_attn.masks import and_masks, causal_mask, sliding_window_mask, softcap_score

pytest.importorskip("triton")

from triton_attn.kernels.attention import configs as attention_configs  # noqa: E402
from triton_attn.kernels.attention.configs import default_config  # noqa: E402
from triton_attn.kernels.attention.forward_launch import attention_forward  # noqa: E402
from triton_attn.kernels.decode import configs as decode_configs  # noqa: E402
from triton_attn.kernels.decode import launch as decode_launch  # noqa: E402
from triton_attn.kernels.decode.launch import DecodePlan, decode_attention, decode_mods, plan_decode  # noqa: E402
from triton_attn.kernels.targets import get as get_target  # noqa: E402


def at_offset(mask_mod, offset: int):
    """``mask_mod`` with the query rows ``offset`` positions later (a decode step at the end of a cache)."""
    def shifted(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx + offset, kv_idx)
    shifted.__name__ = f"{getattr(mask_mod, '__name__', 'mask')}_at_{offset}"
    return shifted


def check(q, k, v, mask_mod=None, score_mod=None, *, block_size=64, mask_heads=None, context=""):
    """attention() on the interpreter (decode route) against the golden result; returns the BlockMask."""
    q_len, kv_len = q.shape[2], k.shape[2]
    block_mask = None
    if mask_mod is not None:
        block_mask = ta.create_block_mask(mask_mod, q.shape[0], mask_heads, q_len, kv_len, BLOCK_SIZE=block_size)

    def candidate(q_, k_, v_):
        return ta.attention(q_, k_, v_, block_mask=block_mask, score_mod=score_mod, enable_gqa=True,
                            return_lse=True, backend="interpret")

    assert_matches_golden(candidate, q, k, v, mask_mod=mask_mod, score_mod=score_mod, backward=False,
                          context=context)
    return block_mask


@pytest.mark.parametrize("q_len", [1, 5, 16])
@pytest.mark.parametrize("groups", [1, 4, 8])
def test_causal_decode_step_gqa(q_len, groups):
    kv_len = 300
    q, k, v = random_qkv(2, 2 * groups, 2, q_len, kv_len, 32, dtype=torch.float16)
    check(q, k, v, at_offset(causal_mask, kv_len - q_len), context=f"Lq={q_len} groups={groups}")


@pytest.mark.parametrize("case", ["sliding", "document", "softcap", "none"])
def test_mods(case):
    kv_len, q_len = 280, 4
    q, k, v = random_qkv(2, 8, 2, q_len, kv_len, 32, dtype=torch.bfloat16)
    ids = document_ids(2, kv_len)
    mask_mod = {"sliding": at_offset(sliding_window_mask(50), kv_len - q_len),
                "document": and_masks(at_offset(causal_mask, kv_len - q_len),
                                      lambda b, h, q_idx, kv_idx: ids[b, q_idx + kv_len - q_len] == ids[b, kv_idx]),
                "softcap": at_offset(causal_mask, kv_len - q_len)}.get(case)
    score_mod = softcap_score(3.0) if case == "softcap" else None
    check(q, k, v, mask_mod, score_mod, context=case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_and_padded_head_dims(dtype):
    q, k, v = random_qkv(1, 4, 2, 3, 150, 80, 48, dtype=dtype)
    check(q, k, v, at_offset(causal_mask, 147), block_size=32, context=str(dtype))


def test_single_key_and_ragged_block():
    q, k, v = random_qkv(1, 4, 1, 1, 1, 32, dtype=torch.float16)
    check(q, k, v, context="Lkv=1")
    q, k, v = random_qkv(1, 4, 1, 2, 77, 32, dtype=torch.float16)
    check(q, k, v, at_offset(causal_mask, 75), block_size=48, context="KV_BS=48")


def test_per_head_mask_is_not_packed():
    """A mask that differs per head gets one head per program (its block lists differ per head)."""
    def every_other_head_sees_half(b, h, q_idx, kv_idx):
        return (h % 2 == 0) | (kv_idx < 100)

    q, k, v = random_qkv(1, 8, 2, 2, 260, 32, dtype=torch.float16)
    block_mask = check(q, k, v, every_other_head_sees_half, mask_heads=8)
    assert plan_decode(q, 2, 32, block_mask).heads_per_tile == 1
    full = ta.create_block_mask(causal_mask, None, None, 2, 260, BLOCK_SIZE=64)
    assert plan_decode(q, 2, 32, full).heads_per_tile == 4


def test_several_query_block_rows():
    """Query blocks smaller than Lq: each program's rows stay inside one row of mask blocks."""
    q, k, v = random_qkv(1, 8, 2, 16, 200, 32, dtype=torch.float16)
    check(q, k, v, at_offset(causal_mask, 184), block_size=(8, 64))


def test_splits_are_taken_and_agree_with_one_split():
    q, k, v = random_qkv(1, 8, 2, 1, 1000, 32, dtype=torch.float32)
    block_mask = ta.create_block_mask(at_offset(sliding_window_mask(700), 999), None, None, 1, 1000, BLOCK_SIZE=64)
    plan = plan_decode(q, 2, 32, block_mask)
    assert plan.num_splits > 1 and plan.heads_per_tile == 4
    scale = 32 ** -0.5
    runs = {splits: decode_attention(q, k, v, block_mask, score_mod=None, scale=scale, interpret=True,
                                     num_splits=splits) for splits in (1, 3, 16)}
    for splits in (3, 16):
        torch.testing.assert_close(runs[splits][0], runs[1][0], atol=2e-6, rtol=0)
        torch.testing.assert_close(runs[splits][1], runs[1][1], atol=2e-6, rtol=0)


def test_out_and_lse_equal_the_prefill_kernel_and_are_deterministic():
    q, k, v = random_qkv(1, 8, 2, 6, 300, 32, dtype=torch.float32)
    block_mask = ta.create_block_mask(at_offset(causal_mask, 294), None, None, 6, 300, BLOCK_SIZE=64)
    scale = 32 ** -0.5
    decoded = decode_attention(q, k, v, block_mask, score_mod=softcap_score(5.0), scale=scale, interpret=True)
    prefill = attention_forward(q, k, v, block_mask, score_mod=softcap_score(5.0), scale=scale, interpret=True,
                                config=default_config(32, 32, q.dtype, (64, 64), 6))
    torch.testing.assert_close(decoded[0], prefill[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(decoded[1], prefill[1], atol=1e-5, rtol=0)
    again = decode_attention(q, k, v, block_mask, score_mod=softcap_score(5.0), scale=scale, interpret=True)
    assert torch.equal(again[0], decoded[0]) and torch.equal(again[1], decoded[1])
    # attention() takes this route by itself
    routed = ta.attention(q, k, v, block_mask=block_mask, score_mod=softcap_score(5.0), enable_gqa=True,
                          return_lse=True, backend="interpret")
    assert torch.equal(routed[0], decoded[0]) and torch.equal(routed[1], decoded[1])


def test_fully_masked_rows_and_empty_splits():
    def only_sequence_zero(b, h, q_idx, kv_idx):
        return (b == 0) & (kv_idx < 20)

    q, k, v = random_qkv(2, 4, 4, 2, 400, 16, dtype=torch.float16)
    block_mask = ta.create_block_mask(only_sequence_zero, 2, None, 2, 400, BLOCK_SIZE=64)
    out, lse = decode_attention(q, k, v, block_mask, score_mod=None, scale=0.25, interpret=True, num_splits=4)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and bool((lse[1] == float("-inf")).all())
    assert torch.isfinite(out).all() and torch.isfinite(lse[0]).all()


def test_untraceable_mask_uses_the_bitmask():
    table = {(i, j) for i in range(4) for j in range(0, 200, 3)}

    def from_a_python_set(b, h, q_idx, kv_idx):
        rows, cols = torch.broadcast_tensors(q_idx, kv_idx)
        return torch.tensor([(i, j) in table for i, j in zip(rows.flatten().tolist(), cols.flatten().tolist())],
                            dtype=torch.bool).view(rows.shape)

    dense = torch.zeros(4, 200, dtype=torch.bool)
    for i, j in table:
        dense[i, j] = True

    def as_tensor(b, h, q_idx, kv_idx):
        return dense[q_idx, kv_idx]

    q, k, v = random_qkv(1, 4, 2, 4, 200, 16, dtype=torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        block_mask = ta.create_block_mask(from_a_python_set, None, None, 4, 200, BLOCK_SIZE=64)
        out, lse = ta.attention(q, k, v, block_mask=block_mask, enable_gqa=True, return_lse=True, backend="interpret")
    ref_out, ref_lse = ta.attention(q, k, v,
                                    block_mask=ta.create_block_mask(as_tensor, None, None, 4, 200, BLOCK_SIZE=64),
                                    enable_gqa=True, return_lse=True, backend="torch")
    torch.testing.assert_close(out, ref_out, atol=2e-3, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=0)


def test_gpu_check_decode_and_paged_sections_dry_run(tmp_path):
    """bench/gpu_check.py's decode and paged sections run end to end on CPU through the interpreter."""
    import csv
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check_for_decode", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--sections", "decode", "paged"]) == 0
    (written,) = tmp_path.glob("gpu_check_*.csv")
    rows = list(csv.DictReader(written.open()))
    sections = {row["section"] for row in rows}
    assert sections == {"decode_correctness", "decode_speed", "paged_correctness", "paged_speed", "paged_ratio"}
    assert all(row["ok"] == "True" for row in rows if row["section"].endswith("correctness"))
    assert {row["impl"] for row in rows if row["section"] == "decode_speed"} == {
        "triton_attn", "triton_attn_kernel", "sdpa"}
    assert any(row["impl"] == "paged_ragged" for row in rows)


# -- serving scale ----------------------------------------------------------------------------------------

def force_64bit_offsets(monkeypatch):
    """Launch with ROW_OFFSETS_64 and LAYOUT_OFFSETS_64 on (what 2**31-element problems get) at a tiny size."""
    monkeypatch.setattr(decode_launch, "needs_64bit_rows", lambda *tensors, paged: True)
    monkeypatch.setattr(decode_launch, "needs_64bit_layout", lambda layout: True)


@pytest.mark.parametrize("case", ["packed", "per_sequence_and_head", "64bit_offsets"])
def test_several_splits_over_several_sequences_and_heads(case, monkeypatch):
    """Three splits of 3 sequences x 4 query heads (GQA 2): every (split, sequence, head tile) program of the
    grid -- head tiles on axis 0, splits on axis 1 -- writes its own partials and the combine puts each row
    back in place; with a mask per sequence and head too (one head per program), and with 64-bit offsets."""
    if case == "64bit_offsets":
        force_64bit_offsets(monkeypatch)
    q, k, v = random_qkv(3, 4, 2, 2, 200, 16, dtype=torch.float16)
    if case == "per_sequence_and_head":
        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx + 198) & (((b + h) % 2 == 0) | (kv_idx < 40 + 50 * b))
        block_mask = ta.create_block_mask(mask_mod, 3, 4, 2, 200, BLOCK_SIZE=32)
    else:
        mask_mod = at_offset(causal_mask, 198)
        block_mask = ta.create_block_mask(mask_mod, None, None, 2, 200, BLOCK_SIZE=32)
    plan = plan_decode(q, 2, 16, block_mask, num_splits=3)
    assert plan.heads_per_tile == (1 if case == "per_sequence_and_head" else 2)
    assert plan.grid(block_mask.num_blocks[0], 3, 4) == (3 * 4 // plan.heads_per_tile, 3, 1)

    def candidate(q_, k_, v_):
        return decode_attention(q_, k_, v_, block_mask, score_mod=None, scale=16 ** -0.5, interpret=True,
                                num_splits=3)

    assert_matches_golden(candidate, q, k, v, mask_mod=mask_mod, backward=False, context=case)


@pytest.mark.parametrize("offsets", ["32bit", "64bit"])
def test_paged_several_splits_over_several_sequences_and_heads(offsets, monkeypatch):
    """paged_attention over 3 ragged sequences x 4 query heads (GQA 2) in 16-row pages, made to take 3 splits:
    the carried page-row offsets follow each split's run of blocks (also across a block's sub-tiles)."""
    asked = []

    def three_splits(programs, max_visits, sm_count):
        asked.append(programs)
        return 3

    monkeypatch.setattr(decode_launch, "choose_splits", three_splits)
    if offsets == "64bit":
        force_64bit_offsets(monkeypatch)
    inputs = make_paged([150, 37, 90], 2, 4, 2, 16, 16)
    key, value = contiguous_kv(inputs)

    def candidate(q_, k_, v_):
        return ta.paged_attention(q_, inputs.key_cache, inputs.value_cache, inputs.page_table, inputs.kv_lens,
                                  return_lse=True, backend="interpret")

    assert_matches_golden(candidate, inputs.query, key, value, backward=False,
                          mask_mod=logical_mask(None, inputs.kv_lens, 2), context=offsets)
    assert asked, "the paged launch did not plan its split count"


@pytest.mark.parametrize("kv_heads", [32, 8], ids=["mha", "gqa4"])
@pytest.mark.parametrize("num_splits", [1, 4, decode_configs.MAX_SPLITS])
def test_serving_batches_launch_within_the_grid_limits(kv_heads, num_splits):
    """2,048 and 4,096 sequences x 32 query heads (one program per head without GQA packing: 131,072 of them)
    fit CUDA's grid: the (row tile, head tile) programs on axis 0, the splits on axis 1."""
    block_mask = ta.create_block_mask(causal_mask, None, None, 1, 4096, BLOCK_SIZE=128)
    for batch in (2048, 4096):
        query = torch.empty(batch, 32, 1, 128, dtype=torch.bfloat16, device="meta")
        plan = plan_decode(query, kv_heads, 128, block_mask, num_splits=num_splits)
        grid = plan.grid(block_mask.num_blocks[0], batch, 32)
        assert grid == (batch * 32 // plan.heads_per_tile, num_splits, 1)
        assert grid[0] <= attention_configs.MAX_GRID_X
        assert max(grid[1:]) <= attention_configs.MAX_GRID_YZ


def test_a_grid_past_the_limits_is_a_clear_error():
    config = decode_configs.DECODE_PICKS["few_rows"]
    plan = DecodePlan(heads_per_tile=1, packed_rows=16, row_tiles=1, num_splits=4, config=config)
    with pytest.raises(ValueError, match="split the batch"):
        plan.grid(2 ** 16, 2 ** 10, 32)   # 2**31 programs on axis 0
    too_many_splits = DecodePlan(1, 16, 1, attention_configs.MAX_GRID_YZ + 1, config)
    with pytest.raises(ValueError, match="num_splits"):
        too_many_splits.grid(1, 1, 32)


def test_hardware_tanh_only_for_score_mods_compiled_for_nvidia_with_16_bit_inputs():
    """decode_mods picks the hardware tanh as the prefill launchers do (``host.fast_tanh``); without a score_mod,
    or on the interpreter, the functions (and the tuning key) are the exact ones."""
    block_mask = ta.create_block_mask(causal_mask, None, None, 1, 256, BLOCK_SIZE=128)
    softcap, sm90 = softcap_score(30.0), get_target(90)

    def key(score_mod, dtype, interpret):
        return decode_mods(block_mask, score_mod, dtype=dtype, interpret=interpret, target=sm90)[2].key

    exact = decode_mods(block_mask, softcap)[2].key
    assert key(softcap, torch.bfloat16, interpret=False) != exact
    assert key(softcap, torch.float16, interpret=False) == key(softcap, torch.bfloat16, interpret=False)
    assert key(softcap, torch.float32, interpret=False) == exact
    assert key(softcap, torch.bfloat16, interpret=True) == exact
    assert key(None, torch.bfloat16, interpret=False) == decode_mods(block_mask, None)[2].key
