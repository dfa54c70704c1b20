"""One route per call (triton_attn/dispatch.py): which path each kind of call takes, that the route is what
runs, that it can be printed, and that the CPU routes to PyTorch's fused attention are exact."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import triton_attn as ta
from tests.helpers.numerics import assert_matches_golden, random_qkv
from triton_attn import cli
from triton_attn.dispatch import SDPA_DTYPES, Route
from triton_attn.masks import (
    and_masks,
    causal_mask,
    document_mask,
    padding_mask,
    prefix_lm_mask,
    sliding_window_mask,
    softcap_score,
)
from triton_attn.reference import dense_attention


def _route(q, k, v, mod=None, *, grad=False, score_mod=None, backend=None, heads=None, block=16, **kwargs):
    block_mask = None if mod is None else ta.create_block_mask(mod, None, heads, q.shape[2], k.shape[2],
                                                                BLOCK_SIZE=block, **kwargs)
    with torch.set_grad_enabled(grad):
        query = q.detach().requires_grad_(grad)
        return ta.explain(query, k, v, block_mask=block_mask, score_mod=score_mod, backend=backend,
                          enable_gqa=q.shape[1] != k.shape[1])


def _table_row(route: Route) -> tuple:
    return route.backend, route.family, route.call, route.backward, route.sdpa_mask


def test_the_route_table_on_cpu():
    q, k, v = random_qkv(1, 4, 2, 64, 64, 16)
    # training on the torch backend: PyTorch's fused attention where it is exact, else the blockwise loop
    assert _table_row(_route(q, k, v, grad=True)) == ("torch", "sdpa", "direct", "sdpa", "none")
    assert _table_row(_route(q, k, v, causal_mask, grad=True)) == ("torch", "sdpa", "direct", "sdpa", "causal")
    assert _table_row(_route(q, k, v, sliding_window_mask(9), grad=True)) == ("torch", "sdpa", "direct", "sdpa",
                                                                              "dense")
    assert _table_row(_route(q, k, v, causal_mask, grad=True, score_mod=softcap_score(5.0))) == (
        "torch", "blockwise", "op", "blockwise", "")
    assert _table_row(_route(q, k, v, causal_mask, grad=True, heads=4)) == ("torch", "blockwise", "op", "blockwise",
                                                                            "")
    # inference: no mask through PyTorch's kernel with no bias; masks through the cached tile bias
    assert _table_row(_route(q, k, v)) == ("torch", "sdpa", "direct", "none", "none")
    assert _table_row(_route(q, k, v, causal_mask)) == ("torch", "cpu_flash", "direct", "none", "")
    assert _table_row(_route(q.half(), k.half(), v.half(), causal_mask)) == ("torch", "sdpa", "direct", "none",
                                                                             "causal")
    assert _table_row(_route(q, k, v, causal_mask, score_mod=softcap_score(5.0))) == (
        "torch", "blockwise", "direct", "none", "")
    # compact masks keep the direct route (the ops take dense index lists)
    compact = _route(q, k, v, prefix_lm_mask(20), grad=True, layout="compact", score_mod=softcap_score(5.0))
    assert (compact.family, compact.call) == ("blockwise", "direct")


def test_the_route_table_on_the_triton_backends():
    q, k, v = random_qkv(1, 4, 2, 64, 64, 16)
    assert _table_row(_route(q, k, v, causal_mask, backend="interpret")) == ("interpret", "prefill", "op", "none", "")
    assert _table_row(_route(q[:, :, :16], k, v, backend="interpret")) == ("interpret", "decode", "op", "none", "")
    assert _table_row(_route(q[:, :, :17], k, v, backend="interpret")) == ("interpret", "prefill", "op", "none", "")
    assert _table_row(_route(q, k, v, causal_mask, grad=True, backend="interpret")) == (
        "interpret", "prefill", "op", "kernels", "")
    assert _route(q, k, v, causal_mask, grad=True, backend="interpret").saves_stats
    learned = torch.randn(64, requires_grad=True)

    def learned_bias(score, b, h, q_idx, kv_idx):
        return score + learned[kv_idx]

    route = _route(q, k, v, causal_mask, grad=True, backend="interpret", score_mod=learned_bias)
    assert _table_row(route) == ("interpret", "prefill", "direct", "blockwise", "")
    with pytest.raises(TypeError, match="float16, bfloat16 or float32 on backend 'interpret'"):
        _route(q.double(), k.double(), v.double(), backend="interpret")


def _dropout_route(q, k, v, mod=None, *, grad=False, score_mod=None, backend=None, heads=None):
    block_mask = None if mod is None else ta.create_block_mask(mod, None, heads, q.shape[2], k.shape[2], BLOCK_SIZE=16)
    with torch.set_grad_enabled(grad):
        return ta.explain(q.detach().requires_grad_(grad), k, v, block_mask=block_mask, score_mod=score_mod,
                          backend=backend, enable_gqa=q.shape[1] != k.shape[1], dropout_p=0.1)


def test_the_route_table_with_dropout():
    """Dropout never takes PyTorch's fused kernels nor the decode kernel (neither gives the keep mask);
    the torch backend's dense route takes the masks sdpa would, the blockwise loop the rest."""
    q, k, v = random_qkv(1, 4, 2, 64, 64, 16)
    for grad in (False, True):
        backward = "dense" if grad else "none"
        assert _table_row(_dropout_route(q, k, v, grad=grad)) == ("torch", "dense", "direct", backward, "none")
        assert _table_row(_dropout_route(q, k, v, causal_mask, grad=grad)) == ("torch", "dense", "direct", backward,
                                                                               "causal")
        assert _table_row(_dropout_route(q, k, v, sliding_window_mask(9), grad=grad)) == (
            "torch", "dense", "direct", backward, "dense")
        blockwise = _dropout_route(q, k, v, causal_mask, grad=grad, score_mod=softcap_score(5.0))
        assert _table_row(blockwise) == ("torch", "blockwise", "direct" if not grad else "op",
                                         "blockwise" if grad else "none", "")
        assert _dropout_route(q, k, v, causal_mask, grad=grad, heads=4).family == "blockwise"
    route = _dropout_route(q, k, v, causal_mask, grad=True)
    assert any("dropout" in reason for reason in route.reasons)
    assert route is _dropout_route(q, k, v, causal_mask, grad=True)  # interned: one object per distinct route
    # Rows of keys too long to hold 16 query rows' scores at once: the blockwise loop.
    long_q, long_kv = torch.empty(64, 16, 16, 8), torch.empty(64, 16, 2048, 8)   # (only shapes are read)
    assert _dropout_route(long_q, long_kv, long_kv).family == "blockwise"
    # The Triton backends: the prefill kernels at any query length.
    for length in (16, 64):
        assert _table_row(_dropout_route(q[:, :, :length], k, v, backend="interpret")) == (
            "interpret", "prefill", "op", "none", "")
    assert _table_row(_dropout_route(q, k, v, causal_mask, grad=True, backend="interpret")) == (
        "interpret", "prefill", "op", "kernels", "")
    assert Route.from_token("torch/dense/dense") == Route("torch", "dense", "op", "dense")


def test_a_dropout_call_runs_the_route_it_plans(monkeypatch):
    from triton_attn.backends import run

    ran = []
    original = run.forward
    monkeypatch.setattr(run, "forward", lambda route, *a, **kw: ran.append((route.token, kw["dropout"] is not None))
                        or original(route, *a, **kw))
    q, k, v = random_qkv(1, 2, 2, 40, 40, 16)
    for mod, score_mod in ((causal_mask, None), (causal_mask, softcap_score(5.0))):
        block_mask = ta.create_block_mask(mod, None, None, 40, 40, BLOCK_SIZE=16)
        for grad, backend in ((False, "torch"), (True, "torch"), (False, "interpret"), (True, "interpret")):
            with torch.set_grad_enabled(grad):
                query = q.detach().requires_grad_(grad)
                planned = ta.explain(query, k, v, block_mask=block_mask, score_mod=score_mod, backend=backend,
                                     dropout_p=0.2)
                ran.clear()
                out = ta.attention(query, k, v, block_mask=block_mask, score_mod=score_mod, backend=backend,
                                   dropout_p=0.2)
                if grad:
                    out.sum().backward()
            assert ran == [(planned.token, True)], (planned, ran)


def test_route_tokens_round_trip_and_reject_what_is_not_a_route():
    route = Route("interpret", "decode", "op", "none", "", ("why",))
    assert Route.from_token(route.token) == Route("interpret", "decode", "op", "none")
    assert Route.from_token(route.token) is Route.from_token(route.token)
    with pytest.raises(ValueError, match="not a route"):
        Route.from_token("cuda/decode/none")


def test_the_sdpa_dtypes_are_the_backend_s():
    from triton_attn.backends.torch import sdpa

    assert set(SDPA_DTYPES) == set(sdpa.SDPA_DTYPES)


def test_the_route_that_is_planned_is_the_route_that_runs(monkeypatch):
    from triton_attn.backends import run

    ran = []
    original = run.forward
    monkeypatch.setattr(run, "forward", lambda route, *a, **kw: ran.append(route.token) or original(route, *a, **kw))
    q, k, v = random_qkv(1, 2, 2, 40, 40, 16)
    block_mask = ta.create_block_mask(causal_mask, None, None, 40, 40, BLOCK_SIZE=16)
    for grad, backend in ((False, "torch"), (True, "torch"), (False, "interpret"), (True, "interpret")):
        with torch.set_grad_enabled(grad):
            query = q.detach().requires_grad_(grad)
            planned = ta.explain(query, k, v, block_mask=block_mask, backend=backend)
            ran.clear()
            out = ta.attention(query, k, v, block_mask=block_mask, backend=backend)
            if grad:
                out.sum().backward()
        assert ran == [planned.token], (planned, ran)


@pytest.mark.parametrize("case", ["none", "causal", "causal_gqa_lse", "padding", "document_sliding"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_routes_match_the_golden_result_forward_and_backward(case, dtype):
    q, k, v = random_qkv(2, 4, 4 if case != "causal_gqa_lse" else 2, 70, 70, 16, dtype=dtype)
    mod = None
    if case.startswith("causal"):
        mod = causal_mask
    elif case == "padding":
        keep = torch.arange(70).view(1, -1) >= torch.tensor([0, 25]).view(-1, 1)
        mod = and_masks(causal_mask, padding_mask(keep))
    elif case == "document_sliding":
        mod = and_masks(sliding_window_mask(12), document_mask(torch.arange(70) // 30))
    batch = 2 if case == "padding" else None
    block_mask = None if mod is None else ta.create_block_mask(mod, batch, None, 70, 70, BLOCK_SIZE=16)
    route = ta.explain(q.requires_grad_(), k, v, block_mask=block_mask, enable_gqa=True)
    assert route.family == "sdpa", route
    assert_matches_golden(lambda q_, k_, v_: ta.attention(q_, k_, v_, block_mask=block_mask, enable_gqa=True,
                                                          return_lse=case == "causal_gqa_lse"),
                          q, k, v, mask_mod=mod)


def test_sdpa_route_with_rows_that_see_nothing():
    q, k, v = random_qkv(2, 2, 2, 48, 48, 16)
    keep = torch.ones(2, 48, dtype=torch.bool)
    keep[1, :20] = False                      # with causality, rows 0-19 of sequence 1 see no key
    mod = and_masks(causal_mask, padding_mask(keep))
    block_mask = ta.create_block_mask(mod, 2, None, 48, 48, BLOCK_SIZE=16)
    q.requires_grad_()
    out, lse = ta.attention(q, k, v, block_mask=block_mask, return_lse=True)
    assert ta.explain(q, k, v, block_mask=block_mask).family == "sdpa"
    assert torch.all(out[1, :, :20] == 0) and torch.all(lse[1, :, :20] == float("-inf"))
    (out.sum() + lse[0].sum()).backward()
    assert torch.isfinite(q.grad).all() and torch.all(q.grad[1, :, :20] == 0)


def test_sdpa_causal_route_keeps_hidden_nan_values_out_in_training():
    q, k, v = random_qkv(1, 2, 2, 64, 64, 16)
    v[:, :, 40, 3] = float("nan")                                  # hidden from rows 0-39 by causality
    block_mask = ta.create_block_mask(causal_mask, None, None, 64, 64, BLOCK_SIZE=16)
    q.requires_grad_()
    assert ta.explain(q, k, v, block_mask=block_mask).sdpa_mask == "causal"
    out = ta.attention(q, k, v, block_mask=block_mask)
    golden, _ = dense_attention(q.detach(), k, v.masked_fill(torch.isnan(v), 0.0), mask_mod=causal_mask,
                                compute_dtype=torch.float64)
    assert not torch.isnan(out[:, :, :40]).any() and torch.isnan(out[:, :, 40:, 3]).all()
    torch.testing.assert_close(out[:, :, :40].double(), golden[:, :, :40], rtol=0, atol=1e-5)


def test_route_log_prints_each_route_once(capfd, monkeypatch):
    monkeypatch.setenv("TRITON_ATTN_LOG", "route")
    q, k, v = random_qkv(1, 2, 2, 24, 24, 8, dtype=torch.float64)  # a route no other test logs first
    monkeypatch.setattr("triton_attn.dispatch._LOGGED", set())
    for _ in range(3):
        ta.attention(q, k, v, score_mod=softcap_score(7.0))
    err = capfd.readouterr().err
    assert err.count("triton_attn route:") == 1 and "family=blockwise" in err and "backend=torch" in err
    monkeypatch.delenv("TRITON_ATTN_LOG")
    ta.attention(q[:, :, :5], k, v, score_mod=softcap_score(7.0))
    assert "route" not in capfd.readouterr().err


def test_explain_command_prints_the_route(capsys):
    assert cli.main(["explain", "causal", "--seq-len", "256", "--device", "cpu", "--grad"]) == 0
    out = capsys.readouterr().out
    assert "family   sdpa (mask: causal)" in out and "backward sdpa" in out and "why:" in out
    assert cli.main(["explain", "softcap", "--seq-len", "256", "--q-len", "1", "--device", "cpu", "--backend",
                     "interpret", "--heads", "4", "--kv-heads", "2", "--dtype", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "family   decode" in out and "backward none" in out
    assert cli.main(["explain", "causal", "--q-len", "9", "--seq-len", "4", "--device", "cpu"]) == 2
    assert "--q-len (9) must be at most --seq-len (4)" in capsys.readouterr().err


def test_importing_the_package_plans_nothing_and_imports_no_triton():
    code = ("import sys, triton_attn as ta; ta.attention; import triton_attn.dispatch, triton_attn.backends.run; "
            "print('triton' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_large_training_masks_go_dense_only_when_most_tiles_are_computed():
    """Above the small-mask limit a training mask takes PyTorch's dense kernel when >= 35% of its tiles are
    computed (prefix-LM), and stays block-sparse when most tiles are skipped (sliding window, documents)."""
    length = 2304                                                  # 2304^2 > 4M mask elements
    q = torch.randn(1, 1, length, 8, requires_grad=True)
    k = v = torch.randn(1, 1, length, 8)
    cases = {"dense": prefix_lm_mask(length // 4), "": sliding_window_mask(128),
             "no": and_masks(causal_mask, document_mask(torch.arange(length) // 256))}
    for expected, mod in cases.items():
        block_mask = ta.create_block_mask(mod, None, None, length, length)
        route = ta.explain(q, k, v, block_mask=block_mask)
        if expected == "dense":
            assert (route.family, route.sdpa_mask) == ("sdpa", "dense"), (block_mask.sparsity(), route)
        else:
            assert route.family == "blockwise", (block_mask.sparsity(), route)
    with torch.no_grad():  # inference keeps the tile route
        assert ta.explain(q, k, v, block_mask=ta.create_block_mask(cases["dense"], None, None, length,
                                                                   length)).family == "cpu_flash"
