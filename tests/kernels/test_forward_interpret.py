"""The Triton forward kernel under the Triton interpreter (``backend="interpret"``, CPU tensors).

Every result is checked against the float64 golden result under the numerics rule
(``tests/helpers/numerics.py``). Shapes stay small (the interpreter runs each program in numpy).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import triton_attn as ta
from tests.helpers.mask_cases import composed_masks, library_mask_cases
from tests.helpers.numerics import assert_matches_golden, random_qkv
from triton_attn.kernels.attention.fallback import UntraceableMaskWarning
from triton_attn.masks import (
    alibi_score,
    and_masks,
    causal_mask,
    chunked_mask,
    padding_mask,
    sliding_window_mask,
    softcap_score,
)

pytest.importorskip("triton")


def check(q, k, v, *, mask_mod=None, score_mod=None, block_size=64, mask_batch=None, mask_heads=None,
          scale=None, backward=False, context=""):
    """Build the BlockMask, run the interpreted kernel, and compare with the golden result."""
    q_len, kv_len = q.shape[2], k.shape[2]
    block_mask = None
    if mask_mod is not None:
        block_mask = ta.create_block_mask(mask_mod, mask_batch, mask_heads, q_len, kv_len, BLOCK_SIZE=block_size)
    enable_gqa = q.shape[1] != k.shape[1]

    def candidate(q_, k_, v_):
        return ta.attention(q_, k_, v_, block_mask=block_mask, score_mod=score_mod, scale=scale,
                            enable_gqa=enable_gqa, return_lse=True, backend="interpret")

    return assert_matches_golden(candidate, q, k, v, mask_mod=mask_mod, score_mod=score_mod, scale=scale,
                                 backward=backward, context=context)


@pytest.mark.parametrize("name", list(library_mask_cases(2, 8)))
def test_every_library_mask(name):
    torch.manual_seed(1)
    length = 150
    mask_mod = library_mask_cases(2, length)[name]
    q, k, v = random_qkv(2, 2, 1, length, length, 32, dtype=torch.float16)
    check(q, k, v, mask_mod=mask_mod, mask_batch=2, block_size=64, context=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_odd_lengths_lq_ne_lkv(dtype):
    q, k, v = random_qkv(1, 2, 2, 77, 131, 64, dtype=dtype)
    check(q, k, v, mask_mod=causal_mask, block_size=32, context=str(dtype))


@pytest.mark.parametrize("head_dim,value_dim", [(16, 16), (80, 80), (96, 48), (40, 72), (128, 64)])
def test_head_dims(head_dim, value_dim):
    q, k, v = random_qkv(1, 2, 1, 70, 90, head_dim, value_dim, dtype=torch.float16)
    check(q, k, v, mask_mod=sliding_window_mask(30), block_size=32, context=f"D={head_dim} Dv={value_dim}")


def test_gqa_and_custom_scale():
    q, k, v = random_qkv(2, 6, 2, 64, 96, 32, dtype=torch.bfloat16)
    check(q, k, v, mask_mod=causal_mask, block_size=32, scale=0.37)


def test_no_mask_and_strided_inputs():
    q, k, v = random_qkv(2, 2, 2, 60, 50, 32, dtype=torch.float32, layout="transposed")
    check(q, k, v)


def _relative_bias_table(length: int) -> torch.Tensor:
    return torch.randn(2 * length - 1)


@pytest.mark.parametrize("kind", ["softcap", "alibi", "relative_bias", "per_head_bias"])
def test_score_mods(kind):
    length = 96
    if kind == "softcap":
        score_mod = softcap_score(2.0)
    elif kind == "alibi":
        score_mod = alibi_score(4)
    elif kind == "relative_bias":
        table = _relative_bias_table(length)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + table[q_idx - kv_idx + length - 1]
    else:
        head_bias = torch.randn(4, length)

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where(kv_idx > q_idx - 8, score + head_bias[h, kv_idx], score * 0.5)
    q, k, v = random_qkv(1, 4, 4, length, length, 32, dtype=torch.float32)
    check(q, k, v, mask_mod=causal_mask, score_mod=score_mod, block_size=32, context=kind)


def test_fully_masked_rows_give_zero_and_minus_inf():
    def every_third_row_empty(b, h, q_idx, kv_idx):
        return (q_idx % 3 != 0) & (kv_idx <= q_idx)

    q, k, v = random_qkv(1, 2, 2, 70, 70, 32, dtype=torch.float16)
    block_mask = ta.create_block_mask(every_third_row_empty, None, None, 70, 70, BLOCK_SIZE=32)
    out, lse = ta.attention(q, k, v, block_mask=block_mask, return_lse=True, backend="interpret")
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert (out[:, :, ::3] == 0).all()
    assert torch.isinf(lse[:, :, ::3]).all() and (lse[:, :, ::3] < 0).all()
    check(q, k, v, mask_mod=every_third_row_empty, block_size=32)


def test_everything_masked_with_score_mod():
    def nothing(b, h, q_idx, kv_idx):
        return kv_idx > q_idx + 1000

    q, k, v = random_qkv(1, 1, 1, 40, 40, 16, dtype=torch.float32)
    block_mask = ta.create_block_mask(nothing, None, None, 40, 40, BLOCK_SIZE=16)
    out, lse = ta.attention(q, k, v, block_mask=block_mask, score_mod=softcap_score(5.0), return_lse=True,
                            backend="interpret")
    assert (out == 0).all() and torch.isinf(lse).all()


def test_decode_single_query():
    keep = torch.ones(2, 200, dtype=torch.bool)
    keep[1, 150:] = False
    q, k, v = random_qkv(2, 4, 2, 1, 200, 64, dtype=torch.bfloat16)
    check(q, k, v, mask_mod=padding_mask(keep), mask_batch=2, block_size=128)


@pytest.mark.parametrize("block_size", [16, (16, 64), (64, 16), (128, 32), 256, (24, 40), (48, 48)])
def test_block_sizes(block_size):
    q, k, v = random_qkv(1, 2, 1, 100, 140, 32, dtype=torch.float16)
    check(q, k, v, mask_mod=and_masks(causal_mask, chunked_mask(40)), block_size=block_size,
          context=str(block_size))


def test_per_head_layout_and_broadcast():
    def head_dependent(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx >= 0) & (q_idx - kv_idx < 10 + 20 * h + 7 * b)

    q, k, v = random_qkv(2, 3, 3, 90, 90, 32, dtype=torch.float32)
    check(q, k, v, mask_mod=head_dependent, mask_batch=2, mask_heads=3, block_size=32)


def test_backward_through_attention_matches_golden():
    q, k, v = random_qkv(1, 2, 1, 40, 48, 16, dtype=torch.float32)
    check(q, k, v, mask_mod=causal_mask, score_mod=softcap_score(3.0), block_size=16, backward=True)


def test_untraceable_mask_falls_back_exactly_and_warns_once():
    def python_branching(b, h, q_idx, kv_idx):  # Python control flow on tensors cannot be traced
        causal = q_idx >= kv_idx
        if bool(causal.any()):
            return causal & ((q_idx * 7 + kv_idx * 3) % 5 != 0)
        return causal

    python_branching.__name__ = "python_branching_forward"  # the warning is once per name: unique here
    q, k, v = random_qkv(2, 2, 2, 75, 75, 32, dtype=torch.float16)
    with pytest.warns(UntraceableMaskWarning, match="python_branching_forward"):
        check(q, k, v, mask_mod=python_branching, block_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntraceableMaskWarning)  # said once, not on every call
        check(q, k, v, mask_mod=python_branching, block_size=(16, 32))


def test_untraceable_mask_warning_names_the_operation():
    def uses_erfcx(b, h, q_idx, kv_idx):
        return (torch.special.erfcx(q_idx * 0.1) > 0.5) | (q_idx == kv_idx)

    q, k, v = random_qkv(1, 1, 1, 40, 40, 16, dtype=torch.float32)
    with pytest.warns(UntraceableMaskWarning, match="erfcx"):
        check(q, k, v, mask_mod=uses_erfcx, block_size=16)


# -- random compositions ------------------------------------------------------------------------



@settings(max_examples=8)
@given(data=st.data())
def test_random_compositions(data):
    length = data.draw(st.integers(2, 96), label="length")
    mask_mod = data.draw(composed_masks(length), label="mask")
    block = data.draw(st.sampled_from([16, 32, (16, 32), (32, 16), 64]), label="block")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), label="dtype")
    head_dim = data.draw(st.sampled_from([16, 24, 32]), label="head_dim")
    q, k, v = random_qkv(1, 2, 1, length, length, head_dim, dtype=dtype)
    check(q, k, v, mask_mod=mask_mod, block_size=block, context=getattr(mask_mod, "__name__", ""))


def test_gpu_check_script_dry_run(tmp_path):
    """bench/gpu_check.py runs end to end on CPU through the interpreter and writes its CSV."""
    import csv
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    with pytest.raises(SystemExit) as help_exit:
        gpu_check.parse_args(["--help"])
    assert help_exit.value.code == 0
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--perf-masks", "causal"]) == 0
    (written,) = tmp_path.glob("gpu_check_*.csv")
    rows = list(csv.DictReader(written.open()))
    assert {row["mask"] for row in rows if row["section"] == "forward_correctness"} == set(
        gpu_check.mask_families(1, 48, "cpu"))
    assert all(row["ok"] == "True" for row in rows if row["section"] == "forward_correctness")
    assert {row["impl"] for row in rows if row["section"] == "forward_speed"} == {"triton_attn", "sdpa"}
    backward = [row for row in rows if row["section"] == "backward" and row["impl"] == "ours"]
    assert backward and all(row["ok"] == "True" for row in backward), backward


# -- launch decisions of the efficiency work (issue 12) ------------------------------------------

def test_heavy_query_tiles_first_only_for_causal_like_masks():
    from triton_attn.kernels.attention.tiling import heavy_tiles_last

    def block_mask(mask_mod):
        return ta.create_block_mask(mask_mod, None, None, 256, 256, BLOCK_SIZE=32)

    assert heavy_tiles_last(block_mask(causal_mask))
    assert heavy_tiles_last(block_mask(ta.masks.prefix_lm_mask(64)))
    assert not heavy_tiles_last(block_mask(and_masks(causal_mask, chunked_mask(128))))  # equal halves
    assert not heavy_tiles_last(block_mask(ta.masks.library.full_mask))
    assert not heavy_tiles_last(block_mask(sliding_window_mask(32)))
    # Launched last-first, the causal result is unchanged (the rule against the golden result).
    q, k, v = random_qkv(1, 2, 2, 150, 150, 32, dtype=torch.float16)
    check(q, k, v, mask_mod=causal_mask, block_size=32)


def test_64bit_rows_chosen_from_row_strides_not_sizes():
    from triton_attn.kernels.host import needs_64bit_rows

    meta = torch.device("meta")
    bshd = torch.empty(1, 600_000, 32, 128, dtype=torch.bfloat16, device=meta).transpose(1, 2)  # stride 4096
    bhsd = torch.empty(1, 32, 600_000, 128, dtype=torch.bfloat16, device=meta)                 # stride 128
    assert needs_64bit_rows(bshd)
    assert not needs_64bit_rows(bhsd)      # batch / head offsets are 64-bit already
    assert needs_64bit_rows(bhsd, bshd) and not needs_64bit_rows(None, bhsd)
    # The largest row offset, (L - 1) * stride + (D - 1), decides: 2**31 - 1 still fits.
    edge = torch.empty(1, 1, 2 ** 24, 128, dtype=torch.float16, device=meta)
    assert not needs_64bit_rows(edge)
    assert needs_64bit_rows(torch.empty(1, 1, 2 ** 24 + 1, 128, dtype=torch.float16, device=meta))
