"""The Triton backward kernels (dQ, dK, dV) under the Triton interpreter, on CPU tensors.

Gradients are checked against the float64 golden result under the numerics rule (3x for the
backward, ``tests/helpers/numerics.py``). The kernels are driven through ``TritonBackward`` below, a
minimal autograd wrapper over ``attention_forward`` + ``attention_backward`` (the same two calls
``kernels/autograd.py`` makes), so these tests exercise the Triton backward whatever the public
wrapper currently routes to. Shapes stay tiny: the interpreter runs every program in numpy.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from triton.runtime.interpreter import InterpreterBuilder, TensorHandle  # noqa: E402

import triton_attn as ta  # noqa: E402
from tests.helpers.mask_cases import composed_masks, document_ids, library_mask_cases
from tests.helpers.numerics import assert_matches_golden, random_qkv  # noqa: E402
from triton_attn.kernels.attention import backward_launch  # noqa: E402
from triton_attn.kernels.attention.backward_launch import (  # noqa: E402
    BackwardConfig,
    UnsupportedBackwardError,
    attention_backward,
    check_backward_supported,
)
from triton_attn.kernels.attention.configs import KernelConfig  # noqa: E402
from triton_attn.kernels.attention.fallback import UntraceableMaskWarning, partial_block_bits, partial_block_ids  # noqa: E402
from triton_attn.kernels.attention.forward_launch import attention_forward  # noqa: E402
from triton_attn.kernels.host import new_softmax_stats  # noqa: E402
from triton_attn.kernels.jit import (
    derivative,  # noqa: E402
    functions,  # noqa: E402
)
from triton_attn.masks import (  # noqa: E402
    alibi_score,
    and_masks,
    causal_mask,
    chunked_mask,
    document_mask,
    prefix_lm_mask,
    sliding_window_mask,
    softcap_score,
)
from triton_attn.masks.tracing import TracedMod, evaluate, trace_score_mod  # noqa: E402
from triton_attn.reference import dense_attention  # noqa: E402


class TritonBackward(torch.autograd.Function):
    """apply(q, k, v, block_mask, score_mod, scale, config=None) -> (out, lse), both passes on the
    interpreter (``config``: the backward's ``BackwardConfig``, None for the heuristic's)."""

    @staticmethod
    def forward(ctx, query, key, value, block_mask, score_mod, scale, config=None):
        stats = new_softmax_stats(query)
        out, lse = attention_forward(query, key, value, block_mask, score_mod=score_mod, scale=scale, interpret=True,
                                     stats=stats)
        ctx.save_for_backward(query, key, value, out, lse, stats)
        ctx.block_mask, ctx.score_mod, ctx.scale, ctx.config = block_mask, score_mod, scale, config
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        query, key, value, out, lse, stats = ctx.saved_tensors
        grads = attention_backward(query, key, value, out, lse, grad_out, grad_lse, ctx.block_mask,
                                   score_mod=ctx.score_mod, scale=ctx.scale, interpret=True, softmax_stats=stats,
                                   config=ctx.config)
        return (*grads, None, None, None, None)


def _block_mask(mask_mod, q_len, kv_len, block_size, mask_batch=None, mask_heads=None):
    return ta.create_block_mask(mask_mod or ta.masks.library.full_mask, mask_batch, mask_heads, q_len, kv_len,
                                BLOCK_SIZE=block_size)


def check(q, k, v, *, mask_mod=None, score_mod=None, block_size=32, mask_batch=None, mask_heads=None,
          scale=None, context="", config=None):
    """Forward + Triton backward on the interpreter vs the float64 golden result (3x rule for grads)."""
    block_mask = _block_mask(mask_mod, q.shape[2], k.shape[2], block_size, mask_batch, mask_heads)
    used_scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale

    def candidate(q_, k_, v_):
        return TritonBackward.apply(q_, k_, v_, block_mask, score_mod, used_scale, config)

    return assert_matches_golden(candidate, q, k, v, mask_mod=mask_mod, score_mod=score_mod, scale=scale,
                                 backward=True, context=context)


# -- masks, shapes, dtypes --------------------------------------------------------------------

@pytest.mark.parametrize("name", list(library_mask_cases(2, 8)))
def test_every_library_mask(name):
    length = 90
    mask_mod = library_mask_cases(2, length)[name]
    q, k, v = random_qkv(2, 2, 1, length, length, 32, dtype=torch.float16)
    check(q, k, v, mask_mod=mask_mod, mask_batch=2, block_size=32, context=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_gqa_and_scale(dtype):
    q, k, v = random_qkv(1, 4, 2, 45, 70, 32, dtype=dtype)
    check(q, k, v, mask_mod=causal_mask, block_size=32, scale=0.3, context=str(dtype))


@pytest.mark.parametrize("q_heads,kv_heads", [(4, 1), (6, 2)])
def test_gqa_groups_sum_without_repeat(q_heads, kv_heads):
    q, k, v = random_qkv(2, q_heads, kv_heads, 40, 40, 16, dtype=torch.float32)
    check(q, k, v, mask_mod=sliding_window_mask(13), block_size=16, context=f"{q_heads}/{kv_heads}")


@pytest.mark.parametrize("q_len,kv_len", [(1, 17), (17, 1), (127, 129), (129, 127)])
def test_odd_lengths(q_len, kv_len):
    q, k, v = random_qkv(1, 2, 1, q_len, kv_len, 16, dtype=torch.float16)
    mask_mod = prefix_lm_mask(5) if q_len > 1 and kv_len > 1 else None
    check(q, k, v, mask_mod=mask_mod, block_size=64, context=f"{q_len}x{kv_len}")


@pytest.mark.parametrize("head_dim,value_dim", [(16, 16), (80, 80), (96, 48), (40, 72), (192, 192), (256, 64)])
def test_head_dims_padded_and_dv_ne_d(head_dim, value_dim):
    q, k, v = random_qkv(1, 1, 1, 33, 40, head_dim, value_dim, dtype=torch.float16)
    check(q, k, v, mask_mod=causal_mask, block_size=16, context=f"D={head_dim} Dv={value_dim}")


@pytest.mark.parametrize("block_size", [(16, 32), (32, 16), (24, 40), 64])
def test_block_sizes_and_ragged_subtiles(block_size):
    q, k, v = random_qkv(1, 2, 1, 70, 90, 16, dtype=torch.float32)
    check(q, k, v, mask_mod=and_masks(causal_mask, chunked_mask(30)), block_size=block_size, context=str(block_size))


def test_per_head_per_batch_layout_and_strided_inputs():
    def head_dependent(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx >= 0) & (q_idx - kv_idx < 6 + 10 * h + 5 * b)

    q, k, v = random_qkv(2, 2, 2, 50, 50, 16, dtype=torch.float32, layout="transposed")
    check(q, k, v, mask_mod=head_dependent, mask_batch=2, mask_heads=2, block_size=16)


# -- score mods and their derivatives ---------------------------------------------------------

def _score_mods(length: int):
    table = torch.randn(2 * length - 1)
    head_bias = torch.randn(2, length)

    def relative_bias(score, b, h, q_idx, kv_idx):
        return score + table[q_idx - kv_idx + length - 1]

    def gated_head_bias(score, b, h, q_idx, kv_idx):
        return torch.where(kv_idx > q_idx - 8, score + head_bias[h, kv_idx], score * 0.5)

    def smooth_math(score, b, h, q_idx, kv_idx):
        # exp / log / sqrt / sigmoid / min / max / abs / pow / division, all differentiable.
        positive = torch.log(torch.exp(score) + 1.0) + torch.sqrt(score * score + 1.0)
        bounded = torch.maximum(torch.minimum(score, positive), -torch.abs(score) - 2.0)
        return bounded * torch.sigmoid(score) + score ** 2 / (positive + 3.0) - 0.1 * 2.0 ** (score / 4)

    return {"softcap": softcap_score(2.0), "alibi": alibi_score(2), "relative_bias": relative_bias,
            "gated_head_bias": gated_head_bias, "smooth_math": smooth_math}


@pytest.mark.parametrize("kind", list(_score_mods(4)))
def test_score_mod_gradients(kind):
    length = 48
    score_mod = _score_mods(length)[kind]
    q, k, v = random_qkv(1, 2, 2, length, length, 16, dtype=torch.float32)
    check(q, k, v, mask_mod=causal_mask, score_mod=score_mod, block_size=16, context=kind)


def test_softcap_bf16_with_sliding_window():
    q, k, v = random_qkv(1, 2, 1, 60, 60, 32, dtype=torch.bfloat16)
    check(q, k, v, mask_mod=sliding_window_mask(20), score_mod=softcap_score(5.0), block_size=32)


@pytest.mark.parametrize("kind", list(_score_mods(4)))
def test_symbolic_derivative_matches_autograd(kind):
    """d score_mod / d score from the derivative graph equals torch autograd, in float64."""
    length = 12
    score_mod = _score_mods(length)[kind]
    traced = trace_score_mod(score_mod)
    grad_graph = TracedMod("score", derivative.score_derivative(traced.graph), traced.captured, "grad")
    b, h = torch.tensor(0).view(1, 1, 1, 1), torch.arange(2).view(1, 2, 1, 1)
    q_idx, kv_idx = torch.arange(length).view(1, 1, -1, 1), torch.arange(length).view(1, 1, 1, -1)
    score = (torch.randn(1, 2, length, length, dtype=torch.float64) * 3).requires_grad_()
    captured = [t.double() if t.is_floating_point() else t for t in traced.captured]
    value = evaluate(traced, dict(score=score, b=b, h=h, q_idx=q_idx, kv_idx=kv_idx), captured)
    (expected,) = torch.autograd.grad(value.sum(), score)
    got = evaluate(grad_graph, dict(score=score.detach(), b=b, h=h, q_idx=q_idx, kv_idx=kv_idx), captured)
    torch.testing.assert_close(got.broadcast_to(expected.shape).double(), expected, rtol=1e-9, atol=1e-9)


def test_constant_derivative_emits_no_derivative_code():
    for score_mod in (alibi_score(4), _score_mods(8)["relative_bias"]):
        mods = functions.mod_functions(None, trace_score_mod(score_mod), derivative=True)
        assert mods.score_grad_fn is None and mods.score_grad_constant == 1.0
        assert "score_mod_and_grad" not in mods.path.read_text()
    mods = functions.mod_functions(None, trace_score_mod(softcap_score(3.0)), derivative=True)
    assert mods.score_grad_fn is not None and "def score_mod_and_grad(" in mods.path.read_text()


# -- semantics: masked rows, lse gradient, determinism ----------------------------------------

def test_fully_masked_rows_get_zero_gradients():
    def every_third_row_empty(b, h, q_idx, kv_idx):
        return (q_idx % 3 != 0) & (kv_idx <= q_idx)

    q, k, v = random_qkv(1, 2, 2, 50, 50, 16, dtype=torch.float16)
    check(q, k, v, mask_mod=every_third_row_empty, score_mod=softcap_score(4.0), block_size=16)
    block_mask = _block_mask(every_third_row_empty, 50, 50, 16)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = TritonBackward.apply(*leaves, block_mask, None, 0.25)
    (out.float().sum() + lse[torch.isfinite(lse)].sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)
    assert (leaves[0].grad[:, :, ::3] == 0).all()


def test_nothing_attended_gives_zero_gradients():
    def nothing(b, h, q_idx, kv_idx):
        return kv_idx > q_idx + 1000

    q, k, v = (t.requires_grad_() for t in random_qkv(1, 1, 1, 20, 20, 16, dtype=torch.float32))
    out, _ = TritonBackward.apply(q, k, v, _block_mask(nothing, 20, 20, 16), softcap_score(2.0), 0.25)
    out.sum().backward()
    assert all((t.grad == 0).all() for t in (q, k, v))


def test_gradient_through_lse():
    """A loss on lse as well as out: dLse enters the kernels through delta."""
    q, k, v = random_qkv(1, 2, 1, 40, 56, 16, dtype=torch.float32)
    block_mask = _block_mask(sliding_window_mask(9), 40, 56, 16)
    grad_out, grad_lse = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40)

    def grads(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out, lse = fn(*leaves)
        finite = torch.isfinite(lse)
        loss = (out * grad_out.to(dtype)).sum() + (lse[finite] * grad_lse.to(lse.dtype)[finite]).sum()
        return torch.autograd.grad(loss, leaves)

    got = grads(lambda *t: TritonBackward.apply(*t, block_mask, None, 0.25), torch.float32)
    gold = grads(lambda *t: dense_attention(*t, mask_mod=sliding_window_mask(9), scale=0.25,
                                            compute_dtype=torch.float64), torch.float64)
    for name, a, b in zip("qkv", got, gold):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=2e-5, msg=f"d{name}")
    # Only the lse gradient (out unused): grad_out arrives as None.
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    _, lse = TritonBackward.apply(*leaves, block_mask, None, 0.25)
    lse.sum().backward()
    assert (leaves[2].grad == 0).all() and leaves[0].grad.abs().sum() > 0


def test_repeated_backward_is_bitwise_deterministic():
    q, k, v = random_qkv(2, 4, 2, 70, 70, 32, dtype=torch.bfloat16)
    ids = document_ids(2, 70)
    block_mask = _block_mask(and_masks(causal_mask, document_mask(ids)), 70, 70, 32, mask_batch=2)
    grad_out = torch.randn(2, 4, 70, 32, dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out, _ = TritonBackward.apply(*leaves, block_mask, softcap_score(10.0), 0.2)
        out.backward(grad_out)
        runs.append([t.grad for t in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# -- untraceable masks and unsupported gradients ----------------------------------------------

def test_untraceable_mask_uses_transposed_bitmasks():
    def python_branching(b, h, q_idx, kv_idx):  # Python control flow on tensors cannot be traced
        causal = q_idx >= kv_idx
        if bool(causal.any()):
            return causal & ((q_idx * 7 + kv_idx * 3) % 5 != 0)
        return causal

    q, k, v = random_qkv(1, 2, 1, 45, 50, 16, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntraceableMaskWarning)
        check(q, k, v, mask_mod=python_branching, block_size=(16, 32))
        check(q, k, v, mask_mod=python_branching, block_size=(24, 16))


def test_fallback_block_ids_point_at_each_partial_block():
    """The dense block-id table the bitmask predicate reads (forward, dQ and the transposed dK/dV walk)."""
    def irregular(b, h, q_idx, kv_idx):
        return ((q_idx * 3 + kv_idx * 5) % 7 != 0) & (kv_idx <= q_idx + 20 * h)

    block_mask = ta.create_block_mask(irregular, None, 2, 70, 90, BLOCK_SIZE=16)
    bits, offsets = partial_block_bits(block_mask)
    ids = partial_block_ids(block_mask, offsets)
    dense = ta.create_mask(irregular, 1, 2, 70, 90)
    expected_ids = torch.full(ids.shape, -1, dtype=torch.int32)
    for h in range(2):
        for row in range(block_mask.num_blocks[0]):
            for slot in range(int(block_mask.kv_num_blocks[0, h, row])):
                column = int(block_mask.kv_indices[0, h, row, slot])
                expected_ids[0, h, row, column] = int(offsets[0, h, row]) + slot
                block = dense[0, h, row * 16:(row + 1) * 16, column * 16:(column + 1) * 16]
                slab = bits[expected_ids[0, h, row, column], :block.shape[0], :block.shape[1]]
                assert torch.equal(slab.bool(), block)
    assert torch.equal(ids, expected_ids)


def test_learnable_captured_tensor_is_refused_before_any_kernel():
    table = torch.randn(63, requires_grad=True)

    def learned_bias(score, b, h, q_idx, kv_idx):
        return score + table[q_idx - kv_idx + 31]

    with pytest.raises(UnsupportedBackwardError, match=r"learned_bias.*backend='torch'"):
        check_backward_supported(learned_bias)
    check_backward_supported(softcap_score(3.0))  # nothing learnable: fine
    with torch.no_grad():
        frozen = table.detach()

    def frozen_bias(score, b, h, q_idx, kv_idx):
        return score + frozen[q_idx - kv_idx + 31]

    check_backward_supported(frozen_bias)


def test_learnable_score_tensor_trains_through_recompute_path():
    """A learnable bias table captured by the score_mod gets gradients (recompute path, warned once)."""
    from triton_attn.backends.run import LearnableScoreTensorWarning

    table = torch.randn(63, requires_grad=True)

    def learned_bias(score, b, h, q_idx, kv_idx):
        return score + table[q_idx - kv_idx + 31]

    q, k, v = random_qkv(1, 2, 2, 32, 32, 16, dtype=torch.float32)
    with pytest.warns(LearnableScoreTensorWarning, match="learned_bias"):
        assert_matches_golden(lambda q_, k_, v_: ta.attention(q_, k_, v_, score_mod=learned_bias, return_lse=True,
                                                              backend="interpret"),
                              q, k, v, score_mod=learned_bias, params=[table])
    with torch.no_grad():  # inference with the same score_mod is plain forward
        ta.attention(q, k, v, score_mod=learned_bias, backend="interpret")


# -- random compositions ----------------------------------------------------------------------



@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_random_compositions(data):
    length = data.draw(st.integers(2, 64), label="length")
    mask_mod = data.draw(composed_masks(length), label="mask")
    block = data.draw(st.sampled_from([16, 32, (16, 32), (32, 16)]), label="block")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), label="dtype")
    score_mod = data.draw(st.sampled_from([None, softcap_score(3.0), alibi_score(2)]), label="score_mod")
    q, k, v = random_qkv(1, 2, 1, length, length, 16, dtype=dtype)
    check(q, k, v, mask_mod=mask_mod, score_mod=score_mod, block_size=block,
          context=getattr(mask_mod, "__name__", ""))


# -- amplifying score_mods: forward and backward must compute scores alike ---------------------

def _times_eight(score, b, h, q_idx, kv_idx):
    return score * 8


def _squared(score, b, h, q_idx, kv_idx):
    return score * score


@pytest.mark.parametrize("score_mod,scale", [(_times_eight, None), (_squared, None), (None, 8 / math.sqrt(32))],
                         ids=["times_eight", "squared", "scale_times_eight"])
def test_amplifying_score_mods_stay_within_the_rule_without_the_floor(score_mod, scale):
    """``s * 8``, ``s * s`` (and a large scale) amplify every rounding difference between the forward's
    scores and the backward's recompute; with the same operand order, the same FMA and the forward's
    own normalization the gradients stay at the float32 baseline's error -- 3x holds even without the
    absolute floor (which would otherwise hide a 5-7x regression at these magnitudes)."""
    torch.manual_seed(3)
    q, k, v = random_qkv(1, 2, 2, 96, 96, 32, dtype=torch.float32)
    comparisons = check(q, k, v, mask_mod=causal_mask, score_mod=score_mod, scale=scale, block_size=32)
    for comparison in comparisons:
        if comparison.name in ("dq", "dk", "dv"):
            assert comparison.error <= 3 * comparison.baseline_error + 1e-7, str(comparison)


def test_negative_scale_takes_the_scaled_score_path():
    """The raw-score max needs a positive scale; scale <= 0 runs through the identity score_mod."""
    q, k, v = random_qkv(1, 2, 1, 40, 40, 16, dtype=torch.float32)
    check(q, k, v, mask_mod=causal_mask, scale=-0.3, block_size=16)


def test_softcap_with_hardware_tanh_error_keeps_the_rule():
    """CUDA runs softcap's tanh as ``tanh.approx.f32`` for 16-bit inputs (relative error about 2**-11 per
    the PTX ISA). Emulated here at a worst-case-like +-2**-10.9, alternating by position, through the
    float32 reference: forward and backward stay within the numerics rule for bf16 and fp16."""
    bound = 2.0 ** -10.9

    def approximate_softcap(score, b, h, q_idx, kv_idx):
        sign = torch.where((q_idx + kv_idx) % 2 == 0, 1.0, -1.0)
        return 30.0 * torch.tanh(score / 30.0) * (1.0 + bound * sign)

    for dtype in (torch.bfloat16, torch.float16):
        q, k, v = random_qkv(1, 2, 2, 64, 64, 32, dtype=dtype)
        q = q * 4  # scores of tens: the cap is active

        def candidate(q_, k_, v_):
            out, lse = dense_attention(q_, k_, v_, mask_mod=causal_mask, score_mod=approximate_softcap,
                                       compute_dtype=torch.float32)
            return out.to(q_.dtype), lse.float()

        assert_matches_golden(candidate, q, k, v, mask_mod=causal_mask, score_mod=softcap_score(30.0),
                              context=str(dtype))


# -- dK and dV in two launches (split_dkdv, the Hopper head_dim 128 default); scores keys first ------

def _split(block_m=16, block_n=32):
    return BackwardConfig(KernelConfig(block_m, block_n, 4, 1), KernelConfig(block_n, block_m, 4, 1),
                          max_head_dim=256, split_dkdv=True)


def _grads(q, k, v, block_mask, score_mod, config, grad_out):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, _ = TritonBackward.apply(*leaves, block_mask, score_mod, 0.2, config)
    out.backward(grad_out)
    return [t.grad for t in leaves]


def _split_cases():
    ids = document_ids(2, 70)
    return {
        "causal_gqa_fp16": (torch.float16, 1, 4, 2, 45, 70, causal_mask, None),
        "document_bf16": (torch.bfloat16, 2, 2, 1, 70, 70, and_masks(causal_mask, document_mask(ids)), None),
        "window_softcap_bf16": (torch.bfloat16, 1, 2, 1, 60, 60, sliding_window_mask(20), softcap_score(5.0)),
        "times_eight_fp16": (torch.float16, 1, 2, 2, 64, 64, causal_mask, _times_eight),
        "squared_fp32": (torch.float32, 1, 2, 1, 48, 48, causal_mask, _squared),
    }


@pytest.mark.parametrize("name", list(_split_cases()))
def test_split_dkdv_launches_match_golden(name):
    dtype, batch, q_heads, kv_heads, q_len, kv_len, mask_mod, score_mod = _split_cases()[name]
    q, k, v = random_qkv(batch, q_heads, kv_heads, q_len, kv_len, 32, dtype=dtype)
    check(q, k, v, mask_mod=mask_mod, score_mod=score_mod, mask_batch=batch if batch > 1 else None,
          block_size=32, config=_split(), context=name)


def test_split_dkdv_is_bitwise_the_single_kernel():
    """The dV launch and the dK launch compute exactly what the single dK/dV kernel computes."""
    q, k, v = random_qkv(1, 4, 2, 64, 64, 32, dtype=torch.bfloat16)
    block_mask = _block_mask(causal_mask, 64, 64, 32)
    grad_out = torch.randn(1, 4, 64, 32, dtype=torch.bfloat16)
    fused = replace(_split(), split_dkdv=False)
    for score_mod in (None, softcap_score(5.0)):
        split_grads = _grads(q, k, v, block_mask, score_mod, _split(), grad_out)
        fused_grads = _grads(q, k, v, block_mask, score_mod, fused, grad_out)
        assert all(torch.equal(a, b) for a, b in zip(split_grads, fused_grads))


def test_split_dkdv_fully_masked_rows_get_zero_gradients():
    def every_third_row_empty(b, h, q_idx, kv_idx):
        return (q_idx % 3 != 0) & (kv_idx <= q_idx)

    q, k, v = random_qkv(1, 2, 1, 50, 50, 16, dtype=torch.float16)
    check(q, k, v, mask_mod=every_third_row_empty, score_mod=softcap_score(4.0), block_size=16, config=_split())
    grads = _grads(q, k, v, _block_mask(every_third_row_empty, 50, 50, 16), softcap_score(4.0), _split(),
                   torch.randn(1, 2, 50, 16, dtype=torch.float16))
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][:, :, ::3] == 0).all()
    nothing = _block_mask(lambda b, h, q_idx, kv_idx: kv_idx > q_idx + 1000, 50, 50, 16)
    assert all((g == 0).all() for g in _grads(q, k, v, nothing, None, _split(),
                                              torch.randn(1, 2, 50, 16, dtype=torch.float16)))


def _order_independent_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    """``a @ b + d`` whose every entry is the same whichever operand order or transposition produced it: the
    products of the (16-bit, upcast) operands are exact in float64, and each dot sums them sorted."""
    products = a.data.astype(np.float64)[..., :, :, None] * b.data.astype(np.float64)[..., None, :, :]
    total = np.sort(products, axis=-2).sum(axis=-2)
    return TensorHandle((total + d.data.astype(np.float64)).astype(d.data.dtype), d.dtype.scalar)


def test_keys_first_scores_round_exactly_as_the_forward_order(monkeypatch):
    """16-bit inputs: the dK/dV kernel's K Q^T gives bitwise the gradients of the forward's Q K^T
    (transposed), so the recompute meets the forward's statistics exactly (even under ``s * 8``)."""
    # On the GPU the tensor cores reduce K Q^T and Q K^T alike; the interpreter's ``tl.dot`` is numpy's BLAS,
    # whose sgemm may sum a product and its transpose in different orders (it does on AMD EPYC's OpenBLAS
    # kernels). An order-independent dot (exact float64 products, summed in sorted order) stands in for the
    # tensor cores, so what this compares is everything the kernel does around the dots.
    monkeypatch.setattr(InterpreterBuilder, "create_dot", _order_independent_dot)
    q, k, v = random_qkv(1, 2, 1, 64, 64, 32, dtype=torch.float16)
    block_mask = _block_mask(causal_mask, 64, 64, 32)
    grad_out = torch.randn(1, 2, 64, 32, dtype=torch.float16)
    keys_first = _grads(q, k, v, block_mask, _times_eight, _split(), grad_out)
    original = backward_launch.dkdv_constexprs

    def forward_order(**kwargs):
        values = original(**kwargs)
        assert values["KEYS_FIRST"]
        return {**values, "KEYS_FIRST": False}

    monkeypatch.setattr(backward_launch, "dkdv_constexprs", forward_order)
    assert all(torch.equal(a, b) for a, b in zip(keys_first, _grads(q, k, v, block_mask, _times_eight, _split(),
                                                                      grad_out)))
