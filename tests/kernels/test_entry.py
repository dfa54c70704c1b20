"""The kernels' entry points (``kernels/entry.py``): one per family, tuned config, then launch.

Under the interpreter each entry runs its own family's kernel, checked against the float64 golden
result; the launchers decide no route (a one-row query given to the prefill launcher runs the
prefill kernel). Compiled launches (``interpret=False``; the launch itself is replaced, there is no
GPU here) take the tuning cache's winner stored under the key the launchers have always used.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import triton_attn as ta
from tests.helpers.numerics import assert_matches_golden, random_qkv
from tests.helpers.paged_cases import contiguous_kv, logical_mask, make_paged
from triton_attn.masks import causal_mask, softcap_score

pytest.importorskip("triton")

from triton_attn.kernels import entry  # noqa: E402
from triton_attn.kernels.attention import backward_launch, forward_launch  # noqa: E402
from triton_attn.kernels.attention.configs import KernelConfig  # noqa: E402
from triton_attn.kernels.decode import launch as decode_launch  # noqa: E402
from triton_attn.kernels.decode.paged import paged_problem  # noqa: E402
from triton_attn.kernels.host import fast_tanh, plan_mask, trace_score  # noqa: E402
from triton_attn.kernels.jit import functions  # noqa: E402
from triton_attn.kernels.tuned import decode_key  # noqa: E402
from triton_attn.kernels.tuning import search as tuning  # noqa: E402


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh tuning cache (and no winners remembered from other tests); searches stay off."""
    monkeypatch.setenv("TRITON_ATTN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TRITON_ATTN_AUTOTUNE", raising=False)
    tuning.autotuner().forget_memory()
    yield tuning.autotuner().cache
    tuning.autotuner().forget_memory()


def at_offset(mask_mod, offset: int):
    def shifted(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx + offset, kv_idx)
    shifted.__name__ = f"{mask_mod.__name__}_at_{offset}"
    return shifted


def recorded(monkeypatch, module):
    """Replace ``module.launch`` by one that records (kernel, named arguments, options) and still runs."""
    calls = []
    original = module.launch

    def record(kernel, grid, named, **options):
        calls.append((kernel, named, options))
        if options.get("interpret"):
            original(kernel, grid, named, **options)

    monkeypatch.setattr(module, "launch", record)
    return calls


# ---------------------------------------------------------------------------------------------
# Each entry runs its family's kernel; launchers decide no route
# ---------------------------------------------------------------------------------------------

def test_prefill_launcher_runs_the_prefill_kernel_for_a_one_row_query(monkeypatch):
    """Before issue 21 the prefill launcher sent short queries to the decode kernel by itself."""
    def no_decode(*args, **kwargs):
        raise AssertionError("the prefill launcher took the decode kernel")

    monkeypatch.setattr(decode_launch, "decode_attention", no_decode)
    monkeypatch.setattr(decode_launch, "run_decode", no_decode, raising=False)
    calls = recorded(monkeypatch, forward_launch)
    q, k, v = random_qkv(1, 4, 2, 1, 90, 16)
    mask_mod = at_offset(causal_mask, 89)
    block_mask = ta.create_block_mask(mask_mod, None, None, 1, 90, BLOCK_SIZE=32)

    def candidate(q_, k_, v_):
        return forward_launch.attention_forward(q_, k_, v_, block_mask, score_mod=None, scale=0.25, interpret=True)

    assert_matches_golden(candidate, q, k, v, mask_mod=mask_mod, scale=0.25, backward=False)
    from triton_attn.kernels.attention.forward import attention_forward_kernel

    assert [kernel for kernel, _, _ in calls] == [attention_forward_kernel]


@pytest.mark.parametrize("family", ["prefill", "decode"])
def test_forward_entries_run_their_kernel(monkeypatch, family):
    from triton_attn.kernels.attention.forward import attention_forward_kernel
    from triton_attn.kernels.decode.kernel import decode_split_kernel

    calls = {"prefill": recorded(monkeypatch, forward_launch), "decode": recorded(monkeypatch, decode_launch)}
    q, k, v = random_qkv(1, 8, 2, 5, 150, 32, dtype=torch.float16)
    mask_mod, score_mod = at_offset(causal_mask, 145), softcap_score(4.0)
    block_mask = ta.create_block_mask(mask_mod, None, None, 5, 150, BLOCK_SIZE=64)
    run = entry.prefill_forward if family == "prefill" else entry.decode_forward

    def candidate(q_, k_, v_):
        return run(q_, k_, v_, block_mask, score_mod=score_mod, scale=32 ** -0.5, interpret=True)

    assert_matches_golden(candidate, q, k, v, mask_mod=mask_mod, score_mod=score_mod, backward=False)
    expected = attention_forward_kernel if family == "prefill" else decode_split_kernel
    other = "decode" if family == "prefill" else "prefill"
    assert calls[family] and calls[family][0][0] is expected and not calls[other]


def test_prefill_forward_and_backward_entries_give_golden_gradients():
    class Entries(torch.autograd.Function):
        @staticmethod
        def forward(ctx, query, key, value, block_mask):
            stats = entry.new_softmax_stats(query)
            out, lse = entry.prefill_forward(query, key, value, block_mask, score_mod=None, scale=0.25,
                                             interpret=True, stats=stats)
            ctx.save_for_backward(query, key, value, out, lse, stats)
            ctx.block_mask = block_mask
            return out, lse

        @staticmethod
        def backward(ctx, grad_out, grad_lse):
            query, key, value, out, lse, stats = ctx.saved_tensors
            grads = entry.prefill_backward(query, key, value, out, lse, grad_out, grad_lse, ctx.block_mask,
                                           score_mod=None, scale=0.25, interpret=True, softmax_stats=stats)
            return (*grads, None)

    q, k, v = random_qkv(1, 2, 1, 64, 80, 16)
    block_mask = ta.create_block_mask(causal_mask, None, None, 64, 80, BLOCK_SIZE=32)
    assert_matches_golden(lambda q_, k_, v_: Entries.apply(q_, k_, v_, block_mask), q, k, v,
                          mask_mod=causal_mask, scale=0.25)


def test_paged_entry_matches_the_golden_result_over_the_pages():
    inputs = make_paged([70, 33], q_len=3, q_heads=4, kv_heads=2, head_dim=16, page_size=16)
    key, value = contiguous_kv(inputs)

    def candidate(q_, k_, v_):
        return entry.paged_forward(q_, inputs.key_cache, inputs.value_cache, inputs.page_table, inputs.kv_lens,
                                   mask_mod=None, score_mod=None, scale=0.25, interpret=True)

    assert_matches_golden(candidate, inputs.query, key, value, mask_mod=logical_mask(None, inputs.kv_lens, 3),
                          scale=0.25, backward=False)


# ---------------------------------------------------------------------------------------------
# Compiled launches take the cached winner, under the launchers' tuning keys
# ---------------------------------------------------------------------------------------------

WINNER = KernelConfig(32, 16, 2, 1)  # no heuristic picks 2 warps and 1 stage


def _store(cache, key: tuning.TuningKey, config: KernelConfig) -> None:
    cache.put(str(key), tuning.config_to_dict(config), ms=1.0)


def _prefill_structure(block_mask, score_mod, dtype, *, derivative: bool = False) -> str:
    plan = plan_mask(block_mask)
    mods = functions.mod_functions(plan.traced, trace_score(score_mod), mask_mode=plan.mode, derivative=derivative,
                                   fast_tanh=fast_tanh(dtype, interpret=False))
    return mods.key[:8]


def test_compiled_prefill_forward_takes_the_cached_winner(cache, monkeypatch):
    calls = recorded(monkeypatch, forward_launch)
    q, k, v = random_qkv(1, 4, 2, 128, 128, 32, dtype=torch.float16)
    block_mask = ta.create_block_mask(causal_mask, None, None, 128, 128, BLOCK_SIZE=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        entry.prefill_forward(q, k, v, block_mask, score_mod=None, scale=0.25, interpret=False, autotune=False)
        assert calls[-1][2]["num_warps"] != WINNER.num_warps  # nothing cached: the heuristic's config
        key = tuning.make_key(q, k, v, block_mask, structure=_prefill_structure(block_mask, None, q.dtype))
        _store(cache, key, WINNER)
        entry.prefill_forward(q, k, v, block_mask, score_mod=None, scale=0.25, interpret=False, autotune=False)
    named, options = calls[-1][1], calls[-1][2]
    assert (named["BLOCK_M"], named["BLOCK_N"]) == (WINNER.BLOCK_M, WINNER.BLOCK_N)
    assert (options["num_warps"], options["num_stages"]) == (WINNER.num_warps, WINNER.num_stages)


def test_compiled_prefill_backward_takes_the_cached_winner_per_kernel(cache, monkeypatch):
    calls = recorded(monkeypatch, backward_launch)
    q, k, v = random_qkv(1, 4, 2, 128, 128, 32, dtype=torch.float16)
    block_mask = ta.create_block_mask(causal_mask, None, None, 128, 128, BLOCK_SIZE=64)
    out, lse, grad_out = torch.randn_like(q), torch.randn(1, 4, 128), torch.randn_like(q)
    structure = _prefill_structure(block_mask, None, q.dtype, derivative=True)
    _store(cache, tuning.make_key(q, k, v, block_mask, kernel="bwd_dq", structure=structure), WINNER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        entry.prefill_backward(q, k, v, out, lse, grad_out, None, block_mask, score_mod=None, scale=0.25,
                               interpret=False, autotune=False)
    by_kernel = {named.get("DQ") is not None: options for _, named, options in calls if "Q_TILES_PER_BLOCK" in named}
    assert by_kernel[True]["num_warps"] == WINNER.num_warps  # dQ: the winner
    assert by_kernel[False]["num_warps"] != WINNER.num_warps  # dK/dV: nothing cached, the heuristic's


@pytest.mark.parametrize("paged", [False, True])
def test_compiled_decode_and_paged_take_the_cached_winner(cache, monkeypatch, paged):
    calls = recorded(monkeypatch, decode_launch)
    winner = KernelConfig(16, 32, 2, 1)
    if paged:
        inputs = make_paged([200, 120], q_len=1, q_heads=8, kv_heads=2, head_dim=32, page_size=16)
        q, k, v = inputs.query, inputs.key_cache, inputs.value_cache
        problem = paged_problem(inputs.kv_lens, q_len=1, q_heads=8, capacity=inputs.page_table.shape[1] * k.shape[2],
                                mask_mod=None, score_mod=None)
        block_mask, kv_len = problem.block_mask, inputs.page_table.shape[1] * k.shape[2]
        structure = decode_launch.decode_mods(block_mask, None, problem.mask_plan)[2].key
    else:
        q, k, v = random_qkv(2, 8, 2, 1, 200, 32, dtype=torch.float16)
        block_mask = ta.create_block_mask(at_offset(causal_mask, 199), None, None, 1, 200, BLOCK_SIZE=64)
        kv_len, structure = 200, decode_launch.decode_mods(block_mask, None)[2].key
    splits = decode_launch.plan_decode(q, 2, 32, block_mask).num_splits
    _store(cache, decode_key(q, 2, kv_len, 32, block_mask, splits, paged=paged, score=False, structure=structure),
           winner)

    if paged:
        entry.paged_forward(q, k, v, inputs.page_table, inputs.kv_lens, mask_mod=None, score_mod=None, scale=0.25,
                            interpret=False)
    else:
        entry.decode_forward(q, k, v, block_mask, score_mod=None, scale=0.25, interpret=False, autotune=False)
    named, options = calls[0][1], calls[0][2]
    assert named["NUM_SPLITS"] == splits and named["BLOCK_N"] == winner.BLOCK_N
    assert (options["num_warps"], options["num_stages"]) == (winner.num_warps, winner.num_stages)
