"""Captured tensors of user mods: found wherever a function can reach them, read live, differentiated right.

Issue 20, items 2 and 3. A score_mod's learnable tensor must get the gradient autograd would give it, on
every backend, for every way of reaching it (closure, default, global, ``module.G``, ``self.x`` of a
method, a callable object's attribute, ``functools.partial`` arguments) and every indexing idiom the
tracer accepts (chained, nested, slices, 0-d tensor indices, 3-D tables). The interpreter backend runs
the traced kernel forward and differentiates a recomputation that must see the same tensors; before the
fix, a tensor indexed with a 0-d tensor or an int (``t[zero][q][kv]``, ``t[1][q][kv]``) or computed
inside the mod (``(t * 2)[q][kv]``) was a copy or view made once while tracing, so its gradient came back
as zeros, a global was not found at all (``G.grad`` stayed None, or the Triton backward refused it), and
a cached trace kept a rebound global or an in-place-changed derived tensor stale. Each case is checked
against the float64 golden result under the numerics rule (``tests/helpers/numerics.py``).
"""

from __future__ import annotations

import functools
import types
import warnings

import pytest
import torch

import triton_attn as ta
from tests.helpers.numerics import assert_matches_golden, random_qkv
from triton_attn.masks.closure import captured_tensors
from triton_attn.masks.tracing import HiddenTensorError, trace_score_mod

pytest.importorskip("triton")

BACKENDS = ("torch", "interpret")
LENGTH, HEADS, HEAD_DIM = 40, 2, 16


def check_gradients(score_mod, params, backend: str, *, mask_mod=None, qkv_grad: bool = True, context: str = ""):
    """Forward and backward of ``attention`` (dq, dk, dv and each of ``params``) against the golden result."""
    q, k, v = random_qkv(1, HEADS, HEADS, LENGTH, LENGTH, HEAD_DIM)
    block_mask = None if mask_mod is None else ta.create_block_mask(mask_mod, 1, HEADS, LENGTH, LENGTH, BLOCK_SIZE=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the learnable-tensor notice of the interpreter backend
        assert_matches_golden(lambda q_, k_, v_: ta.attention(q_, k_, v_, score_mod=score_mod, block_mask=block_mask,
                                                              backend=backend, return_lse=True),
                              q, k, v, score_mod=score_mod, mask_mod=mask_mod, params=params,
                              context=f"({context}, {backend})")


def learnable(*shape) -> torch.Tensor:
    return torch.randn(*shape).requires_grad_(True)


# -- item 2: every indexing idiom ---------------------------------------------------------------------

def indexing_idioms():
    """name -> (learnable table, score_mod reading it): each written as a Flex user writes it."""
    square, table_3d, per_head = learnable(LENGTH, LENGTH), learnable(3, LENGTH, LENGTH), learnable(1, HEADS, LENGTH)
    row_table, vectors, permutation = learnable(LENGTH), learnable(LENGTH, 4), torch.randperm(LENGTH)
    zero_d, second = torch.tensor(1), torch.tensor(2)
    return {
        "chained": (square, lambda s, b, h, q, kv: s + square[q][kv]),
        "tuple": (square, lambda s, b, h, q, kv: s + square[q, kv]),
        "nested_index_tensor": (row_table, lambda s, b, h, q, kv: s + row_table[permutation[q]] * row_table[kv]),
        "slice_then_index": (square, lambda s, b, h, q, kv: s + square[:, kv][q]),
        "sliced_range": (square, lambda s, b, h, q, kv: s + square[2:][q % (LENGTH - 2)][kv]),
        "zero_dim_index": (table_3d, lambda s, b, h, q, kv: s + table_3d[zero_d][q][kv]),
        "zero_dim_index_pair": (table_3d, lambda s, b, h, q, kv: s + table_3d[zero_d, q][kv] - table_3d[second][kv, q]),
        "int_index": (table_3d, lambda s, b, h, q, kv: s + table_3d[1][q][kv]),
        "head_table_3d": (table_3d, lambda s, b, h, q, kv: s + table_3d[h][q][kv]),
        "mixed": (per_head, lambda s, b, h, q, kv: s + per_head[b, h][kv] * per_head[b][h][q]),
        "ellipsis": (table_3d, lambda s, b, h, q, kv: s + table_3d[..., kv][h, q]),
        "dot_of_rows": (vectors, lambda s, b, h, q, kv: s + torch.dot(vectors[q], vectors[kv])),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("idiom", sorted(indexing_idioms()))
def test_captured_tensor_gradient_of_every_indexing_idiom(idiom, backend):
    table, score_mod = indexing_idioms()[idiom]
    trace_score_mod(score_mod)  # traced natively: the interpreter runs it in the kernel
    check_gradients(score_mod, (table,), backend, context=idiom)


def test_only_the_learnable_table_itself_is_a_kernel_argument():
    # Plain indexing stays a lazy view of the table: the kernel reads the tensor the gradient is for.
    table, zero_d = learnable(3, LENGTH, LENGTH), torch.tensor(1)
    traced = trace_score_mod(lambda s, b, h, q, kv: s + table[zero_d][q][kv] + table[2][kv][q])
    assert any(t is table for t in traced.captured)
    assert all(t is table or t is zero_d for t in traced.captured)


@pytest.mark.parametrize("backend", BACKENDS)
def test_table_computed_inside_the_mod_from_a_learnable_one_runs_exactly(backend):
    # (t * 2) and t.T are made anew on every call: the kernels cannot differentiate through the copy the
    # trace saw, so the score_mod runs on the PyTorch backend (exact), saying why.
    table = learnable(LENGTH, LENGTH)

    def doubled_transposed(s, b, h, q, kv):
        return s + (table * 2)[q][kv] + table.T[q][kv]

    from triton_attn.dispatch import score_mod_fallback_reason

    reason = score_mod_fallback_reason(doubled_transposed, needs_grad=True)
    assert reason is not None and "requires grad" in reason
    check_gradients(doubled_transposed, (table,), backend, context="derived")


def test_derived_table_without_gradient_is_traced_and_follows_in_place_changes():
    # Computed inside the mod from a tensor that needs no gradient: a constant of the trace, re-traced
    # when the source changes in place.
    base = torch.randn(LENGTH, LENGTH)

    def shifted(s, b, h, q, kv):
        return s + (base * 0.5 + 1.0)[q][kv]

    first = trace_score_mod(shifted)
    assert trace_score_mod(shifted) is first
    base.mul_(-3.0)
    assert trace_score_mod(shifted) is not first
    check_gradients(shifted, (), "interpret", context="derived after in-place change")


# -- item 3: wherever a function can reach the tensor --------------------------------------------------

GLOBAL_BIAS = learnable(LENGTH)
GLOBAL_TABLE = learnable(LENGTH, LENGTH)
tables = types.ModuleType("tables")  # ``tables.bias``: an attribute chain from a global module
tables.bias = learnable(LENGTH)
SETTINGS = types.SimpleNamespace(scale=learnable(HEADS))


def global_bias(score, b, h, q_idx, kv_idx):
    return score + GLOBAL_BIAS[kv_idx]


def global_table_chained(score, b, h, q_idx, kv_idx):
    return score + GLOBAL_TABLE[q_idx][kv_idx]


def module_attribute(score, b, h, q_idx, kv_idx):
    return score + tables.bias[kv_idx] * SETTINGS.scale[h]


def global_in_nested_code(score, b, h, q_idx, kv_idx):
    return score + sum(GLOBAL_BIAS[kv_idx] * weight for weight in (0.5, 1.5))


def _helper_reading_a_global(kv_idx):
    return GLOBAL_BIAS[kv_idx]


def global_through_a_helper(score, b, h, q_idx, kv_idx):
    return score + _helper_reading_a_global(kv_idx)


class RelativeBias(torch.nn.Module):
    """A learnable bias as a module: its ``score`` method and the module itself are score_mods."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(2 * LENGTH))
        self.head_scale = torch.nn.Parameter(torch.randn(HEADS))

    def score(self, score, b, h, q_idx, kv_idx):
        return score + self.offset(q_idx, kv_idx) * self.head_scale[h]

    def offset(self, q_idx, kv_idx):
        return self.table[q_idx - kv_idx + LENGTH]

    def forward(self, score, b, h, q_idx, kv_idx):
        return score + self.table[kv_idx - q_idx + LENGTH]


class CallableBias:
    def __init__(self):
        self.bias = learnable(LENGTH)

    def __call__(self, score, b, h, q_idx, kv_idx):
        return score + self.bias[q_idx]


def partial_bias(score, b, h, q_idx, kv_idx, table=None, *, scale=None):
    return score + table[kv_idx] * scale[h]


def reach_cases():
    """name -> (score_mod, its learnable tensors)."""
    module, callable_object = RelativeBias(), CallableBias()
    partial_table, partial_scale = learnable(LENGTH), learnable(HEADS)
    default_table = learnable(LENGTH)

    def with_default(score, b, h, q_idx, kv_idx, table=default_table):
        return score + table[q_idx]

    return {
        "global": (global_bias, (GLOBAL_BIAS,)),
        "global_chained": (global_table_chained, (GLOBAL_TABLE,)),
        "module_attribute_chain": (module_attribute, (tables.bias, SETTINGS.scale)),
        "global_in_nested_code": (global_in_nested_code, (GLOBAL_BIAS,)),
        "global_through_a_helper": (global_through_a_helper, (GLOBAL_BIAS,)),
        "bound_method_self": (module.score, (module.table, module.head_scale)),
        "nn_module_forward": (module, (module.table,)),
        "callable_object": (callable_object, (callable_object.bias,)),
        "partial_keywords": (functools.partial(partial_bias, table=partial_table, scale=partial_scale),
                             (partial_table, partial_scale)),
        "default_argument": (with_default, (default_table,)),
    }


@pytest.mark.parametrize("case", sorted(reach_cases()))
def test_captured_tensors_are_found_wherever_the_function_reaches_them(case):
    score_mod, params = reach_cases()[case]
    found = captured_tensors(score_mod)
    assert all(any(p is t for t in found) for p in params), case


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(reach_cases()))
def test_gradient_reaches_every_captured_tensor(case, backend):
    score_mod, params = reach_cases()[case]
    for param in params:
        param.grad = None
    check_gradients(score_mod, params, backend, context=case)


@pytest.mark.parametrize("backend", BACKENDS)
def test_global_gradient_with_only_the_table_learnable(backend):
    # q, k, v need no gradient: the table's gradient still arrives (it stayed None before).
    GLOBAL_BIAS.grad = None
    q, k, v = random_qkv(1, HEADS, HEADS, LENGTH, LENGTH, HEAD_DIM)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ta.attention(q, k, v, score_mod=global_bias, backend=backend).sum().backward()
    assert GLOBAL_BIAS.grad is not None and GLOBAL_BIAS.grad.abs().sum() > 0
    expected_bias = GLOBAL_BIAS.detach().clone().requires_grad_(True)
    scores = (q.double() @ k.double().transpose(-1, -2)) / HEAD_DIM ** 0.5 + expected_bias.double()
    (torch.softmax(scores, -1) @ v.double()).sum().backward()
    torch.testing.assert_close(GLOBAL_BIAS.grad, expected_bias.grad.float(), rtol=1e-4, atol=1e-5)


class _Holder:
    def __init__(self, tensor):
        self.bias = tensor


@pytest.mark.parametrize("backend", BACKENDS)
def test_learnable_tensor_that_cannot_be_found_is_an_error_naming_it(backend):
    holder, name = _Holder(learnable(LENGTH)), "bias"

    def dynamic_attribute(score, b, h, q_idx, kv_idx):
        return score + getattr(holder, name)[kv_idx]  # a computed attribute name: not found statically

    q, k, v = (t.requires_grad_(True) for t in random_qkv(1, HEADS, HEADS, LENGTH, LENGTH, HEAD_DIM))
    with pytest.raises(HiddenTensorError, match=rf"shape \({LENGTH},\).*requires grad"):
        ta.attention(q, k, v, score_mod=dynamic_attribute, backend=backend).sum().backward()
    with torch.no_grad():  # no gradient wanted: fine
        ta.attention(q, k, v, score_mod=dynamic_attribute, backend=backend)


# -- caches keyed by the mod stay right -------------------------------------------------------------

SCALE = torch.tensor(0.5)
WINDOW_IDS = torch.randint(0, 3, (LENGTH,))


def scaled_by_global(score, b, h, q_idx, kv_idx):
    return score * SCALE.item() + (q_idx - kv_idx) * 0.01


def window_of_global(b, h, q_idx, kv_idx):
    return ((WINDOW_IDS + 0)[q_idx] == (WINDOW_IDS + 0)[kv_idx]) & (q_idx >= kv_idx)


def test_rebound_or_changed_globals_are_seen_by_the_cached_trace():
    global SCALE, WINDOW_IDS
    q, k, v = random_qkv(1, HEADS, HEADS, LENGTH, LENGTH, HEAD_DIM)
    saved = SCALE, WINDOW_IDS
    try:
        for change in range(3):
            if change == 1:
                SCALE.fill_(2.0)          # a value read with .item() while tracing, changed in place
                WINDOW_IDS.random_(0, 3)  # the source of a tensor computed inside the mask_mod
            elif change == 2:
                SCALE, WINDOW_IDS = torch.tensor(-1.5), torch.randint(0, 2, (LENGTH,))  # rebound globals
            block_mask = ta.create_block_mask(window_of_global, 1, HEADS, LENGTH, LENGTH, BLOCK_SIZE=16)
            expected = ta.attention(q, k, v, score_mod=scaled_by_global, block_mask=block_mask, backend="torch")
            got = ta.attention(q, k, v, score_mod=scaled_by_global, block_mask=block_mask, backend="interpret")
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=f"after change {change}")
    finally:
        SCALE, WINDOW_IDS = saved


GLOBAL_ALLOWED = torch.rand(LENGTH) > 0.3


def global_mask(b, h, q_idx, kv_idx):
    return GLOBAL_ALLOWED[kv_idx] | (q_idx == kv_idx)


def test_mask_mod_global_is_a_kernel_argument_read_live():
    from triton_attn.masks.tracing import trace_mask_mod

    assert any(t is GLOBAL_ALLOWED for t in trace_mask_mod(global_mask).captured)
    assert any(t is GLOBAL_ALLOWED for t in captured_tensors(global_mask))
    q, k, v = random_qkv(1, HEADS, HEADS, LENGTH, LENGTH, HEAD_DIM)
    for _ in range(2):
        block_mask = ta.create_block_mask(global_mask, 1, HEADS, LENGTH, LENGTH, BLOCK_SIZE=16)
        expected = ta.attention(q, k, v, block_mask=block_mask, backend="torch")
        torch.testing.assert_close(ta.attention(q, k, v, block_mask=block_mask, backend="interpret"), expected,
                                   rtol=1e-4, atol=1e-5)
        GLOBAL_ALLOWED.copy_(torch.rand(LENGTH) > 0.6)


def test_learnable_captured_tensor_under_torch_compile_is_an_error_not_a_lost_gradient():
    # Inside torch.compile the custom ops differentiate q, k and v only: a learnable captured tensor says so.
    bias = learnable(LENGTH)
    q, k, v = (t.requires_grad_(True) for t in random_qkv(1, HEADS, HEADS, LENGTH, LENGTH, HEAD_DIM))

    def learnable_bias(s, b, h, q_idx, kv_idx):  # made before the graph, as compiled calls need
        return s + bias[kv_idx]

    def run(q, k, v):
        return ta.attention(q, k, v, score_mod=learnable_bias, backend="torch")

    torch._dynamo.reset()
    try:
        with pytest.raises(Exception, match="under torch.compile triton_attn does not compute their gradients"):
            torch.compile(run, fullgraph=True, backend="aot_eager")(q, k, v)
    finally:
        torch._dynamo.reset()
