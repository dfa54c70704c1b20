"""``backends.torch.sdpa``: the SDPA route against the float64 golden result (forward, backward, lse and its
gradient), and the behaviours of PyTorch's fused CPU op it relies on or works around (module docstring)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.numerics import BACKWARD_FACTOR, FORWARD_FACTOR, assert_matches_golden, compare, random_qkv
from triton_attn.backends.torch import sdpa
from triton_attn.backends.torch.sdpa import SDPA_DTYPES, sdpa_attention
from triton_attn.masks import causal_mask
from triton_attn.reference import dense_attention

pytestmark = pytest.mark.skipif(not sdpa.available(), reason="this torch has no fused CPU flash-attention op")


def keep_mask_mod(keep: torch.Tensor):
    """The dense ``keep`` [B, H, Lq, Lkv] (broadcast dims of size 1 allowed) as a mask_mod for the golden result."""
    def kept(b, h, q_idx, kv_idx):
        return keep[b % keep.shape[0], h % keep.shape[1], q_idx % keep.shape[2], kv_idx]
    return kept


def random_keep(shape, empty_rows: bool = True) -> torch.Tensor:
    """A random bool mask of ``shape`` (4-d), with a few rows that attend to nothing."""
    keep = torch.rand(shape) > 0.4
    if empty_rows and shape[2] > 2:
        keep[..., 1, :] = False
        keep[..., -1, :] = False
    return keep


def candidate(mode: str, scale: float, keep=None):
    def run(q, k, v):
        result = sdpa_attention(q, k, v, causal=mode in ("causal", "causal_keep"), keep=keep, scale=scale)
        assert result is not None
        return result
    return run


def golden_mask(mode: str, keep):
    if mode == "none":
        return None
    if mode == "causal":
        return causal_mask
    kept = keep_mask_mod(keep)
    if mode == "keep":
        return kept
    return lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & kept(b, h, q_idx, kv_idx)


@pytest.mark.parametrize("dtype", SDPA_DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["none", "causal", "keep", "causal_keep"])
@pytest.mark.parametrize("heads,lengths", [((2, 2), (64, 64)), ((4, 2), (37, 53)), ((6, 2), (53, 37)),
                                           ((2, 1), (1, 40))])
def test_matches_golden_forward_and_backward(dtype, mode, heads, lengths):
    q_heads, kv_heads = heads
    q_len, kv_len = lengths
    q, k, v = random_qkv(2, q_heads, kv_heads, q_len, kv_len, 16, dtype=dtype)
    keep = random_keep((2, 1, q_len, kv_len)) if "keep" in mode else None
    scale = 0.3
    assert_matches_golden(candidate(mode, scale, keep), q, k, v, mask_mod=golden_mask(mode, keep), scale=scale,
                          context=f"{mode} {dtype} heads {heads} lengths {lengths}")


@pytest.mark.parametrize("layout", ["expanded", "transposed", "strided"])
@pytest.mark.parametrize("mode", ["none", "causal"])
def test_layouts(layout, mode):
    """K/V broadcast over the batch (stride 0), [B, L, H, D] views, and a last dim of stride 2 (which the op
    alone would read wrongly)."""
    q, k, v = random_qkv(3, 4, 2, 45, 70, 16, layout=layout)
    if layout == "expanded":
        q = torch.randn(q.shape)  # a query per batch entry, the K/V shared
        assert k.stride(0) == 0 and v.stride(0) == 0
    assert_matches_golden(candidate(mode, 0.25), q, k, v, mask_mod=golden_mask(mode, None), scale=0.25,
                          context=layout)


@pytest.mark.parametrize("mode", ["keep", "causal_keep"])
@pytest.mark.parametrize("keep_shape", [(40, 50), (1, 1, 40, 50), (2, 1, 1, 50), (2, 4, 40, 50), (1, 4, 1, 50)])
def test_keep_shapes_broadcast(keep_shape, mode):
    """Every broadcast form of ``keep``, alone and with ``causal`` (a padding mask [B, 1, 1, Lkv] plus causal is
    the usual batched-prompt case); the first keys of batch 1 are masked, so with causal its first rows see
    nothing."""
    q, k, v = random_qkv(2, 4, 2, 40, 50, 16)
    keep = torch.rand(keep_shape) > 0.3
    if keep_shape[0] == 2:
        keep[1, ..., :6] = False
    keep4 = keep.reshape((1,) * (4 - keep.dim()) + keep_shape)
    assert_matches_golden(candidate(mode, 0.25, keep), q, k, v, mask_mod=golden_mask(mode, keep4), scale=0.25,
                          context=f"{mode} keep {keep_shape}")


def test_equal_to_scaled_dot_product_attention():
    """The same kernels as ``F.scaled_dot_product_attention`` (the bench's ``sdpa`` column): equal results."""
    q, k, v = random_qkv(2, 4, 2, 48, 48, 16)
    keep = random_keep((2, 1, 48, 48), empty_rows=False)
    grad = torch.randn(2, 4, 48, 16)
    for causal, mask in ((False, None), (True, None), (False, keep)):
        ours = [t.clone().requires_grad_() for t in (q, k, v)]
        theirs = [t.clone().requires_grad_() for t in (q, k, v)]
        out, _ = sdpa_attention(*ours, causal=causal, keep=mask, scale=0.2)
        expected = F.scaled_dot_product_attention(*theirs, attn_mask=mask, is_causal=causal, scale=0.2, enable_gqa=True)
        assert torch.equal(out, expected)
        out.backward(grad)
        expected.backward(grad)
        for mine, reference in zip(ours, theirs):
            assert torch.equal(mine.grad, reference.grad)


def test_no_grad_path_equals_autograd_path():
    q, k, v = random_qkv(1, 2, 2, 30, 30, 16)
    keep = random_keep((1, 1, 30, 30))
    with torch.no_grad():
        out, lse = sdpa_attention(q, k, v, causal=True, keep=keep, scale=0.25)
    grad_out, grad_lse = sdpa_attention(q.requires_grad_(), k, v, causal=True, keep=keep, scale=0.25)
    assert torch.equal(out, grad_out.detach()) and torch.equal(lse, grad_lse.detach())


def _losses(run, q, k, v, grad_out, grad_lse):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = run(*leaves)
    loss = (lse.masked_fill(torch.isinf(lse), 0) * grad_lse).sum()
    if grad_out is not None:
        loss = loss + (out * grad_out).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)  # the lse alone does not depend on v
    return [out.detach(), lse.detach()] + [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]


@pytest.mark.parametrize("with_out_grad", [True, False])
@pytest.mark.parametrize("mode", ["none", "causal", "keep"])
def test_lse_gradient(mode, with_out_grad):
    """A gradient into the returned lse reaches q and k (the op's own autograd ignores it)."""
    q, k, v = random_qkv(2, 4, 2, 33, 41, 16)
    keep = random_keep((2, 1, 33, 41)) if mode == "keep" else None
    mask_mod = golden_mask(mode, keep)
    grad_out = torch.randn(2, 4, 33, 16) if with_out_grad else None
    grad_lse = torch.randn(2, 4, 33)

    def dense(dtype):
        return lambda q_, k_, v_: dense_attention(q_, k_, v_, mask_mod=mask_mod, scale=0.3, compute_dtype=dtype)

    golden = _losses(dense(torch.float64), *(t.double() for t in (q, k, v)),
                     None if grad_out is None else grad_out.double(), grad_lse.double())
    baseline = _losses(dense(torch.float32), q, k, v, grad_out, grad_lse)
    got = _losses(candidate(mode, 0.3, keep), q, k, v, grad_out, grad_lse)
    names = ("out", "lse", "dq", "dk", "dv")
    factors = (FORWARD_FACTOR, FORWARD_FACTOR) + (BACKWARD_FACTOR,) * 3
    comparisons = [compare(name, a, b, g, factor, torch.float32)
                   for name, a, b, g, factor in zip(names, got, baseline, golden, factors)]
    failed = [c for c in comparisons if not c.error <= c.bound]
    assert not failed, "; ".join(map(str, comparisons))
    assert got[2].abs().max() > 0  # the lse gradient alone moves q


def test_fully_masked_rows():
    """Rows with no allowed key: out 0, lse -inf, zero and finite gradients (the op reports lse 0 there)."""
    q, k, v = random_qkv(2, 2, 2, 20, 24, 16)
    keep = torch.rand(2, 1, 20, 24) > 0.5
    keep[0, :, 3] = False
    keep[1, :, :5] = False
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = sdpa_attention(*leaves, causal=False, keep=keep, scale=0.25)
    empty = ~keep.any(-1).expand(2, 2, 20)
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    assert torch.isneginf(lse[empty]).all() and torch.isfinite(lse[~empty]).all()
    (out.sum() + lse.masked_fill(torch.isinf(lse), 0).sum()).backward()
    for leaf in leaves:
        assert torch.isfinite(leaf.grad).all()
    assert torch.equal(leaves[0].grad[empty], torch.zeros_like(leaves[0].grad[empty]))


@pytest.mark.parametrize("q_len,kv_len", [(0, 10), (10, 0), (0, 0)])
def test_empty_calls(q_len, kv_len):
    """No rows or no keys (the op itself dies of SIGFPE): out 0, lse -inf, gradients 0."""
    q, k, v = random_qkv(2, 4, 2, q_len, kv_len, 16)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = sdpa_attention(*leaves, causal=True, keep=None, scale=0.25)
    assert out.shape == (2, 4, q_len, 16) and lse.shape == (2, 4, q_len) and lse.dtype == torch.float32
    assert not out.any() and torch.isneginf(lse).all()
    grads = torch.autograd.grad(out.sum(), leaves)
    assert all(g is not None and not g.any() for g in grads)


def test_hidden_nan_keys_under_causal_stay_hidden():
    """is_causal replaces masked scores, so a NaN key reaches only the rows that see it; the lse of those
    rows is -inf, as the specification's."""
    q, k, v = random_qkv(2, 2, 2, 96, 96, 16)
    k[:, :, 3] = float("nan")
    k[:, :, 50] = float("inf")
    with torch.no_grad():
        out, lse = sdpa_attention(q, k, v, causal=True, keep=None, scale=0.25)
    golden, golden_lse = dense_attention(q, k, v, mask_mod=causal_mask, scale=0.25, compute_dtype=torch.float64)
    assert torch.equal(torch.isnan(out), torch.isnan(golden))
    assert torch.isnan(golden).any() and not torch.isnan(golden[:, :, :3]).any()
    clean = ~torch.isnan(golden)
    torch.testing.assert_close(out[clean].double(), golden[clean], rtol=0, atol=1e-5)
    assert torch.equal(lse, torch.where(torch.isneginf(golden_lse), golden_lse, lse))
    assert not torch.isnan(lse).any()


def test_hidden_nan_key_under_a_dense_mask_returns_none():
    """Through the additive bias a hidden NaN key would leak (nan + -inf): the call says so with None."""
    q, k, v = random_qkv(1, 2, 2, 30, 30, 16)
    keep = torch.ones(1, 1, 30, 30, dtype=torch.bool)
    keep[..., 7] = False
    assert sdpa_attention(q, k, v, causal=False, keep=keep, scale=0.25) is not None
    k[:, :, 7] = float("nan")
    assert sdpa_attention(q, k, v, causal=False, keep=keep, scale=0.25) is None
    assert sdpa_attention(q.requires_grad_(), k, v, causal=False, keep=keep, scale=0.25) is None


def test_supports_and_errors():
    q, k, v = random_qkv(1, 4, 2, 8, 8, 16)
    assert sdpa.supports(q, k, v)
    assert not sdpa.supports(q, k, torch.randn(1, 2, 8, 32))               # D != Dv
    assert not sdpa.supports(q, k[:, :1].expand(1, 3, 8, 16), v[:, :1].expand(1, 3, 8, 16))  # 4 heads over 3
    assert not sdpa.supports(q.to(torch.int32), k.to(torch.int32), v.to(torch.int32))
    with pytest.raises(ValueError,
                       match=r"sdpa_attention: expected CPU query/key/value .* value torch.float32 \(1, 2, 8, 32\)"):
        sdpa_attention(q, k, torch.randn(1, 2, 8, 32), causal=False, keep=None, scale=1.0)
    with pytest.raises(TypeError,
                       match=r"sdpa_attention: keep must be a bool tensor \(True = attend\), got dtype torch.float32"):
        sdpa_attention(q, k, v, causal=False, keep=torch.zeros(8, 8), scale=1.0)
    with pytest.raises(ValueError, match=r"sdpa_attention: keep must broadcast to \[B, Hq, Lq, Lkv\] = \[1, 4, 8, 8\], "
                                         r"got shape \(3, 1, 8, 8\)"):
        sdpa_attention(q, k, v, causal=False, keep=torch.ones(3, 1, 8, 8, dtype=torch.bool), scale=1.0)


def test_lse_dtype_follows_the_input():
    for dtype, expected in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                            (torch.float16, torch.float32), (torch.float64, torch.float64)):
        q, k, v = random_qkv(1, 2, 2, 8, 8, 16, dtype=dtype)
        out, lse = sdpa_attention(q, k, v, causal=True, keep=None, scale=1 / math.sqrt(16))
        assert out.dtype == dtype and lse.dtype == expected
