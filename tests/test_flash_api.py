"""flash_attn_func / flash_attn_varlen_func against FlashAttention-2's semantics computed directly in float64
(tests/helpers/flash_reference.py), under the numerics rule: forward and backward, fp32 and bf16, head dims
32/64/80/128, Lq != Lk both ways, GQA and MQA, windows, ALiBi, softcap, non-contiguous inputs, packed batches,
dropout; on the torch and interpret backends."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import triton_attn as ta
from tests.helpers.flash_reference import flash_reference, flash_varlen_reference
from tests.helpers.numerics import BACKWARD_FACTOR, FORWARD_FACTOR, compare
from triton_attn.api import flash as flash_module


def _draw(*shape, dtype):
    return torch.randn(*shape, dtype=torch.float32).to(dtype)


def _check(name, candidate, golden, baseline, dtype, factor):
    result = compare(name, candidate, baseline, golden, factor, dtype)
    assert result.error <= result.bound, str(result)


def _check_against_reference(run, reference, q, k, v, *, backward=True, context=""):
    """``run(q, k, v) -> (out, lse)`` against ``reference(q, k, v, compute_dtype) -> (out, lse)``: the float64
    golden result and the input-dtype baseline, outputs, lse and (with ``backward``) dq, dk, dv."""
    dtype = q.dtype
    leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]  # same memory and strides as the inputs
    out, lse = run(*leaves)
    gold_in = [t.detach().double().requires_grad_(backward) for t in (q, k, v)]
    gold_out, gold_lse = reference(*gold_in, torch.float64)
    base_in = [t.detach().clone().requires_grad_(backward) for t in (q, k, v)]
    base_out, base_lse = reference(*base_in, dtype)
    assert out.dtype == dtype and out.shape == gold_out.shape, (out.dtype, out.shape, gold_out.shape)
    assert lse.dtype == torch.float32 and lse.shape == gold_lse.shape, (lse.dtype, lse.shape, gold_lse.shape)
    _check(f"out {context}", out.detach(), gold_out.detach(), base_out.detach(), dtype, FORWARD_FACTOR)
    _check(f"lse {context}", lse.detach(), gold_lse.detach(), base_lse.detach().float(), dtype, FORWARD_FACTOR)
    if not backward:
        return
    grad_out = _draw(*out.shape, dtype=dtype)
    got = torch.autograd.grad(out, leaves, grad_out)
    gold = torch.autograd.grad(gold_out, gold_in, grad_out.double())
    base = torch.autograd.grad(base_out, base_in, grad_out)
    for name, g, want, b in zip(("dq", "dk", "dv"), got, gold, base):
        assert torch.isfinite(g).all(), f"{name} has non-finite entries {context}"
        _check(f"{name} {context}", g, want, b, dtype, BACKWARD_FACTOR)


def _qkv(batch, q_len, kv_len, heads, kv_heads, dim, dtype, layout="separate"):
    if layout == "packed" and q_len == kv_len and heads == kv_heads:
        qkv = _draw(batch, q_len, 3, heads, dim, dtype=dtype)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if layout == "strided":  # [B, H, L, D] memory viewed as [B, L, H, D]
        q = _draw(batch, heads, q_len, dim, dtype=dtype).transpose(1, 2)
        k = _draw(batch, kv_heads, kv_len, dim, dtype=dtype).transpose(1, 2)
        v = _draw(batch, kv_heads, kv_len, dim, dtype=dtype).transpose(1, 2)
        return q, k, v
    return (_draw(batch, q_len, heads, dim, dtype=dtype), _draw(batch, kv_len, kv_heads, dim, dtype=dtype),
            _draw(batch, kv_len, kv_heads, dim, dtype=dtype))


# (backend, dtype, D, B, Lq, Lk, H, Hkv, causal, window, softcap, alibi, layout)
FIXED_CASES = [
    ("torch", torch.float32, 64, 2, 48, 48, 4, 4, True, (-1, -1), 0.0, None, "packed"),
    ("torch", torch.float32, 32, 2, 20, 75, 4, 2, True, (-1, -1), 0.0, None, "separate"),
    ("torch", torch.bfloat16, 80, 1, 90, 33, 6, 2, True, (8, -1), 0.0, None, "strided"),
    ("torch", torch.float32, 128, 2, 40, 64, 4, 1, False, (5, 3), 0.0, "H", "separate"),
    ("torch", torch.bfloat16, 64, 2, 64, 40, 2, 2, False, (-1, -1), 30.0, "BH", "separate"),
    ("torch", torch.float32, 64, 2, 33, 70, 4, 2, True, (16, -1), 5.0, "BH", "strided"),
    ("interpret", torch.float32, 64, 1, 48, 48, 2, 2, True, (-1, -1), 0.0, None, "packed"),
    ("interpret", torch.float32, 32, 2, 20, 75, 4, 2, True, (10, -1), 0.0, "H", "separate"),
    ("interpret", torch.bfloat16, 64, 1, 90, 40, 2, 1, True, (-1, -1), 0.0, None, "strided"),
    ("interpret", torch.float32, 80, 1, 40, 60, 2, 2, False, (6, 4), 20.0, "BH", "separate"),
    ("interpret", torch.bfloat16, 128, 1, 24, 40, 2, 1, True, (-1, -1), 10.0, None, "separate"),
]


def _slopes(kind, batch, heads):
    if kind is None:
        return None
    shape = (heads,) if kind == "H" else (batch, heads)
    return torch.rand(*shape, dtype=torch.float32) * 0.5


@pytest.mark.parametrize("case", FIXED_CASES, ids=lambda c: f"{c[0]}-{str(c[1])[6:]}-D{c[2]}-{c[4]}x{c[5]}-"
                         f"H{c[6]}:{c[7]}-causal{int(c[8])}-w{c[9][0]}_{c[9][1]}-cap{c[10]:g}-alibi{c[11]}-{c[12]}")
def test_flash_attn_func_matches_flash_attention_2_semantics(case):
    backend, dtype, dim, batch, q_len, kv_len, heads, kv_heads, causal, window, softcap, alibi, layout = case
    torch.manual_seed(hash(case[2:10]) % 1000)
    q, k, v = _qkv(batch, q_len, kv_len, heads, kv_heads, dim, dtype, layout)
    slopes = _slopes(alibi, batch, heads)
    kwargs = dict(causal=causal, window=window, softcap=softcap, alibi_slopes=slopes)

    def run(q_, k_, v_):
        out, lse, probs = ta.flash_attn_func(q_, k_, v_, causal=causal, window_size=window, softcap=softcap,
                                             alibi_slopes=slopes, return_attn_probs=True, backend=backend)
        assert probs is None
        return out, lse

    _check_against_reference(run, lambda q_, k_, v_, cd: flash_reference(q_, k_, v_, compute_dtype=cd, **kwargs),
                             q, k, v, context=str(case))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_flash_attn_func_random_calls_on_the_torch_backend(data):
    dim = data.draw(st.sampled_from([32, 64, 80, 128]))
    heads_kv = data.draw(st.sampled_from([(4, 4), (4, 2), (4, 1), (2, 1)]))
    q_len, kv_len = data.draw(st.integers(1, 130)), data.draw(st.integers(1, 130))
    causal = data.draw(st.booleans())
    window = (data.draw(st.integers(-1, 40)), data.draw(st.integers(-1, 40)))
    softcap = data.draw(st.sampled_from([0.0, 0.0, 15.0]))
    alibi = data.draw(st.sampled_from([None, "H", "BH"]))
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]))
    layout = data.draw(st.sampled_from(["separate", "strided"]))
    torch.manual_seed(data.draw(st.integers(0, 10_000)))
    q, k, v = _qkv(2, q_len, kv_len, heads_kv[0], heads_kv[1], dim, dtype, layout)
    slopes = _slopes(alibi, 2, heads_kv[0])
    kwargs = dict(causal=causal, window=window, softcap=softcap, alibi_slopes=slopes)

    def run(q_, k_, v_):
        out, lse, _ = ta.flash_attn_func(q_, k_, v_, causal=causal, window_size=window, softcap=softcap,
                                         alibi_slopes=slopes, return_attn_probs=True, backend="torch")
        return out, lse

    _check_against_reference(run, lambda q_, k_, v_, cd: flash_reference(q_, k_, v_, compute_dtype=cd, **kwargs),
                             q, k, v, context=f"D{dim} {heads_kv} {q_len}x{kv_len} {kwargs} {dtype} {layout}")


@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_rows_that_see_no_key_give_zero_output_minus_inf_lse_and_zero_gradients(backend):
    # causal with Lq > Lk: the first Lq - Lk rows see nothing (FlashAttention-2's docstring example: 5 x 2)
    torch.manual_seed(0)
    q, k, v = (_draw(1, 5, 2, 16, dtype=torch.float32).requires_grad_(True),
               _draw(1, 2, 2, 16, dtype=torch.float32).requires_grad_(True),
               _draw(1, 2, 2, 16, dtype=torch.float32).requires_grad_(True))
    out, lse, _ = ta.flash_attn_func(q, k, v, causal=True, return_attn_probs=True, backend=backend)
    assert torch.equal(out[0, :3], torch.zeros_like(out[0, :3]))
    assert torch.isneginf(lse[0, :, :3]).all() and torch.isfinite(lse[0, :, 3:]).all()
    out.sum().backward()
    assert torch.equal(q.grad[0, :3], torch.zeros_like(q.grad[0, :3]))
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_a_slice_of_packed_qkv_is_not_copied(monkeypatch):
    seen = {}
    real = flash_module.attention

    def spy(query, key, value, **kwargs):
        seen["ptrs"] = (query.data_ptr(), key.data_ptr(), value.data_ptr())
        return real(query, key, value, **kwargs)

    monkeypatch.setattr(flash_module, "attention", spy)
    qkv = torch.randn(2, 40, 3, 4, 32)
    out = flash_module.flash_attn_qkvpacked_func(qkv, causal=True)
    assert seen["ptrs"] == (qkv[:, :, 0].data_ptr(), qkv[:, :, 1].data_ptr(), qkv[:, :, 2].data_ptr())
    expected = ta.flash_attn_func(qkv[:, :, 0].contiguous(), qkv[:, :, 1].contiguous(), qkv[:, :, 2].contiguous(),
                                  causal=True)
    torch.testing.assert_close(out, expected)
    assert out.is_contiguous() and out.shape == (2, 40, 4, 32)


# -- varlen ----------------------------------------------------------------------------------------------

def _packed(lengths_q, lengths_k, heads, kv_heads, dim, dtype):
    cu_q = torch.tensor([0] + list(torch.tensor(lengths_q).cumsum(0).tolist()), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lengths_k).cumsum(0).tolist()), dtype=torch.int32)
    q = _draw(int(cu_q[-1]), heads, dim, dtype=dtype)
    k = _draw(int(cu_k[-1]), kv_heads, dim, dtype=dtype)
    v = _draw(int(cu_k[-1]), kv_heads, dim, dtype=dtype)
    return q, k, v, cu_q, cu_k


# (backend, dtype, D, lengths_q, lengths_k, H, Hkv, causal, window, softcap, alibi)
VARLEN_CASES = [
    ("torch", torch.float32, 64, [37, 1, 120, 64], [37, 1, 120, 64], 4, 2, True, (-1, -1), 0.0, None),
    ("torch", torch.bfloat16, 32, [5, 200, 17], [50, 180, 3], 4, 1, True, (12, -1), 0.0, "BH"),
    ("torch", torch.float32, 80, [130, 9, 1], [1, 40, 300], 2, 2, False, (-1, -1), 25.0, "H"),
    ("torch", torch.float32, 128, [64, 64, 3], [64, 100, 7], 2, 1, False, (4, 6), 0.0, None),
    ("interpret", torch.float32, 64, [37, 1, 90, 50], [37, 1, 90, 50], 2, 1, True, (-1, -1), 0.0, None),
    ("interpret", torch.bfloat16, 32, [5, 100, 17], [40, 80, 3], 2, 2, True, (10, -1), 10.0, "BH"),
    ("interpret", torch.float32, 80, [60, 1, 9], [1, 70, 120], 2, 1, False, (5, 5), 0.0, "H"),
]


@pytest.mark.parametrize("case", VARLEN_CASES, ids=lambda c: f"{c[0]}-{str(c[1])[6:]}-D{c[2]}-{c[3]}x{c[4]}-"
                         f"causal{int(c[7])}-w{c[8][0]}_{c[8][1]}-cap{c[9]:g}-alibi{c[10]}")
def test_flash_attn_varlen_func_matches_flash_attention_2_semantics(case):
    backend, dtype, dim, lengths_q, lengths_k, heads, kv_heads, causal, window, softcap, alibi = case
    torch.manual_seed(sum(lengths_q) + dim)
    q, k, v, cu_q, cu_k = _packed(lengths_q, lengths_k, heads, kv_heads, dim, dtype)
    slopes = _slopes(alibi, len(lengths_q), heads)
    kwargs = dict(causal=causal, window=window, softcap=softcap, alibi_slopes=slopes)

    def run(q_, k_, v_):
        out, lse, _ = ta.flash_attn_varlen_func(q_, k_, v_, cu_q, cu_k, max(lengths_q), max(lengths_k),
                                                causal=causal, window_size=window, softcap=softcap,
                                                alibi_slopes=slopes, return_attn_probs=True, backend=backend)
        return out, lse

    _check_against_reference(
        run, lambda q_, k_, v_, cd: flash_varlen_reference(q_, k_, v_, cu_q, cu_k, compute_dtype=cd, **kwargs),
        q, k, v, context=str(case))


def test_varlen_with_a_block_table_reads_keys_from_their_pages():
    torch.manual_seed(3)
    lengths = [20, 47, 5]
    page, heads, dim = 16, 2, 32
    q, k, v, cu_q, cu_k = _packed(lengths, lengths, heads, heads, dim, torch.float32)
    pages_per_seq = [math.ceil(n / page) for n in lengths]
    order = torch.randperm(sum(pages_per_seq) + 2)
    k_cache, v_cache = torch.randn(len(order), page, heads, dim), torch.randn(len(order), page, heads, dim)
    table = torch.zeros(len(lengths), max(pages_per_seq), dtype=torch.int32)
    used = 0
    for s, n in enumerate(lengths):
        for p in range(pages_per_seq[s]):
            table[s, p] = int(order[used])
            rows = slice(int(cu_k[s]) + p * page, min(int(cu_k[s + 1]), int(cu_k[s]) + (p + 1) * page))
            count = rows.stop - rows.start
            k_cache[table[s, p], :count], v_cache[table[s, p], :count] = k[rows], v[rows]
            used += 1
    out = ta.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, max(lengths), max(lengths), causal=True,
                                    block_table=table)
    expected, _ = flash_varlen_reference(q, k, v, cu_q, cu_k, causal=True)
    torch.testing.assert_close(out, expected.float(), atol=2e-5, rtol=2e-5)


# -- dropout ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_flash_attn_func_dropout_equals_the_reference_with_the_same_keep_mask(backend):
    torch.manual_seed(11)
    q, k, v = _qkv(1, 24, 40, 2, 1, 32, torch.float32)
    p = 0.3
    torch.manual_seed(5)
    out_a, keep = ta.flash_attn_func(q, k, v, dropout_p=p, causal=True, backend=backend, return_dropout_mask=True)
    torch.manual_seed(5)
    out_b = ta.flash_attn_func(q, k, v, dropout_p=p, causal=True, backend=backend)
    assert torch.equal(out_a, out_b)  # a fixed seed reproduces the call bitwise
    assert keep.shape == (1, 2, 24, 40) and keep.dtype == torch.bool

    def run(q_, k_, v_):
        torch.manual_seed(5)
        out, _ = ta.flash_attn_func(q_, k_, v_, dropout_p=p, causal=True, backend=backend, return_dropout_mask=True)
        # the lse is the softmax's without dropout
        _, lse, _ = ta.flash_attn_func(q_.detach(), k_.detach(), v_.detach(), causal=True, backend=backend,
                                       return_attn_probs=True)
        return out, lse

    _check_against_reference(
        run, lambda q_, k_, v_, cd: flash_reference(q_, k_, v_, causal=True, keep=keep, dropout_p=p,
                                                    compute_dtype=cd), q, k, v, context="dropout")


def test_flash_attn_varlen_func_dropout_uses_packed_positions():
    torch.manual_seed(2)
    q, k, v, cu_q, cu_k = _packed([30, 7, 50], [30, 7, 50], 2, 2, 32, torch.float32)
    torch.manual_seed(9)
    out, keep = ta.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 50, 50, dropout_p=0.2, causal=True,
                                          return_dropout_mask=True)
    assert keep.shape == (1, 2, 87, 87)
    keeps = [keep[:, :, a:b, a:b] for a, b in zip(cu_q.tolist(), cu_q.tolist()[1:])]
    expected, _ = flash_varlen_reference(q, k, v, cu_q, cu_k, causal=True, keeps=keeps, dropout_p=0.2)
    torch.testing.assert_close(out, expected.float(), atol=2e-5, rtol=2e-5)


def test_return_attn_probs_with_dropout_raises_rather_than_returning_something_else():
    q, k, v = _qkv(1, 8, 8, 2, 2, 16, torch.float32)
    with pytest.raises(NotImplementedError, match="return_attn_probs"):
        ta.flash_attn_func(q, k, v, dropout_p=0.1, return_attn_probs=True)


# -- errors ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(window_size=(3,)), ValueError, "window_size"),
    (dict(window_size=(-2, 0)), ValueError, "window_size"),
    (dict(alibi_slopes=torch.rand(3)), ValueError, "alibi_slopes"),
    (dict(alibi_slopes=torch.rand(2, dtype=torch.float64)), TypeError, "alibi_slopes"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
    (dict(softmax_scale=float("nan")), ValueError, "softmax_scale"),
    (dict(causal=1), TypeError, "causal"),
])
def test_bad_arguments_are_errors_naming_them(kwargs, error, match):
    q, k, v = _qkv(1, 8, 8, 2, 2, 16, torch.float32)
    with pytest.raises(error, match=match):
        ta.flash_attn_func(q, k, v, **kwargs)


def test_bad_tensors_and_cu_seqlens_are_errors_naming_them():
    q, k, v = _qkv(1, 8, 8, 4, 4, 16, torch.float32)
    with pytest.raises(ValueError, match="heads in q"):
        ta.flash_attn_func(q, k[:, :, :3], v[:, :, :3])
    with pytest.raises(ValueError, match="q must be 4-D"):
        ta.flash_attn_func(q[0], k, v)
    with pytest.raises(TypeError, match="k must be float16"):
        ta.flash_attn_func(q, k.double(), v)
    qp, kp, vp, cu_q, cu_k = _packed([3, 5], [3, 5], 2, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="cu_seqlens_q must be an int32"):
        ta.flash_attn_varlen_func(qp, kp, vp, cu_q.long(), cu_k, 5, 5)
    with pytest.raises(ValueError, match="cu_seqlens_k must start at 0"):
        ta.flash_attn_varlen_func(qp, kp, vp, cu_q, torch.tensor([0, 3, 7], dtype=torch.int32), 5, 5)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        ta.flash_attn_varlen_func(qp, kp, vp, cu_q, cu_k, 4, 5)


@pytest.mark.parametrize("with_grad", [False, True])
def test_cpu_runs_of_sequences_equal_the_packed_layout(monkeypatch, with_grad):
    # On CPU the torch backend attends run by run (views, one call per run of equal lengths); the packed layout
    # route (the one the kernels take) must give the same result.
    torch.manual_seed(4)
    lengths_q, lengths_k = [20, 20, 20, 7, 33, 33, 1], [20, 20, 20, 30, 33, 33, 9]
    q, k, v, cu_q, cu_k = _packed(lengths_q, lengths_k, 4, 2, 32, torch.float32)
    slopes = torch.rand(len(lengths_q), 4)
    runs = flash_module.equal_length_runs(cu_q, cu_k)
    assert [r[1] for r in runs] == [3, 1, 2, 1]

    def call(max_runs):
        monkeypatch.setattr(flash_module, "MAX_SEQUENCE_RUNS", max_runs)
        inputs = [t.detach().requires_grad_(with_grad) for t in (q, k, v)]
        out, lse, _ = ta.flash_attn_varlen_func(*inputs, cu_q, cu_k, 33, 33, causal=True, window_size=(9, -1),
                                                softcap=12.0, alibi_slopes=slopes, return_attn_probs=True)
        grads = torch.autograd.grad(out, inputs, torch.ones_like(out)) if with_grad else ()
        return out, lse, grads

    by_runs, packed = call(64), call(0)
    for a, b in zip([by_runs[0], by_runs[1], *by_runs[2]], [packed[0], packed[1], *packed[2]]):
        torch.testing.assert_close(a, b, atol=3e-5, rtol=3e-5)
