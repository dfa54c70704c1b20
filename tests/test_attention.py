"""``attention()`` on the torch backend against the float64 golden result (numerics rule, docs/design.md).

Forward and backward across the mask library, GQA ratios, Lq != Lkv, odd lengths, head dims,
dtypes and non-contiguous layouts; fully masked rows; every validation error by its message.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import triton_attn as ta
from tests.helpers.numerics import assert_matches_golden, random_qkv
from triton_attn.masks import (
    alibi_score,
    and_masks,
    causal_mask,
    chunked_mask,
    document_mask,
    not_mask,
    or_masks,
    padding_mask,
    prefix_lm_mask,
    sliding_window_mask,
    softcap_score,
)


def torch_attention(block_mask=None, score_mod=None, scale=None, enable_gqa=False):
    def run(q, k, v):
        return ta.attention(q, k, v, block_mask=block_mask, score_mod=score_mod, scale=scale,
                            enable_gqa=enable_gqa, return_lse=True, backend="torch")
    return run


def check(q, k, v, mask_mod=None, score_mod=None, block_size=128, scale=None, backward=True, mask_bh=(None, None)):
    B, Hq, Lq, _ = q.shape
    bm = None if mask_mod is None else ta.create_block_mask(mask_mod, *mask_bh, Lq, k.shape[2], BLOCK_SIZE=block_size)
    return assert_matches_golden(torch_attention(bm, score_mod, scale, enable_gqa=Hq != k.shape[1]), q, k, v,
                                 mask_mod=mask_mod, score_mod=score_mod, scale=scale, backward=backward,
                                 context=f"(q {tuple(q.shape)}, k {tuple(k.shape)}, {q.dtype})")


# ---------------------------------------------------------------------------------------------
# the mask library, forward and backward
# ---------------------------------------------------------------------------------------------
def _library_cases():
    ids = torch.tensor([0] * 40 + [1] * 50 + [2] * 39)
    padding = torch.ones(2, 129, dtype=torch.bool)
    padding[0, 100:] = False
    return {
        "causal": causal_mask,
        "sliding_window_17": sliding_window_mask(17),
        "chunked_32_causal": and_masks(chunked_mask(32), causal_mask),
        "prefix_lm_int": prefix_lm_mask(45),
        "prefix_lm_per_batch": prefix_lm_mask(torch.tensor([10, 90])),
        "document_1d": and_masks(causal_mask, document_mask(ids)),
        "document_2d": document_mask(torch.stack([ids, ids.flip(0)])),
        "padding": padding_mask(padding),
        "or_not": or_masks(not_mask(causal_mask), sliding_window_mask(5)),
    }


@pytest.mark.parametrize("name", list(_library_cases()))
def test_library_masks_forward_backward(name):
    mod = _library_cases()[name]
    q, k, v = random_qkv(2, 4, 2, 129, 129, 32)
    check(q, k, v, mod, block_size=32, mask_bh=(2, None))


@pytest.mark.parametrize("score_mod", [softcap_score(2.0), alibi_score(4)], ids=["softcap", "alibi"])
def test_score_mods_forward_backward(score_mod):
    q, k, v = random_qkv(1, 4, 4, 70, 90, 16)
    check(q, k, v, causal_mask, score_mod=score_mod, block_size=(16, 32))


def test_score_mod_with_captured_bias_table():
    table = torch.randn(64)

    def relative_bias(score, b, h, q_idx, kv_idx):
        return score + table[(q_idx - kv_idx).abs().clamp(max=63)]

    q, k, v = random_qkv(1, 2, 2, 60, 60, 16)
    check(q, k, v, sliding_window_mask(25), score_mod=relative_bias, block_size=16)


# ---------------------------------------------------------------------------------------------
# shapes: GQA, Lq != Lkv, odd lengths, head dims, dtypes, layouts
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("q_len,kv_len", [(1, 1), (1, 129), (17, 255), (127, 129), (129, 17), (255, 127)])
def test_odd_lengths(q_len, kv_len):
    q, k, v = random_qkv(1, 2, 1, q_len, kv_len, 16)
    check(q, k, v, causal_mask, block_size=64)


@pytest.mark.parametrize("head_dim,value_dim", [(16, 16), (64, 64), (80, 80), (128, 128), (64, 32), (16, 256)])
def test_head_dims(head_dim, value_dim):
    q, k, v = random_qkv(1, 2, 2, 65, 65, head_dim, value_dim)
    check(q, k, v, sliding_window_mask(20), block_size=32)


@pytest.mark.parametrize("q_heads,kv_heads", [(4, 1), (6, 2), (8, 8)])
@pytest.mark.parametrize("mask_heads", [None, "per_head"])
def test_gqa_ratios(q_heads, kv_heads, mask_heads):
    offsets = torch.arange(q_heads) * 3

    def staggered(b, h, q_idx, kv_idx):
        return q_idx - kv_idx >= offsets[h]

    mod, mask_bh = (causal_mask, (None, None)) if mask_heads is None else (staggered, (None, q_heads))
    q, k, v = random_qkv(2, q_heads, kv_heads, 50, 70, 16)
    check(q, k, v, mod, block_size=16, mask_bh=mask_bh)


def test_gqa_does_not_repeat_kv(monkeypatch):
    """The torch backend never calls repeat_interleave/expand+copy on K/V for GQA."""
    calls = []
    original = torch.Tensor.repeat_interleave
    monkeypatch.setattr(torch.Tensor, "repeat_interleave",
                        lambda self, *a, **kw: calls.append(1) or original(self, *a, **kw))
    q, k, v = random_qkv(1, 8, 2, 64, 64, 16)
    ta.attention(q, k, v, block_mask=ta.create_block_mask(causal_mask, None, None, 64, 64, BLOCK_SIZE=16),
                 enable_gqa=True, backend="torch")
    assert not calls


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes(dtype):
    q, k, v = random_qkv(1, 2, 2, 100, 100, 32, dtype=dtype)
    check(q, k, v, sliding_window_mask(33), block_size=32)


@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded"])
def test_non_contiguous_inputs(layout):
    q, k, v = random_qkv(2, 2, 2, 70, 70, 32, layout=layout)
    assert not q.is_contiguous()
    check(q, k, v, causal_mask, block_size=32)


def test_custom_scale_and_no_mask():
    q, k, v = random_qkv(1, 2, 2, 40, 50, 16)
    check(q, k, v, None, scale=0.37)


def test_float64_inputs_are_accepted_by_torch_backend():
    q, k, v = random_qkv(1, 1, 1, 20, 20, 8, dtype=torch.float64)
    out = ta.attention(q, k, v, backend="torch")
    assert out.dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# random compositions (hypothesis)
# ---------------------------------------------------------------------------------------------
@st.composite
def mask_mods(draw, depth=2):
    leaves = [
        lambda: causal_mask,
        lambda: sliding_window_mask(draw(st.integers(1, 40))),
        lambda: chunked_mask(draw(st.integers(1, 40))),
        lambda: prefix_lm_mask(draw(st.integers(0, 60))),
    ]
    if depth == 0 or draw(st.booleans()):
        return draw(st.sampled_from(leaves))()
    kind = draw(st.sampled_from(["and", "or", "not"]))
    if kind == "not":
        return not_mask(draw(mask_mods(depth - 1)))
    combine = and_masks if kind == "and" else or_masks
    return combine(draw(mask_mods(depth - 1)), draw(mask_mods(depth - 1)))


@given(mod=mask_mods(), q_len=st.integers(1, 90), kv_len=st.integers(1, 90),
       block=st.sampled_from([16, 32, (16, 32), (32, 16)]), groups=st.sampled_from([1, 2]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_random_compositions(mod, q_len, kv_len, block, groups, dtype):
    q, k, v = random_qkv(1, 2 * groups, 2, q_len, kv_len, 16, dtype=dtype)
    check(q, k, v, mod, block_size=block)


# ---------------------------------------------------------------------------------------------
# fully masked rows
# ---------------------------------------------------------------------------------------------
def _rows_masked_from(start):
    def rows_masked(b, h, q_idx, kv_idx):
        return (q_idx < start) & (kv_idx <= q_idx)
    return rows_masked


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 64])
def test_fully_masked_rows_give_zero_output_neg_inf_lse_zero_grads(dtype, block_size):
    q, k, v = random_qkv(1, 2, 2, 70, 50, 16, dtype=dtype)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    mod = _rows_masked_from(30)  # rows 30.. see nothing; some share a tile with live rows
    bm = ta.create_block_mask(mod, None, None, 70, 50, BLOCK_SIZE=block_size)
    out, lse = ta.attention(q, k, v, block_mask=bm, return_lse=True, backend="torch")
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, :, 30:], torch.zeros_like(out[:, :, 30:]))
    assert torch.isneginf(lse[:, :, 30:]).all() and torch.isfinite(lse[:, :, :30]).all()
    out.backward(torch.randn_like(out))
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert torch.isfinite(t.grad).all(), f"d{name} has non-finite entries"
    assert torch.equal(q.grad[:, :, 30:], torch.zeros_like(q.grad[:, :, 30:]))
    assert torch.equal(k.grad[:, :, 30:], torch.zeros_like(k.grad[:, :, 30:]))  # keys only rows >= 30 could see


def test_everything_masked():
    q, k, v = random_qkv(1, 1, 1, 20, 20, 8)
    q.requires_grad_()
    bm = ta.create_block_mask(lambda b, h, q_idx, kv_idx: q_idx < 0, None, None, 20, 20, BLOCK_SIZE=16)
    out, lse = ta.attention(q, k, v, block_mask=bm, return_lse=True, backend="torch")
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


# ---------------------------------------------------------------------------------------------
# validation errors, by message
# ---------------------------------------------------------------------------------------------
def _qkv(**overrides):
    shapes = dict(q=(1, 2, 8, 16), k=(1, 2, 8, 16), v=(1, 2, 8, 16))
    shapes.update(overrides)
    return [torch.randn(shapes[n]) for n in "qkv"]


@pytest.mark.parametrize("overrides,error,message", [
    (dict(q=(2, 8, 16)), ValueError, r"query must be a 4-D tensor \[B, Hq, Lq, D\], got 3-D"),
    (dict(k=(1, 2, 8, 16, 1)), ValueError, r"key must be a 4-D tensor"),
    (dict(k=(2, 2, 8, 16)), ValueError, r"batch sizes differ: query has B=1, key 2"),
    (dict(k=(1, 2, 8, 32)), ValueError, r"query and key must have the same head_dim D, got 16 and 32"),
    (dict(v=(1, 2, 9, 16)), ValueError, r"key and value must have the same length Lkv, got 8 and 9"),
    (dict(v=(1, 1, 8, 16)), ValueError, r"key and value must have the same number of heads, got 2 and 1"),
    (dict(q=(1, 3, 8, 16)), ValueError, r"GQA needs query heads Hq=3 to be a multiple of key/value heads Hkv=2"),
    (dict(q=(1, 4, 8, 16)), ValueError, r"query has Hq=4 heads but key/value have Hkv=2; pass enable_gqa=True"),
    (dict(q=(1, 2, 8, 300), k=(1, 2, 8, 300)), ValueError, r"query/key head_dim D must be at most 256, got 300"),
    (dict(v=(1, 2, 8, 320)), ValueError, r"value head_dim Dv must be at most 256, got 320"),
    (dict(q=(1, 2, 0, 16)), ValueError, r"query must not have an empty dimension"),
])
def test_shape_errors(overrides, error, message):
    q, k, v = _qkv(**overrides)
    with pytest.raises(error, match=message):
        ta.attention(q, k, v)


def test_type_dtype_device_errors():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"query must be a torch.Tensor \[B, Hq, Lq, D\], got list"):
        ta.attention([1], k, v)
    with pytest.raises(TypeError, match=r"key must be float16, bfloat16 or float32, got torch.int64"):
        ta.attention(q, k.long(), v)
    with pytest.raises(TypeError, match=r"query, key and value must share one dtype"):
        ta.attention(q, k.half(), v)
    with pytest.raises(ValueError, match=r"query, key and value must be on one device"):
        ta.attention(q, k.to("meta"), v)
    with pytest.raises(TypeError, match=r"scale must be a finite float or None, got nan"):
        ta.attention(q, k, v, scale=math.nan)
    with pytest.raises(ValueError, match=r"backend must be one of torch, triton, interpret, got 'cuda'"):
        ta.attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match=r"backend 'triton' needs CUDA tensors"):
        ta.attention(q, k, v, backend="triton")
    with pytest.raises(TypeError, match=r"float16, bfloat16 or float32 on backend 'interpret', got float64"):
        ta.attention(q.double(), k.double(), v.double(), backend="interpret")


def test_backend_env_override(no_backend_env):
    q, k, v = _qkv()
    no_backend_env.setenv("TRITON_ATTN_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"TRITON_ATTN_BACKEND must be one of torch, triton, interpret, got 'bogus'"):
        ta.attention(q, k, v)


def test_block_mask_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError,
                       match=r"block_mask was built for Q_LEN=16, KV_LEN=8 but query has Lq=8 and key has Lkv=8"):
        ta.attention(q, k, v, block_mask=ta.create_block_mask(causal_mask, None, None, 16, 8))
    # (a mask with more batch entries or heads than the query is read at its first ones, as FlexAttention's:
    # tests/test_flex_parity.py; fewer than the query's, but not 1, is an error)
    q4, k4, v4 = _qkv(q=(4, 4, 8, 16), k=(4, 4, 8, 16), v=(4, 4, 8, 16))
    with pytest.raises(ValueError,
                       match=r"block_mask has batch size 3; expected 1 \(broadcast\) or at least query's B=4"):
        ta.attention(q4, k4, v4, block_mask=ta.create_block_mask(causal_mask, 3, None, 8, 8))
    with pytest.raises(ValueError, match=r"block_mask has 2 heads; expected 1 \(broadcast\) or at least query's Hq=4"):
        ta.attention(q4, k4, v4, block_mask=ta.create_block_mask(causal_mask, None, 2, 8, 8))
    with pytest.raises(TypeError, match=r"block_mask must be a triton_attn.BlockMask .* got Tensor"):
        ta.attention(q, k, v, block_mask=torch.ones(8, 8, dtype=torch.bool))


def test_mod_errors():
    q, k, v = _qkv()

    def raises(b, h, q_idx, kv_idx):
        raise RuntimeError("boom")

    def returns_int(b, h, q_idx, kv_idx):
        return q_idx - kv_idx

    def returns_wrong_shape(b, h, q_idx, kv_idx):
        return torch.ones(3, 5, dtype=torch.bool)

    with pytest.raises(ValueError, match=r"mask_mod 'raises' raised RuntimeError: boom"):
        ta.create_block_mask(raises, None, None, 8, 8)
    with pytest.raises(TypeError, match=r"mask_mod 'returns_int' must return a bool tensor, got dtype torch.int64"):
        ta.create_block_mask(returns_int, None, None, 8, 8)
    with pytest.raises(ValueError,
                       match=r"mask_mod 'returns_wrong_shape' returned shape \(3, 5\), which does not broadcast"):
        ta.create_mask(returns_wrong_shape, None, None, 8, 8)
    with pytest.raises(TypeError, match=r"mask_mod must be a callable"):
        ta.create_block_mask("causal", None, None, 8, 8)
    with pytest.raises(ValueError, match=r"Q_LEN must be a positive int, got 0"):
        ta.create_block_mask(causal_mask, None, None, 0, 8)
    with pytest.raises(ValueError, match=r"B must be a positive int or None \(broadcast\), got -1"):
        ta.create_block_mask(causal_mask, -1, None, 8, 8)

    def score_raises(score, b, h, q_idx, kv_idx):
        raise KeyError("nope")

    def score_returns_bool(score, b, h, q_idx, kv_idx):
        return score > 0

    with pytest.raises(ValueError, match=r"score_mod 'score_raises' raised KeyError"):
        ta.attention(q, k, v, score_mod=score_raises, backend="torch")
    with pytest.raises(TypeError, match=r"score_mod 'score_returns_bool' must return a floating-point tensor, "
                                        r"got dtype torch.bool"):
        ta.attention(q, k, v, score_mod=score_returns_bool, backend="torch")
    with pytest.raises(TypeError, match=r"score_mod must be callable or None, got int"):
        ta.attention(q, k, v, score_mod=3)


def test_captured_tensor_on_other_device():
    q, k, v = _qkv()
    ids = torch.zeros(8, dtype=torch.long, device="meta")
    bm = ta.create_block_mask(causal_mask, None, None, 8, 8)
    bm.mask_mod = document_mask(ids)
    with pytest.raises(ValueError,
                       match=r"block_mask.mask_mod 'document.*' captures a tensor on meta .* but query is on cpu"):
        ta.attention(q, k, v, block_mask=bm)


def test_learnable_bias_table_gets_gradients():
    table = torch.randn(64, requires_grad=True)

    def learned_bias(score, b, h, q_idx, kv_idx):
        return score + table[(q_idx - kv_idx).abs().clamp(max=63)]

    q, k, v = random_qkv(1, 2, 2, 50, 50, 16)
    bm = ta.create_block_mask(causal_mask, None, None, 50, 50, BLOCK_SIZE=16)
    assert_matches_golden(torch_attention(bm, learned_bias), q, k, v, mask_mod=causal_mask,
                          score_mod=learned_bias, params=[table])


def test_first_call_with_grad_is_fast():
    """No heavy import (torch._dynamo via torch.utils.checkpoint) on the first differentiable call."""
    import subprocess
    import sys
    code = ("import time, torch, triton_attn as ta\n"
            "q = torch.randn(1, 2, 256, 32, requires_grad=True)\n"
            "start = time.perf_counter(); ta.attention(q, q, q, backend='torch').sum().backward()\n"
            "import sys; print('dynamo' if 'torch._dynamo' in sys.modules else 'clean')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ,
                                 "PYTHONPATH": str(__import__("pathlib").Path(__file__).parent.parent)})
    assert result.stdout.strip() == "clean", result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# the inference fast path (PyTorch's fused CPU flash kernel per tile row)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mod_name", ["causal", "sliding_window_17", "document_1d", "or_not", "rows_masked",
                                      "prefix_lm_int", "sink_and_window"])
@pytest.mark.parametrize("q_heads,kv_heads", [(2, 2), (4, 1), (6, 2)])
def test_cpu_flash_fast_path_matches_golden(monkeypatch, mod_name, q_heads, kv_heads):
    from triton_attn.backends.torch import cpu_flash

    calls = []
    original = cpu_flash.fused_attention
    monkeypatch.setattr(cpu_flash, "fused_attention", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    special = {"rows_masked": _rows_masked_from(60),
               # attention-sink pattern: a full first block far from the diagonal, so two calls per row
               "sink_and_window": or_masks(and_masks(causal_mask, lambda b, h, q_idx, kv_idx: kv_idx < 16),
                                           sliding_window_mask(9))}
    mod = special.get(mod_name) or _library_cases()[mod_name]
    q, k, v = random_qkv(1, q_heads, kv_heads, 129, 129, 32)
    with torch.no_grad():
        check(q, k, v, mod, block_size=(32, 16), backward=False)
    assert calls, "the fast path was not taken"


def test_cpu_flash_fast_path_not_used_when_it_does_not_apply():
    """The route (dispatch.plan_call) sends float32 CPU inference with a head-shared mask, no score_mod and
    D == Dv to the fused CPU kernel, and nothing else."""
    q, k, v = random_qkv(1, 2, 2, 40, 40, 16)
    bm = ta.create_block_mask(causal_mask, None, None, 40, 40, BLOCK_SIZE=16)
    per_head = ta.create_block_mask(causal_mask, None, 2, 40, 40, BLOCK_SIZE=16)

    def family(*tensors, block_mask=bm, score_mod=None):
        return ta.explain(*tensors, block_mask=block_mask, score_mod=score_mod).family

    with torch.no_grad():
        assert family(q, k, v) == "cpu_flash"
        assert family(q, k, v, score_mod=softcap_score(2.0)) == "blockwise"
        assert family(q.half(), k.half(), v.half()) != "cpu_flash"
        assert family(q, k, v, block_mask=per_head) == "blockwise"
        assert family(q, k, v[..., :8]) == "blockwise"
    assert family(q.requires_grad_(), k, v) != "cpu_flash"


@pytest.mark.parametrize("batch,padded,q_len", [(2, False, 1), (2, True, 1), (3, False, 5), (3, True, 5)])
def test_cpu_flash_dense_route_of_closed_form_masks(batch, padded, q_len):
    """The dense route's bias for a (deferred, exact-layout) closed-form mask: broadcast by the op over the
    batch (mask batch 1) and over grouped query rows (one row), repeated per group for several rows."""
    from triton_attn.masks.closed_form import window_block_mask
    from triton_attn.registry.masking import ModelMaskMod

    kv_len = 200
    keep = (torch.rand(batch, kv_len) > 0.2) if padded else None
    q, k, v = random_qkv(batch, 8, 2, q_len, kv_len, 16)
    mod = ModelMaskMod((True, 50), torch.tensor(kv_len - q_len), torch.tensor(0), keep)
    block_mask = window_block_mask(mod, batch, q_len, kv_len, q_offset=kv_len - q_len, window=50, padding=keep,
                                   BLOCK_SIZE=32)
    assert block_mask.is_deferred() and block_mask.shape[0] == (batch if padded else 1)
    general = ta.create_block_mask(mod, batch, None, q_len, kv_len, BLOCK_SIZE=32)
    with torch.no_grad():
        out = ta.attention(q, k, v, block_mask=block_mask, enable_gqa=True)
        golden = ta.attention(q.double(), k.double(), v.double(), block_mask=general, enable_gqa=True)
    torch.testing.assert_close(out.double(), golden, rtol=0, atol=2e-6)
    assert block_mask.is_deferred()


def test_eager_cpu_inference_skips_the_op_dispatch(monkeypatch):
    """No gradient, eager, CPU, torch backend: the op's CPU implementation is called directly (the
    dispatcher and the mod table are host time on every decode step); the result is the op's exactly."""
    from triton_attn import ops
    from triton_attn.dispatch import Route
    from triton_attn.mod_table import register_mod

    q, k, v = random_qkv(2, 4, 2, 33, 70, 16)
    block_mask = ta.create_block_mask(sliding_window_mask(20), None, None, 33, 70, BLOCK_SIZE=16)
    calls = []
    original = ops.attention_op
    monkeypatch.setattr(ops, "attention_op", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    with torch.no_grad():
        direct = ta.attention(q, k, v, block_mask=block_mask, enable_gqa=True, return_lse=True)
    assert not calls
    mask, score = register_mod(block_mask.mask_mod, "mask"), register_mod(None, "score")
    route = ta.explain(q, k, v, block_mask=block_mask, enable_gqa=True)
    assert (route.family, route.call) == ("cpu_flash", "direct")
    op_route = Route("torch", "cpu_flash", "op", "none")
    through_op = original(op_route, q, k, v, block_mask, mask, score, scale=16 ** -0.5, autotune=None)
    for got, want in zip(direct, through_op):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    q.requires_grad_()
    # gradients with a score_mod (PyTorch's fused kernels do not take it): the op, recomputed blockwise
    ta.attention(q, k, v, block_mask=block_mask, score_mod=softcap_score(5.0), enable_gqa=True).sum().backward()
    assert calls and q.grad is not None


@pytest.mark.parametrize("needs_grad", [False, True])
def test_compact_block_mask_is_walked_without_dense_fields(needs_grad):
    """The torch backend (both paths) reads a compact mask's compressed rows, never its dense fields."""
    ids = torch.arange(200) // 70
    mod = and_masks(causal_mask, document_mask(ids))
    compact = ta.create_block_mask(mod, None, None, 200, 200, BLOCK_SIZE=32, layout="compact")
    assert isinstance(compact, ta.CompactBlockMask)
    q, k, v = random_qkv(1, 2, 1, 200, 200, 16)
    with torch.set_grad_enabled(needs_grad):
        check(q, k, v, mod, block_size=32, backward=needs_grad)  # the same attention through a dense mask
        run = torch_attention(compact, enable_gqa=True)
        out, lse = run(*(t.requires_grad_(needs_grad) for t in (q, k, v)))
    assert not compact._dense, f"dense fields were built: {sorted(compact._dense)}"
    dense_out, dense_lse = torch_attention(ta.create_block_mask(mod, None, None, 200, 200, BLOCK_SIZE=32),
                                           enable_gqa=True)(q, k, v)
    # A dense mask goes through the custom op, whose forward takes the fused CPU kernel even when
    # gradients are needed: the two routes agree to float32 rounding, not bit for bit.
    torch.testing.assert_close(out, dense_out, rtol=0, atol=2e-6)
    torch.testing.assert_close(lse, dense_lse, rtol=0, atol=2e-6)


def test_import_does_not_import_triton():
    """Triton (and the GPU tile refiner) load on first use, never at `import triton_attn`."""
    import subprocess
    import sys
    from pathlib import Path
    code = ("import sys, triton_attn\n"
            "triton_attn.attention  # the first public name loads the API, which wires the refiner\n"
            "from triton_attn.masks import compiler\n"
            "print('triton' in sys.modules, sorted(compiler.TILE_REFINERS))\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.stdout.strip() == "False ['cuda']", result.stdout + result.stderr
