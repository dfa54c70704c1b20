"""``tracing.Symbol`` declares its Python operators in its class body, and they trace what tensors compute.

The operators used to be attached to ``Symbol`` with ``setattr`` when ``torch_ops`` was first imported (by the
first trace), so ``class Symbol`` did not show them and ``tracing`` and ``torch_ops`` imported each other.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from triton_attn.masks.evaluate import per_element
from triton_attn.masks.torch_ops import HANDLERS
from triton_attn.masks.tracing import Symbol, UntraceableModError, evaluate, trace_score_mod

# Every Python operator a traced value supports (torch.Tensor has no __round__ / __floor__ / __ceil__ / __trunc__;
# Symbol's own make round() and math.floor/ceil/trunc trace as torch.round / floor / ceil / trunc).
OPERATORS = [f"__{name}__" for name in (
    "add", "radd", "sub", "rsub", "mul", "rmul", "truediv", "rtruediv", "floordiv", "rfloordiv", "mod", "rmod",
    "pow", "rpow", "matmul", "rmatmul", "and", "rand", "or", "ror", "xor", "rxor", "lshift", "rlshift", "rshift",
    "rrshift", "eq", "ne", "lt", "le", "gt", "ge", "neg", "pos", "abs", "invert", "round", "floor", "ceil", "trunc",
    "getitem", "getattr", "torch_function", "bool", "index", "int", "float", "len", "iter")]


def test_operators_are_in_the_class_body_after_importing_only_tracing():
    # A fresh interpreter: nothing has traced yet and nothing but tracing (and what it imports) is imported.
    code = ("import json; import triton_attn.masks.tracing as tracing; "
            "print(json.dumps(sorted(name for name in tracing.Symbol.__dict__ if name.startswith('__'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    declared = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert not set(OPERATORS) - declared, f"missing from Symbol's class body: {sorted(set(OPERATORS) - declared)}"


def test_every_tensor_operator_the_handlers_trace_is_an_operator_of_symbol():
    # A Python operator torch_ops handles for tensors but Symbol does not declare would fail on traced values.
    handled_ids = {id(func) for func in HANDLERS}
    handled = {name for name in dir(torch.Tensor)
               if name.startswith("__") and name.endswith("__") and id(getattr(torch.Tensor, name)) in handled_ids}
    handled -= {"__getitem__"}  # Symbol indexes its own views (tracing.Symbol.__getitem__)
    handled -= {"__div__", "__rdiv__"}  # torch's Python 2 aliases of __truediv__ / __rtruediv__: no Python operator
    assert handled, "no tensor operators in HANDLERS"
    assert handled <= set(Symbol.__dict__), sorted(handled - set(Symbol.__dict__))


def _grids(length: int = 12):
    return {"score": torch.randn(1, 2, length, length, dtype=torch.float64) * 4,
            "b": torch.zeros(1, 1, 1, 1, dtype=torch.int64), "h": torch.arange(2).view(1, -1, 1, 1),
            "q_idx": torch.arange(length).view(1, 1, -1, 1), "kv_idx": torch.arange(length).view(1, 1, 1, -1)}


def test_python_operators_on_traced_values_equal_the_tensor_operators():
    # The same mod evaluated on tensors (per element, all at once) and through its traced graph.
    table = torch.randn(12, 3, dtype=torch.float64)

    def score_mod(score, b, h, q_idx, kv_idx):
        ints = ((q_idx << 2) >> 1) ^ (kv_idx | 5) & 7
        reflected = 3 - q_idx + 2 * kv_idx + 1.5 / (kv_idx + 1) + 7 // (q_idx + 1) + 7 % (kv_idx + 2) + 2 ** (h + 1)
        compared = (q_idx >= kv_idx) & ~(q_idx == 3) | (q_idx < 2) ^ (kv_idx != 4)
        return (-score + abs(score) * +score) / 4 + ints + reflected + compared + table[q_idx] @ table[kv_idx]

    grids = _grids()
    # Flex's semantics: the mod sees one element at a time (the matmul is of two rows of the table).
    expected = per_element(score_mod, [grids[name] for name in ("score", "b", "h", "q_idx", "kv_idx")])
    got = evaluate(trace_score_mod(score_mod), grids)
    torch.testing.assert_close(got.broadcast_to(expected.shape), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("ndigits", [1, -1, 2])
def test_round_with_digits_is_refused_not_rounded_to_an_integer(ndigits):
    # round(x, 2) rounds to two decimals; tracing it as round(x) would be silently wrong.
    with pytest.raises(UntraceableModError, match="round with decimals != 0"):
        trace_score_mod(lambda score, b, h, q_idx, kv_idx: round(score * 10, ndigits))


def test_round_without_digits_traces_as_torch_round():
    grids = _grids()
    traced = trace_score_mod(lambda score, b, h, q_idx, kv_idx: round(score * 1.5) + round(score, 0))
    got = evaluate(traced, {name: value.float() if name == "score" else value for name, value in grids.items()})
    score = grids["score"].float()
    torch.testing.assert_close(got, torch.round(score * 1.5) + torch.round(score))
