"""The FlexAttention idioms through the Triton kernels under the interpreter, grouped into a few runs.

Each run gives every head its own idiom (``torch.where(h == i, idiom_i, ...)``), so one launch
checks the inlined code of many idioms at once against the float64 golden result, which evaluates
the same mods eagerly (per element, as FlexAttention does).
"""

from __future__ import annotations

import pytest
import torch

import triton_attn as ta
from tests.helpers.numerics import assert_matches_golden, random_qkv
from tests.masks.test_flex_idioms import _captured, mask_idioms, score_idioms

pytest.importorskip("triton")

MASK_GROUPS = [
    ["chained_index", "nested_3d_index", "index_pair_of_loaded_value", "ellipsis_then_index", "size1_slice",
     "computed_index", "zero_dim_tensor_index", "lengths_per_batch", "torch_and_masks", "torch_or_masks"],
    ["shifts", "shift_left_or_xor", "bitwise_not_int", "isin", "isin_invert", "any_over_captured",
     "floor_ceil_round", "remainder_fmod", "sign", "true_division", "to_dtype", "new_zeros_new_full"],
]
SCORE_GROUPS = [
    ["sin_cos", "erf", "gelu_exact", "gelu_tanh", "silu", "sigmoid", "softplus", "log1p"],
    ["expm1", "pow_constants", "reduction_sum", "reduction_dot", "chained_bias", "where_scalar", "to_dtype_division"],
]


def per_head(mods):
    """One mod whose head ``i`` behaves as ``mods[i]``."""
    def selected(*args):
        h = args[-3]
        result = mods[-1](*args)
        for index in range(len(mods) - 2, -1, -1):
            result = torch.where(h == index, mods[index](*args), result)
        return result
    return selected


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch's vmap of isin in the golden result
@pytest.mark.parametrize("group", range(len(MASK_GROUPS)))
def test_mask_idioms_on_the_interpreter(group):
    idioms = mask_idioms(_captured(2, heads=len(MASK_GROUPS[group])))
    mask_mod = per_head([idioms[name] for name in MASK_GROUPS[group]])
    heads = len(MASK_GROUPS[group])
    # The idioms index captured tensors sized for batch 2 and 64 positions: a shorter ragged length is fine.
    q, k, v = random_qkv(1, heads, heads, 40, 40, 16, dtype=torch.float16)
    block_mask = ta.create_block_mask(mask_mod, 1, heads, 40, 40, BLOCK_SIZE=16)
    assert_matches_golden(
        lambda q_, k_, v_: ta.attention(q_, k_, v_, block_mask=block_mask, return_lse=True, backend="interpret"),
        q, k, v, mask_mod=mask_mod, backward=False)


@pytest.mark.parametrize("group", range(len(SCORE_GROUPS)))
def test_score_idioms_forward_and_backward_on_the_interpreter(group, monkeypatch):
    monkeypatch.setenv("TRITON_ATTN_BACKEND", "interpret")  # flex_attention picks its backend as attention() does
    idioms = score_idioms(_captured(3, heads=len(SCORE_GROUPS[group])))
    score_mod = per_head([idioms[name] for name in SCORE_GROUPS[group]])
    heads = len(SCORE_GROUPS[group])
    q, k, v = random_qkv(1, heads, heads, 32, 32, 16, dtype=torch.float32)
    assert_matches_golden(
        lambda q_, k_, v_: ta.flex_attention(q_, k_, v_, score_mod, return_lse=True),
        q, k, v, score_mod=score_mod, backward=True)
