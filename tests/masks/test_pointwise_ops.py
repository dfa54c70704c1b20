"""torch's elementwise functions in score_mods (issue 20, item 7c): traced into the kernels, or refused.

Each function ``masks/pointwise.py`` lists as traced is checked three ways:

1. its generated Triton value and derivative, under the interpreter, element by element against torch in
   float64 (random points, and the special values inf, -inf, NaN, +-0 and domain edges for the value);
2. ``attention`` forward and backward with it on the ``torch`` and ``interpret`` backends against the
   float64 golden result (numerics rule, ``tests/helpers/numerics.py``);
3. the interpreter's output against torch's own ``flex_attention`` (eager, float64) under the same rule.

Functions listed as refused raise ``UntraceableModError`` naming them, and ``attention`` runs them exactly
on the PyTorch backend with a warning.
"""

from __future__ import annotations

import math
import warnings
import zlib

import pytest
import torch
import torch.nn.functional as F

import triton_attn as ta
from tests.helpers.numerics import assert_matches_golden, compare, random_qkv
from triton_attn.masks.torch_ops import HANDLERS
from triton_attn.masks.tracing import UntraceableModError, trace_score_mod
from triton_attn.reference import dense_attention

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from triton_attn.kernels.jit.functions import mod_functions  # noqa: E402
from triton_attn.kernels.jit.modules import launch  # noqa: E402

# name -> f(score): the function applied to the score as a Flex user writes it (inputs mapped into its domain).
TRACED = {
    "tan": lambda s: torch.tan(s * 0.4),
    "atan": torch.atan,
    "arctan2": lambda s: torch.arctan2(s, 1.0 - s),
    "atan2": lambda s: torch.atan2(1.5 - s, s * 2.0),
    "asin": lambda s: torch.asin(s / (s.abs() + 1.0)),
    "acos": lambda s: torch.acos(s / (s.abs() + 1.0)),
    "sinh": torch.sinh,
    "cosh": torch.cosh,
    "asinh": lambda s: torch.asinh(s * 30.0),
    "acosh": lambda s: torch.acosh(1.0 + s.abs() * 5.0),
    "atanh": lambda s: torch.atanh(s / (s.abs() + 1.0)),
    "erf": torch.erf,
    "erfc": lambda s: torch.erfc(s * 2.0),
    "special_erfc": lambda s: torch.special.erfc(s),
    "expm1": torch.expm1,
    "log1p": lambda s: torch.log1p(s.abs()),
    "log2": lambda s: torch.log2(s.abs() + 0.1),
    "log10": lambda s: torch.log10(s.abs() + 0.1),
    "exp2": torch.exp2,
    "rsqrt": lambda s: torch.rsqrt(s.abs() + 0.2),
    "reciprocal": lambda s: torch.reciprocal(s.abs() + 0.5),
    "sigmoid": torch.sigmoid,
    "softplus": lambda s: F.softplus(s, beta=1.5),
    "square": torch.square,
    "sign": lambda s: s * torch.sign(s - 0.3),
    "trunc": lambda s: s + torch.trunc(s * 2.0),
    "frac": lambda s: torch.frac(s * 1.7),
    "floor": lambda s: s + torch.floor(s),
    "ceil": lambda s: s - torch.ceil(s),
    "round": lambda s: s + torch.round(s * 1.5),
    "clamp": lambda s: torch.clamp(s, -1.0, 0.8),
    "clip": lambda s: torch.clip(s, min=-0.5),
    "minimum": lambda s: torch.minimum(s, 0.4 - s),
    "maximum": lambda s: torch.maximum(s, s * 0.3 + 0.2),
    "fmin": lambda s: torch.fmin(s, s * -0.5),
    "fmax": lambda s: torch.fmax(s, 0.1 - s),
    "fmod": lambda s: torch.fmod(s * 3.0, 0.7),
    "remainder": lambda s: torch.remainder(s * 3.0, 0.7),
    "pow": lambda s: torch.pow(s.abs(), 1.5) - torch.pow(2.0, s),
    "float_power": lambda s: torch.float_power(s.abs() + 0.1, 0.5).float(),
    "hypot": lambda s: torch.hypot(s, 2.0 * s - 1.0),
    "logaddexp": lambda s: torch.logaddexp(s, 0.7 - s),
    "logaddexp2": lambda s: torch.logaddexp2(s * 1.3, -s),
    "copysign": lambda s: torch.copysign(s + 0.5, s - 0.25),
    "lerp": lambda s: torch.lerp(s, 2.0 - s, 0.3) + torch.lerp(s, s * s, 0.8),
    "xlogy": lambda s: torch.xlogy(s, s.abs() + 0.5),
    "sinc": lambda s: torch.sinc(s),
    "deg2rad_rad2deg": lambda s: torch.deg2rad(s * 50.0) + torch.rad2deg(s) * 0.01,
    "logit": lambda s: torch.logit(torch.sigmoid(s), eps=0.01),
    "ndtr": lambda s: torch.special.ndtr(s),
    "nan_to_num": lambda s: torch.nan_to_num(torch.log(s), nan=-2.0, neginf=-3.0),
    "where": lambda s: torch.where(s > 0.2, s * 2.0, -s),
    "abs_neg": lambda s: torch.abs(s) - torch.neg(s) * 0.5,
    "signbit": lambda s: torch.where(torch.signbit(s), s * 2.0, s),
    "isfinite_isnan_isinf": lambda s: torch.where(torch.isfinite(s) & ~torch.isnan(s) & ~torch.isinf(s), s, 0.0),
    "heaviside": lambda s: s * torch.heaviside(s, s.new_tensor(0.5)),
    "relu": F.relu,
    "relu6": lambda s: F.relu6(s * 4.0),
    "gelu": F.gelu,
    "gelu_tanh": lambda s: F.gelu(s, approximate="tanh"),
    "silu": F.silu,
    "mish": F.mish,
    "elu": lambda s: F.elu(s, alpha=0.7),
    "selu": F.selu,
    "celu": lambda s: F.celu(s, alpha=0.6),
    "leaky_relu": lambda s: F.leaky_relu(s, 0.2),
    "logsigmoid": F.logsigmoid,
    "softsign": F.softsign,
    "hardtanh": lambda s: F.hardtanh(s, -0.5, 0.8),
    "hardsigmoid": lambda s: F.hardsigmoid(s * 3.0),
    "hardswish": lambda s: F.hardswish(s * 3.0),
    "tanhshrink": F.tanhshrink,
    "softshrink": lambda s: F.softshrink(s, 0.3),
    "hardshrink": lambda s: F.hardshrink(s, 0.3),
    "threshold": lambda s: F.threshold(s, 0.2, -1.0),
    "tanh": F.tanh,
}
NO_TORCH_DERIVATIVE = {"heaviside"}  # torch's autograd has no rule: the golden gradient cannot be computed
# name -> the function called on a tensor of values (the score passed straight in), for the element checks.
REFUSED = {
    "erfinv": lambda s: torch.erfinv(torch.tanh(s)),
    "lgamma": lambda s: torch.lgamma(s.abs() + 1.0),
    "digamma": lambda s: torch.digamma(s.abs() + 1.0),
    "i0": torch.i0,
    "log_ndtr": torch.special.log_ndtr,
    "erfcx": torch.special.erfcx,
    "nextafter": lambda s: torch.nextafter(s, s + 1.0),
    "round_decimals": lambda s: torch.round(s, decimals=2),
}


def score_mod_of(fn, name: str = "pointwise"):
    def pointwise(score, b, h, q_idx, kv_idx):
        return fn(score)
    pointwise.__name__ = name  # the fallback warning is given once per name
    return pointwise


# -- 1. element by element, in the generated Triton functions ------------------------------------------

@triton.jit
def _values_and_derivatives(x_ptr, value_ptr, grad_ptr, SCORE_GRAD_FN: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)[None, :]
    score = tl.load(x_ptr + offsets)
    zero = tl.zeros([1, 1], dtype=tl.int32)
    value, grad = SCORE_GRAD_FN(score, 0, 0, zero, zero)
    tl.store(value_ptr + offsets, value)
    tl.store(grad_ptr + offsets, grad)


@triton.jit
def _values(x_ptr, value_ptr, SCORE_FN: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)[None, :]
    zero = tl.zeros([1, 1], dtype=tl.int32)
    tl.store(value_ptr + offsets, SCORE_FN(tl.load(x_ptr + offsets), 0, 0, zero, zero))


def kernel_values(fn, x: torch.Tensor):
    """(value, d value / d x) of ``fn`` on float32 ``x`` (a power-of-two count) from the generated functions."""
    functions = mod_functions(None, trace_score_mod(score_mod_of(fn)), derivative=True)
    value, grad = torch.empty_like(x), torch.empty_like(x)
    if functions.score_grad_fn is None:
        launch(_values, (1,), dict(x_ptr=x, value_ptr=value, SCORE_FN=functions.score_fn, BLOCK=x.numel()),
               interpret=True, device="cpu")
        grad.fill_(functions.score_grad_constant)
    else:
        launch(_values_and_derivatives, (1,), dict(x_ptr=x, value_ptr=value, grad_ptr=grad,
                                                   SCORE_GRAD_FN=functions.score_grad_fn, BLOCK=x.numel()),
               interpret=True, device="cpu")
    return value, grad


def reference(fn, x: torch.Tensor, dtype: torch.dtype):
    """fn and its derivative computed by torch in ``dtype`` at the float32 points ``x`` (derivative None where
    torch has none)."""
    leaf = x.to(dtype).requires_grad_(True)
    value = fn(leaf)
    try:
        (grad,) = torch.autograd.grad(value.sum(), leaf, allow_unused=True)
    except RuntimeError:  # e.g. heaviside: no derivative in torch
        return value.detach().double(), None
    return value.detach().double(), (torch.zeros_like(leaf) if grad is None else grad).double()


def assert_close_elementwise(got, expected, baseline, what: str, factor: float = 4.0, floor: float = 2e-6):
    """NaN and inf where torch's float32 result (``baseline``) has them; finite values within ``factor`` x
    torch's own float32 error at that point plus ``floor`` relative to the magnitude (the numerics rule,
    element by element, against the float64 ``expected``)."""
    got, baseline = got.double(), baseline.double()
    same_special = (torch.isnan(got) == torch.isnan(baseline)) & (torch.isinf(got) == torch.isinf(baseline))
    assert bool(same_special.all()), (
        f"{what}: NaN/inf differ at x index {(~same_special).nonzero()[:5].flatten().tolist()}")
    assert torch.equal(got[torch.isinf(baseline)], baseline[torch.isinf(baseline)]), f"{what}: infinities differ"
    finite = torch.isfinite(expected) & torch.isfinite(baseline)
    error = (got[finite] - expected[finite]).abs()
    bound = factor * (baseline[finite] - expected[finite]).abs() + floor * expected[finite].abs().clamp(min=1.0)
    worst = int((error - bound).argmax()) if error.numel() else 0
    assert bool((error <= bound).all()), (f"{what}: error {float(error[worst]):.3e} at value "
                                          f"{float(expected[finite][worst]):.6g} (bound {float(bound[worst]):.3e})")


@pytest.mark.parametrize("name", sorted(TRACED))
def test_generated_value_and_derivative_match_torch_in_float64(name):
    fn = TRACED[name]
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    x = torch.cat([torch.randn(192, generator=generator) * 3.0, torch.rand(64, generator=generator) * 40.0 - 20.0])
    value, grad = kernel_values(fn, x)
    expected_value, expected_grad = reference(fn, x, torch.float64)
    baseline_value, baseline_grad = reference(fn, x, torch.float32)
    assert_close_elementwise(value, expected_value, baseline_value, f"{name} value")
    if expected_grad is not None:
        assert_close_elementwise(grad, expected_grad, baseline_grad, f"{name} derivative", floor=2e-5)


SPECIAL = torch.tensor([math.inf, -math.inf, math.nan, 0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 1e-6, 0.5, 2.0, 30.0,
                        88.0, 89.0, 200.0, 1e20, -1e20, 3.0e38, -3.0e38])
DIRECT = {  # the function on the raw value, special values included (torch's result in float64 for float32 input)
    "tan": torch.tan, "atan": torch.atan, "asin": torch.asin, "acos": torch.acos, "sinh": torch.sinh,
    "cosh": torch.cosh, "asinh": torch.asinh, "acosh": torch.acosh, "atanh": torch.atanh, "erfc": torch.erfc,
    "atan2_y": lambda s: torch.atan2(s, torch.full_like(s, -0.0)), "atan2_x": lambda s: torch.atan2(-0.0 * s, s),
    "atan2_self": lambda s: torch.atan2(s, s), "hypot": lambda s: torch.hypot(s, s * 0.5),
    "logaddexp": lambda s: torch.logaddexp(s, s), "logaddexp_mixed": lambda s: torch.logaddexp(s, -s),
    "copysign": lambda s: torch.copysign(torch.ones_like(s) * 2.0, s), "log1p": torch.log1p,
    "fmin": lambda s: torch.fmin(s, torch.full_like(s, 0.25)), "nan_to_num": torch.nan_to_num,
    "sinc": torch.sinc, "signbit": lambda s: torch.signbit(s).float(), "frac": torch.frac,
}


@pytest.mark.parametrize("name", sorted(DIRECT))
def test_special_values_follow_torch(name):
    fn = DIRECT[name]
    x = torch.cat([SPECIAL, -SPECIAL[5:], torch.linspace(-1.0, 1.0, 32)])
    x = torch.cat([x, torch.full((128 - x.numel(),), 0.75)])
    value, _ = kernel_values(fn, x)
    expected = fn(x.double()) if name != "nan_to_num" else torch.nan_to_num(x).double()  # float32's max
    # the float64 value rounded to float32 (where it overflows, inf): torch's float32 cosh(89) overflows early
    assert_close_elementwise(value, expected.double(), expected.float(), what=name)
    # odd functions keep the sign of zero, as torch
    if name in ("tan", "atan", "asin", "sinh", "asinh", "atanh", "atan2_y", "atan2_x", "sinc", "copysign"):
        zeros = (x == 0) & (expected == 0)
        assert torch.equal(torch.signbit(value[zeros]), torch.signbit(expected[zeros].float())), name


# -- 2. and 3. attention forward and backward -------------------------------------------------------------

LENGTH, HEADS, HEAD_DIM = 24, 2, 16
GROUP_SIZE = 5  # functions per attention test (each is checked alone element by element above)
GROUPS = {f"group{i // GROUP_SIZE}_" + "_".join(names): names
          for i, names in ((i, sorted(TRACED)[i:i + GROUP_SIZE]) for i in range(0, len(TRACED), GROUP_SIZE))}


def group_score_mod(names):
    """score + the mean of the group's functions of the score: every function's value and derivative count."""
    functions = [TRACED[name] for name in names]

    def pointwise_group(score, b, h, q_idx, kv_idx):
        return score + sum(fn(score) for fn in functions) * (1.0 / len(functions))
    return pointwise_group


@pytest.mark.parametrize("backend", ["torch", "interpret"])
@pytest.mark.parametrize("name", sorted(GROUPS))
def test_attention_with_traced_functions_matches_golden(name, backend):
    from triton_attn.dispatch import ScoreModFallbackWarning, score_mod_fallback_reason

    score_mod = group_score_mod(GROUPS[name])
    assert score_mod_fallback_reason(score_mod, needs_grad=True) is None  # value and derivative compile
    q, k, v = random_qkv(1, HEADS, HEADS, LENGTH, LENGTH, HEAD_DIM)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ScoreModFallbackWarning)
        assert_matches_golden(lambda q_, k_, v_: ta.attention(q_, k_, v_, score_mod=score_mod, backend=backend,
                                                              return_lse=True),
                              q, k, v, score_mod=score_mod, context=name,
                              backward=not NO_TORCH_DERIVATIVE.intersection(GROUPS[name]))


flex = pytest.importorskip("torch.nn.attention.flex_attention")


@pytest.mark.parametrize("name", sorted(GROUPS))
def test_interpreter_matches_torch_flex_attention_in_float64(name):
    # Flex's backward does not run on CPU: the forward (out and lse) is compared here, the gradients above.
    score_mod = group_score_mod(GROUPS[name])
    q, k, v = random_qkv(1, HEADS, HEADS, LENGTH, LENGTH, HEAD_DIM)
    their_out, their_lse = flex.flex_attention(q.double(), k.double(), v.double(), score_mod=score_mod, return_lse=True)
    our_out, our_lse = ta.attention(q, k, v, score_mod=score_mod, backend="interpret", return_lse=True)
    base_out, base_lse = dense_attention(q, k, v, score_mod=score_mod)
    checks = [compare("out", our_out, base_out, their_out, 2.0, torch.float32),
              compare("lse", our_lse, base_lse, their_lse, 2.0, torch.float32)]
    failed = [c for c in checks if not c.error <= c.bound]
    assert not failed, f"{name}: " + "; ".join(map(str, failed))


# -- refused functions ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_function_names_itself_and_runs_exactly_on_the_torch_backend(name):
    score_mod = score_mod_of(REFUSED[name], f"refused_{name}")
    expected_name = {"round_decimals": "round", "log_ndtr": "log_ndtr", "erfcx": "erfcx"}.get(name, name)
    with pytest.raises(UntraceableModError, match=expected_name):
        trace_score_mod(score_mod)
    q, k, v = random_qkv(1, HEADS, HEADS, LENGTH, LENGTH, HEAD_DIM)
    from triton_attn.dispatch import ScoreModFallbackWarning

    with pytest.warns(ScoreModFallbackWarning, match="PyTorch blockwise backend"):
        got = ta.attention(q, k, v, score_mod=score_mod, backend="interpret")
    torch.testing.assert_close(got, ta.attention(q, k, v, score_mod=score_mod, backend="torch"))


def test_every_traced_name_has_a_handler():
    from triton_attn.masks import pointwise

    names = list(pointwise.UNARY_NODES) + list(pointwise.UNARY_COMPOSITES) + list(pointwise.BINARY_COMPOSITES)
    for name in names + ["round", "nan_to_num", "logit", "lerp", "heaviside"]:
        assert any(getattr(namespace, name, None) in HANDLERS
                   for namespace in (torch, torch.Tensor, torch.special)), name
