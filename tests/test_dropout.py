"""Attention dropout (``attention(..., dropout_p=p)``): what a call with dropout computes, on the torch backend's
routes (``dense``, ``blockwise``) and the Triton kernels under the interpreter (once they have dropout).

Every call is checked against a float64 dense reference built from the keep mask the call returns
(``return_dropout_mask=True``): ``out = (softmax(scores) * keep / (1 - p)) @ V``, the lse without dropout, and
the gradients of both, under the numerics rule of tests/helpers/numerics.py.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import triton_attn as ta
import triton_attn.backends.torch.dropout as torch_dropout
from tests.helpers.numerics import BACKWARD_FACTOR, FORWARD_FACTOR, compare, random_qkv
from triton_attn.backends.torch.dropout import CHUNK_COLS, CHUNK_ROWS, DropoutStream, keep_mask, unpack
from triton_attn.dropout import Dropout
from triton_attn.masks import and_masks, causal_mask, padding_mask, sliding_window_mask, softcap_score
from triton_attn.masks.evaluate import call_mask_mod, call_score_mod
from triton_attn.reference import index_grids


def _kernels_have_dropout() -> bool:
    try:
        from triton_attn.kernels import entry
    except ImportError:
        return False
    return (hasattr(entry, "dropout_keep_mask")
            and "dropout" in inspect.signature(entry.prefill_forward).parameters
            and "dropout" in inspect.signature(entry.prefill_backward).parameters)


# The Triton kernels' dropout (kernels/entry.py) lands separately: these run once it is there.
needs_kernel_dropout = pytest.mark.skipif(not _kernels_have_dropout(),
                                          reason="the Triton kernels have no dropout yet (kernels/entry.py)")
BACKENDS = ["torch", pytest.param("interpret", marks=needs_kernel_dropout)]


def reference_with_dropout(q, k, v, keep, p, *, mask_mod=None, score_mod=None, scale=None, compute_dtype):
    """(out [B, Hq, Lq, Dv], lse [B, Hq, Lq]) of attention whose probabilities are multiplied by keep / (1 - p),
    every step in ``compute_dtype``; ``keep`` bool [B, Hq, Lq, Lkv]. Rows that see nothing: 0, -inf."""
    batch, q_heads, q_len, head_dim = q.shape
    groups = q_heads // k.shape[1]
    scale = head_dim ** -0.5 if scale is None else scale
    qf = q.to(compute_dtype)
    kf, vf = (t.to(compute_dtype).repeat_interleave(groups, dim=1) for t in (k, v))
    scores = (qf @ kf.transpose(-1, -2)) * scale
    b, h = index_grids(batch, q_heads, q.device)
    q_idx = torch.arange(q_len).view(1, 1, -1, 1)
    kv_idx = torch.arange(k.shape[2]).view(1, 1, 1, -1)
    if score_mod is not None:
        scores = call_score_mod(score_mod, scores, b, h, q_idx, kv_idx)
    if mask_mod is not None:
        visible = call_mask_mod(mask_mod, b, h, q_idx, kv_idx, scores.shape).broadcast_to(scores.shape)
        scores = scores.masked_fill(~visible, -math.inf)
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    weights = torch.exp(scores - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    attended = total > 0
    safe_total = torch.where(attended, total, torch.ones_like(total))
    out = (weights / safe_total * keep.to(compute_dtype) / (1.0 - p)) @ vf
    lse = torch.where(attended, row_max + torch.log(safe_total), torch.full_like(total, -math.inf)).squeeze(-1)
    return out, lse


def _grads(outputs, inputs, grads):
    """Gradients of ``outputs`` (out, lse) against ``grads``; -inf lse rows carry no gradient."""
    return torch.autograd.grad(outputs, inputs, grads, allow_unused=True)


def assert_matches_reference(call, q, k, v, p, *, mask_mod=None, score_mod=None, context=""):
    """``call(q, k, v) -> (out, lse, keep)`` (fresh leaves requiring grad) against the float64 reference from
    its own ``keep``, forward and backward (through out and lse), under the numerics rule."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse, keep = call(*leaves)
    assert keep.dtype == torch.bool and keep.shape == (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    grad_out = torch.randn(out.shape).to(q.dtype)
    grad_lse = torch.randn(lse.shape)
    got = _grads((out, lse), leaves, (grad_out, grad_lse))
    results = {}
    for name, dtype in (("golden", torch.float64), ("baseline", q.dtype)):
        ref_leaves = [t.detach().to(dtype if name == "golden" else t.dtype).requires_grad_() for t in (q, k, v)]
        ref_out, ref_lse = reference_with_dropout(*ref_leaves, keep, p, mask_mod=mask_mod, score_mod=score_mod,
                                                  compute_dtype=dtype)
        ref_grads = _grads((ref_out, ref_lse), ref_leaves, (grad_out.to(ref_out.dtype), grad_lse.to(ref_lse.dtype)))
        results[name] = (ref_out.detach(), ref_lse.detach(), ref_grads)
    (gold_out, gold_lse, gold_grads), (base_out, base_lse, base_grads) = results["golden"], results["baseline"]
    comparisons = [compare("out", out.detach(), base_out, gold_out, FORWARD_FACTOR, q.dtype),
                   compare("lse", lse.detach(), base_lse.float(), gold_lse, FORWARD_FACTOR, q.dtype)]
    for name, mine, base, gold in zip(("dq", "dk", "dv"), got, base_grads, gold_grads):
        assert mine is not None and torch.isfinite(mine).all(), f"{name} missing or not finite {context}"
        comparisons.append(compare(name, mine, base, gold, BACKWARD_FACTOR, q.dtype))
    failed = [c for c in comparisons if not c.error <= c.bound]
    assert not failed, f"{context}: " + "; ".join(map(str, failed))
    return keep


def _padding(batch: int, length: int):
    lengths = torch.tensor([length, length * 2 // 3, length // 2, 20])[:batch]
    return padding_mask(torch.arange(length).view(1, -1) < lengths.view(-1, 1))


def _per_head_window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < 8 + 8 * h)


# name: (mask_mod, mask heads, score_mod, (Hq, Hkv), the torch route's family with gradients)
CASES = {
    "none": (None, None, None, (2, 2), "dense"),
    "causal_gqa": (causal_mask, None, None, (4, 2), "dense"),
    "padding": ("padding", None, None, (2, 2), "dense"),
    "sliding_window": (sliding_window_mask(12), None, None, (2, 2), "dense"),
    "sliding_window_softcap_gqa": (sliding_window_mask(12), None, softcap_score(4.0), (4, 2), "blockwise"),
    "padding_softcap": ("padding", None, softcap_score(4.0), (2, 1), "blockwise"),
    "per_head_window": (_per_head_window, 2, None, (2, 2), "blockwise"),
}


def _case(name: str, batch: int, q_len: int, kv_len: int, dtype=torch.float32, block=16):
    mask_mod, mask_heads, score_mod, (q_heads, kv_heads), family = CASES[name]
    if mask_mod == "padding":
        mask_mod = _padding(batch, kv_len)
    q, k, v = random_qkv(batch, q_heads, kv_heads, q_len, kv_len, 16, dtype=dtype)
    block_mask = None if mask_mod is None else ta.create_block_mask(mask_mod, batch, mask_heads, q_len, kv_len,
                                                                    BLOCK_SIZE=block)
    return q, k, v, block_mask, mask_mod, score_mod, family


# Every case in float32; bfloat16 and float64 on one case per route.
DTYPE_CASES = ([(name, torch.float32) for name in CASES]
               + [(name, torch.bfloat16) for name in ("causal_gqa", "sliding_window_softcap_gqa")]
               + [(name, torch.float64) for name in ("padding", "padding_softcap")])


@pytest.mark.parametrize("name, dtype", DTYPE_CASES)
def test_torch_routes_match_the_reference_from_the_returned_mask(name, dtype):
    q, k, v, block_mask, mask_mod, score_mod, family = _case(name, 3, 72, 72, dtype)
    p = 0.3

    def call(q, k, v):
        return ta.attention(q, k, v, block_mask=block_mask, score_mod=score_mod, enable_gqa=True, return_lse=True,
                            dropout_p=p, return_dropout_mask=True, backend="torch")

    assert ta.explain(q.requires_grad_(), k, v, block_mask=block_mask, score_mod=score_mod, enable_gqa=True,
                      backend="torch", dropout_p=p).family == family
    keep = assert_matches_reference(call, q, k, v, p, mask_mod=mask_mod, score_mod=score_mod, context=name)
    assert 0 < keep.float().mean() < 1


@pytest.mark.parametrize("name", ["padding", "causal_gqa", "sliding_window"])
def test_the_dense_route_draws_again_when_its_mask_is_over_the_budget(name, monkeypatch):
    """Over ``KEEP_BUDGET_BYTES`` the dense route stores no mask (its backward draws the decisions again) and
    does not split the batch: the same decisions, the reference's results."""
    monkeypatch.setattr(torch_dropout, "KEEP_BUDGET_BYTES", 0)
    test_torch_routes_match_the_reference_from_the_returned_mask(name, torch.float32)


@pytest.mark.parametrize("score_mod", [None, softcap_score(4.0)], ids=["dense_route", "blockwise_route"])
def test_key_and_value_of_batch_one_broadcast_over_the_query_s_batch(score_mod):
    q, _, _ = random_qkv(3, 4, 2, 40, 40, 16)
    _, k, v = random_qkv(1, 4, 2, 40, 40, 16)
    block_mask = ta.create_block_mask(causal_mask, None, None, 40, 40, BLOCK_SIZE=16)

    def call(q, k, v):
        return ta.attention(q, k, v, block_mask=block_mask, score_mod=score_mod, enable_gqa=True, return_lse=True,
                            dropout_p=0.2, return_dropout_mask=True)

    assert_matches_reference(call, q, k, v, 0.2, mask_mod=causal_mask, score_mod=score_mod, context="batch-1 K/V")


@pytest.mark.parametrize("backend", BACKENDS)
def test_uneven_lengths_and_short_queries_match_the_reference(backend):
    """Lq != Lkv, lengths that are no multiple of a block or a stream chunk, and a query short enough for the
    decode kernel without dropout (a dropout call never takes it)."""
    for q_len, kv_len in ((37, 75), (5, 50)):
        q, k, v, block_mask, mask_mod, _, _ = _case("causal_gqa", 2 if backend == "torch" else 1, q_len, kv_len)

        def call(q, k, v):
            return ta.attention(q, k, v, block_mask=block_mask, enable_gqa=True, return_lse=True, dropout_p=0.2,
                                return_dropout_mask=True, backend=backend)

        assert_matches_reference(call, q, k, v, 0.2, mask_mod=mask_mod, context=f"{backend} {q_len}x{kv_len}")
        with torch.no_grad():
            assert ta.explain(q, k, v, block_mask=block_mask, enable_gqa=True, backend=backend,
                              dropout_p=0.2).family != "decode"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["causal_gqa", "sliding_window_softcap_gqa"])
def test_interpret_and_torch_backends_match_the_reference(backend, name):
    q, k, v, block_mask, mask_mod, score_mod, _ = _case(name, 1, 40, 40, torch.float16 if backend == "interpret"
                                                        else torch.float32)

    def call(q, k, v):
        return ta.attention(q, k, v, block_mask=block_mask, score_mod=score_mod, enable_gqa=True, return_lse=True,
                            dropout_p=0.25, return_dropout_mask=True, backend=backend)

    assert_matches_reference(call, q, k, v, 0.25, mask_mod=mask_mod, score_mod=score_mod, context=f"{backend} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["none", "causal_gqa", "sliding_window_softcap_gqa"])
def test_dropout_zero_is_bitwise_the_call_without_dropout(backend, name):
    batch, length = (2, 40) if backend == "torch" else (1, 32)
    q, k, v, block_mask, _, score_mod, _ = _case(name, batch, length, length)
    grad = torch.randn(batch, q.shape[1], length, 16)
    results = []
    for kwargs in ({}, {"dropout_p": 0.0}):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out, lse = ta.attention(*leaves, block_mask=block_mask, score_mod=score_mod, enable_gqa=True,
                                return_lse=True, backend=backend, **kwargs)
        results.append((out, lse, *torch.autograd.grad(out, leaves, grad)))
        with torch.no_grad():
            results[-1] += (ta.attention(q, k, v, block_mask=block_mask, score_mod=score_mod, enable_gqa=True,
                                         backend=backend, **kwargs),)
    for without, with_zero in zip(*results):
        assert torch.equal(without, with_zero)
    out, keep = ta.attention(q, k, v, block_mask=block_mask, score_mod=score_mod, enable_gqa=True, dropout_p=0.0,
                             return_dropout_mask=True, backend=backend)
    assert keep.shape == (batch, q.shape[1], length, length) and bool(keep.all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_seed_reproduces_a_call_and_another_seed_differs(backend):
    batch, length = (2, 48) if backend == "torch" else (1, 32)   # the interpreter is slow
    q, k, v, block_mask, _, _, _ = _case("causal_gqa", batch, length, length)
    grad = torch.randn(batch, 4, length, 16)

    def run(seed):
        torch.manual_seed(seed)
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out, keep = ta.attention(*leaves, block_mask=block_mask, enable_gqa=True, dropout_p=0.4,
                                 return_dropout_mask=True, backend=backend)
        return (out, keep, *torch.autograd.grad(out, leaves, grad))

    first, again, other = run(7), run(7), run(8)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0]) and not torch.equal(first[1], other[1])
    # Each call draws its own seed: two calls in a row differ.
    torch.manual_seed(7)
    outs = [ta.attention(q, k, v, block_mask=block_mask, enable_gqa=True, dropout_p=0.4, backend=backend)
            for _ in range(2)]
    assert not torch.equal(*outs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_the_kept_fraction_is_within_five_sigma_of_one_minus_p(backend, p):
    shape = (2, 4, 4, 128, 256, 16) if backend == "torch" else (1, 2, 2, 64, 128, 16)
    _, keep = ta.attention(*random_qkv(*shape), dropout_p=p, return_dropout_mask=True, backend=backend)
    n = keep.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(float(keep.double().mean()) - (1 - p)) <= 5 * sigma
    # Independent across heads and rows: two heads' masks agree about as often as chance says.
    agree = float((keep[:, 0] == keep[:, 1]).double().mean())
    chance = p * p + (1 - p) * (1 - p)
    assert abs(agree - chance) <= 5 * math.sqrt(chance * (1 - chance) / keep[:, 0].numel())


def test_the_mean_over_many_seeds_approaches_the_output_without_dropout():
    """E[out] is the output without dropout: the mean of N calls is within 6 standard errors of it, element by
    element (the variance of one call is p / (1 - p) * sum_j P_ij^2 V_jd^2)."""
    p, calls = 0.3, 300
    q, k, v = random_qkv(1, 2, 2, 24, 40, 8)
    block_mask = ta.create_block_mask(sliding_window_mask(16), None, None, 24, 40, BLOCK_SIZE=16)
    with torch.no_grad():
        exact = ta.attention(q, k, v, block_mask=block_mask).double()
        mean = sum(ta.attention(q, k, v, block_mask=block_mask, dropout_p=p).double() for _ in range(calls)) / calls
    visible = call_mask_mod(block_mask.mask_mod, *index_grids(1, 2, "cpu"), torch.arange(24).view(1, 1, -1, 1),
                            torch.arange(40).view(1, 1, 1, -1), (1, 2, 24, 40))
    scores = (q.double() @ k.double().transpose(-1, -2) / math.sqrt(8)).masked_fill(~visible, -math.inf)
    probs = scores.softmax(-1)
    std_error = torch.sqrt(p / (1 - p) * (probs ** 2) @ (v.double() ** 2) / calls)
    assert float(((mean - exact).abs() / std_error).max()) <= 6.0
    assert float((mean - exact).abs().max()) > 0  # it is a mean of random outputs, not the exact one


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("score_mod", [None, softcap_score(4.0)], ids=["dense_route", "blockwise_route"])
def test_rows_that_see_nothing_stay_zero_with_zero_gradients(backend, score_mod):
    def late_queries(b, h, q_idx, kv_idx):
        return q_idx >= 20

    mask_mod = and_masks(causal_mask, late_queries)
    q, k, v = random_qkv(2, 2, 2, 48, 48, 16)
    block_mask = ta.create_block_mask(mask_mod, None, None, 48, 48, BLOCK_SIZE=16)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = ta.attention(*leaves, block_mask=block_mask, score_mod=score_mod, return_lse=True, dropout_p=0.5,
                            backend=backend)
    dq, dk, dv = torch.autograd.grad(out, leaves, torch.randn_like(out))
    for t in (out, dq, dk, dv):
        assert not torch.isnan(t).any()
    assert bool((out[:, :, :20] == 0).all()) and bool(torch.isinf(lse[:, :, :20]).all())
    assert bool((dq[:, :, :20] == 0).all()) and bool(dq[:, :, 20:].abs().sum() > 0)


def test_no_gradient_calls_drop_too_and_match_the_reference():
    """FlashAttention's rule: dropout applies whenever dropout_p > 0 (pass 0.0 in evaluation)."""
    for name in ("causal_gqa", "sliding_window_softcap_gqa"):
        q, k, v, block_mask, mask_mod, score_mod, _ = _case(name, 2, 40, 40)
        with torch.no_grad():
            out, keep = ta.attention(q, k, v, block_mask=block_mask, score_mod=score_mod, enable_gqa=True,
                                     dropout_p=0.3, return_dropout_mask=True)
            plain = ta.attention(q, k, v, block_mask=block_mask, score_mod=score_mod, enable_gqa=True)
        golden, _ = reference_with_dropout(q, k, v, keep, 0.3, mask_mod=mask_mod, score_mod=score_mod,
                                           compute_dtype=torch.float64)
        assert not torch.equal(out, plain)
        torch.testing.assert_close(out.double(), golden, rtol=0, atol=1e-5)


def test_a_hidden_nan_value_stays_out_of_the_dense_route():
    """A NaN value at a padded key reaches no row (the dense route hands such calls to the blockwise loop)."""
    q, k, v, block_mask, mask_mod, _, family = _case("padding", 3, 40, 40)
    v[2, :, 30] = float("nan")   # batch 2 attends to its first 20 keys only
    torch.manual_seed(3)
    out, keep = ta.attention(q, k, v, block_mask=block_mask, dropout_p=0.3, return_dropout_mask=True)
    assert family == "dense" and not torch.isnan(out).any()
    golden, _ = reference_with_dropout(q, k, v.nan_to_num(), keep, 0.3, mask_mod=mask_mod,
                                       compute_dtype=torch.float64)
    torch.testing.assert_close(out.double(), golden, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dropout_p, error", [(-0.1, ValueError), (1.0, ValueError), (float("nan"), ValueError),
                                              ("0.1", TypeError), (True, TypeError)])
def test_a_bad_dropout_p_is_an_error_naming_it(dropout_p, error):
    q, k, v = random_qkv(1, 1, 1, 8, 8, 8)
    with pytest.raises(error, match="dropout_p"):
        ta.attention(q, k, v, dropout_p=dropout_p)
    with pytest.raises(TypeError, match="return_dropout_mask"):
        ta.attention(q, k, v, dropout_p=0.1, return_dropout_mask=1)


# -- the torch backend's stream (backends/torch/dropout.py) -------------------------------------------------

def test_the_stream_is_a_function_of_the_position_only():
    """Any span, any gathered set of keys, any chunking of the rows: the same decisions as the whole mask."""
    dropout = Dropout(0.35, torch.tensor([1234567890123], dtype=torch.int64))
    batch, heads, q_len, kv_len = 2, 3, 3 * CHUNK_ROWS + 5, 3 * CHUNK_COLS + 7
    whole = keep_mask(dropout, batch, heads, q_len, kv_len, device=torch.device("cpu"))
    stream = DropoutStream(dropout, batch, heads)
    for q_start, rows, kv_start, kv_stop in ((0, q_len, 0, kv_len), (5, 21, 3, 70), (17, 1, 64, 65),
                                             (30, 23, 100, kv_len)):
        span = stream.kept_span(q_start, rows, kv_start, kv_stop, dtype=torch.bool)
        assert torch.equal(span, whole[:, :, q_start:q_start + rows, kv_start:kv_stop])
    positions = torch.tensor([[190, 3, 64, 65, 130]])                                   # any order, any chunks
    per_batch = torch.stack([positions, positions.flip(-1)]).view(2, 1, 1, 5)            # [Bm, 1, 1, L]
    for kv_idx in (positions.view(1, 1, 1, 5), per_batch):
        expected = whole[:, :, 9:21].gather(3, kv_idx.expand(batch, heads, 12, 5))
        assert torch.equal(stream.kept(9, 12, kv_idx, dtype=torch.bool), expected)
        assert torch.equal(stream.kept(9, 12, kv_idx, dtype=torch.float64), expected.double())


def test_the_stream_depends_on_the_seed_and_not_on_the_lengths():
    seed = torch.tensor([42], dtype=torch.int64)
    short = keep_mask(Dropout(0.5, seed), 1, 2, 20, 30, device=torch.device("cpu"))
    long = keep_mask(Dropout(0.5, seed), 1, 2, 50, 90, device=torch.device("cpu"))
    assert torch.equal(short, long[:, :, :20, :30])
    other = keep_mask(Dropout(0.5, seed + 1), 1, 2, 20, 30, device=torch.device("cpu"))
    assert not torch.equal(short, other)


def test_the_dense_and_blockwise_routes_drop_the_same_probabilities():
    """One seed, one mask, whichever torch route runs the call (their outputs agree to rounding)."""
    q, k, v, block_mask, _, _, _ = _case("padding", 3, 72, 72)
    from triton_attn.backends.torch.blockwise import blockwise_attention
    from triton_attn.backends.torch.dense import dense_attention

    dropout = Dropout(0.3, torch.tensor([99], dtype=torch.int64))
    dense_out, dense_lse = dense_attention(q, k, v, block_mask, mask="dense", scale=0.25, dropout=dropout)
    loop_out, loop_lse = blockwise_attention(q, k, v, block_mask, score_mod=None, scale=0.25, dropout=dropout)
    torch.testing.assert_close(dense_out, loop_out, rtol=0, atol=2e-6)
    torch.testing.assert_close(dense_lse, loop_lse, rtol=0, atol=2e-6)


def test_the_packed_mask_is_the_keep_mask_where_drawn_and_zero_elsewhere():
    dropout = Dropout(0.4, torch.tensor([7777], dtype=torch.int64))
    batch, heads, q_len, kv_len = 2, 3, 3 * CHUNK_ROWS + 5, 2 * CHUNK_COLS + 13
    whole = keep_mask(dropout, batch, heads, q_len, kv_len, device=torch.device("cpu"))
    stream = DropoutStream(dropout, batch, heads)
    chunk_keys = [3, CHUNK_COLS + 1, kv_len, 2 * CHUNK_COLS]                      # per CHUNK_ROWS query rows
    for keys_of in (None, chunk_keys):
        packed = stream.packed(q_len, kv_len, keys_of)
        assert packed.shape == (batch, heads, q_len, -(-kv_len // 8))
        for batch_entries in (slice(0, batch), slice(1, 2)):
            got = unpack(packed, batch_entries, 9, 30, kv_len - 2,
                         out=torch.empty(batch_entries.stop - batch_entries.start, heads, 30, kv_len - 2))
            expected = whole[batch_entries, :, 9:39, :kv_len - 2].double()
            if keys_of is not None:
                row_keys = torch.tensor(keys_of).repeat_interleave(CHUNK_ROWS)[9:39].view(-1, 1)
                expected = expected * (torch.arange(kv_len - 2).view(1, -1) < row_keys)
            assert torch.equal(got.double(), expected)
