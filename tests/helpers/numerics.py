"""The numerics rule of docs/design.md, as reusable test helpers.

A backend is compared against a float64 *golden* result computed from the same (already
low-precision) inputs. The yardstick is the *baseline*: plain eager PyTorch
(``dense_attention``) run entirely in the input dtype, gradients from autograd in that dtype.
A candidate passes when, for every compared tensor,

    max|candidate - golden| <= factor * max|baseline - golden| + floor

with ``factor`` 2 for the forward pass (out, lse) and 3 for the backward pass (dq, dk, dv and
any extra learnable tensor), and ``floor = FLOOR[dtype] * max(1, max|golden|)``.

Why a floor at all: the baseline error can be (nearly) zero by accident, e.g. a row that
attends to a single key returns that value exactly, or Lkv == 1, and a correct kernel that
accumulates in float32 and rounds once to the output dtype can still be off by half an ulp.
Each floor is therefore about one rounding step of the dtype at magnitude 1, scaled by the
magnitude of the golden tensor:

- float32: 1e-5. The unit roundoff is 6e-8; blockwise softmax with a different summation
  order and a final division legitimately differs by tens of ulps on rows of ~300 keys.
- float16: 1e-3. Unit roundoff 4.9e-4 (ulp of 1.0 is 9.8e-4): one rounding of the output.
- bfloat16: 1e-2. Unit roundoff 3.9e-3 (ulp of 1.0 is 7.8e-3): one rounding of the output.
- float64 inputs (the torch backend accepts them): 1e-12.

Usage::

    report = assert_matches_golden(
        lambda q, k, v: ta.attention(q, k, v, block_mask=bm, return_lse=True),
        q, k, v, mask_mod=bm.mask_mod)

``candidate`` receives fresh leaf tensors with the same strides as ``q``/``k``/``v`` (so
non-contiguous inputs stay non-contiguous) and returns ``out`` or ``(out, lse)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from triton_attn.reference import dense_attention

FORWARD_FACTOR = 2.0
BACKWARD_FACTOR = 3.0
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def floor_for(dtype: torch.dtype, golden: torch.Tensor) -> float:
    """The absolute error allowed on top of the factor: ``FLOOR[dtype]`` scaled by max(1, max|golden|)."""
    finite = golden[torch.isfinite(golden)]
    magnitude = float(finite.abs().max()) if finite.numel() else 0.0
    return FLOOR[dtype] * max(1.0, magnitude)


def random_qkv(batch: int, q_heads: int, kv_heads: int, q_len: int, kv_len: int, head_dim: int,
               value_dim: Optional[int] = None, *, dtype=torch.float32, device="cpu", layout: str = "contiguous",
               generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh ``randn`` q, k, v in ``dtype``, laid out as asked.

    layout: ``contiguous``; ``transposed`` (stored [B, L, H, D], viewed as [B, H, L, D]);
    ``strided`` (every other element of a wider last dim); ``expanded`` (batch dim of stride 0).
    """
    value_dim = head_dim if value_dim is None else value_dim

    def make(heads, length, dim):
        def draw(*shape):
            return torch.randn(*shape, generator=generator, dtype=torch.float32, device=device).to(dtype)
        if layout == "contiguous":
            return draw(batch, heads, length, dim)
        if layout == "transposed":
            return draw(batch, length, heads, dim).transpose(1, 2)
        if layout == "strided":
            return draw(batch, heads, length, 2 * dim)[..., ::2]
        if layout == "expanded":
            return draw(1, heads, length, dim).expand(batch, heads, length, dim)
        raise ValueError(f"unknown layout {layout!r}")

    return make(q_heads, q_len, head_dim), make(kv_heads, kv_len, head_dim), make(kv_heads, kv_len, value_dim)


@dataclass
class Run:
    """Outputs of one attention implementation: out, lse, and gradients by name."""
    out: torch.Tensor
    lse: Optional[torch.Tensor]
    grads: Dict[str, torch.Tensor] = field(default_factory=dict)


def _run(fn: Callable, inputs: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
         grad_out: Optional[torch.Tensor]) -> Run:
    result = fn(*inputs)
    out, lse = result if isinstance(result, tuple) else (result, None)
    grads = {}
    if grad_out is not None:
        wrt = list(inputs) + list(params)
        computed = torch.autograd.grad(out, wrt, grad_out.to(out.dtype), allow_unused=True)
        names = ["dq", "dk", "dv"] + [f"param{i}" for i in range(len(params))]
        for name, tensor, grad in zip(names, wrt, computed):
            grads[name] = torch.zeros_like(tensor) if grad is None else grad
    return Run(out.detach(), None if lse is None else lse.detach(), grads)


def golden_attention(q, k, v, *, mask_mod=None, score_mod=None, scale=None, params=(), grad_out=None) -> Run:
    """The float64 golden result (and float64 gradients, when ``grad_out`` is given) from the same inputs."""
    leaves = [t.detach().double().requires_grad_(grad_out is not None) for t in (q, k, v)]
    return _run(lambda q_, k_, v_: dense_attention(q_, k_, v_, mask_mod=mask_mod, score_mod=score_mod, scale=scale,
                                                   compute_dtype=torch.float64),
                leaves, params, grad_out)


def baseline_attention(q, k, v, *, mask_mod=None, score_mod=None, scale=None, params=(), grad_out=None) -> Run:
    """Plain eager PyTorch in the input dtype: the yardstick of the numerics rule."""
    leaves = [t.detach().requires_grad_(grad_out is not None) for t in (q, k, v)]
    return _run(lambda q_, k_, v_: dense_attention(q_, k_, v_, mask_mod=mask_mod, score_mod=score_mod, scale=scale,
                                                   compute_dtype=q.dtype),
                leaves, params, grad_out)


def max_error(actual: torch.Tensor, golden: torch.Tensor) -> float:
    """max |actual - golden| in float64; positions where golden is -inf must be -inf in actual too."""
    actual, golden = actual.double(), golden.double()
    assert actual.shape == golden.shape, f"shape {tuple(actual.shape)} != golden {tuple(golden.shape)}"
    assert not torch.isnan(actual).any(), "NaN in result"
    infinite = torch.isinf(golden)
    if infinite.any() or torch.isinf(actual).any():
        mismatch = (torch.isinf(actual) != infinite) | (infinite & (actual != golden))
        assert not mismatch.any(), (
            f"infinities differ from golden at {int(mismatch.sum())} positions, e.g. index "
            f"{tuple(mismatch.nonzero()[0].tolist())}")
    finite = ~infinite
    if not finite.any():
        return 0.0
    return float((actual[finite] - golden[finite]).abs().max())


@dataclass
class Comparison:
    name: str
    error: float
    baseline_error: float
    bound: float

    def __str__(self):
        return (f"{self.name}: error {self.error:.3e} vs bound {self.bound:.3e} "
                f"(baseline error {self.baseline_error:.3e})")


def compare(name: str, actual: torch.Tensor, baseline: torch.Tensor, golden: torch.Tensor, factor: float,
            dtype: torch.dtype) -> Comparison:
    error, base = max_error(actual, golden), max_error(baseline, golden)
    return Comparison(name, error, base, factor * base + floor_for(dtype, golden))


def assert_matches_golden(candidate: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                          mask_mod=None, score_mod=None, scale=None, params: Sequence[torch.Tensor] = (),
                          backward: bool = True, grad_out: Optional[torch.Tensor] = None,
                          forward_factor: float = FORWARD_FACTOR, backward_factor: float = BACKWARD_FACTOR,
                          context: str = "") -> List[Comparison]:
    """Check ``candidate`` against the golden result under the numerics rule; return the comparisons.

    ``mask_mod``/``score_mod``/``scale`` describe the same attention densely for the golden and
    baseline results. ``params``: extra learnable tensors (captured by ``score_mod``) whose
    gradients are compared too. ``backward``: also compare dq, dk, dv (and ``params``) for a
    fresh random ``grad_out`` (or the one given).
    """
    dtype = q.dtype
    if backward and grad_out is None:
        out_shape = (q.shape[0], q.shape[1], q.shape[2], v.shape[3])
        grad_out = torch.randn(out_shape, dtype=torch.float32, device=q.device).to(dtype)
    grad_out = grad_out if backward else None
    kwargs = dict(mask_mod=mask_mod, score_mod=score_mod, scale=scale, params=params, grad_out=grad_out)
    gold = golden_attention(q, k, v, **kwargs)
    base = baseline_attention(q, k, v, **kwargs)
    leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]
    got = _run(candidate, leaves, params, grad_out)

    assert got.out.dtype == dtype, f"out dtype {got.out.dtype}, expected the input dtype {dtype}"
    comparisons = [compare("out", got.out, base.out, gold.out, forward_factor, dtype)]
    if got.lse is not None:
        lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # float64 inputs: float64, as Flex
        assert got.lse.dtype == lse_dtype, f"lse dtype {got.lse.dtype}, expected {lse_dtype}"
        comparisons.append(compare("lse", got.lse, base.lse, gold.lse, forward_factor, dtype))
    for name in got.grads:
        assert got.grads[name].shape == gold.grads[name].shape, f"{name} shape"
        assert torch.isfinite(got.grads[name]).all(), f"{name} has non-finite entries"
        comparisons.append(compare(name, got.grads[name], base.grads[name], gold.grads[name], backward_factor, dtype))
    failed = [c for c in comparisons if not c.error <= c.bound]
    assert not failed, (f"numerics rule violated {context}: " + "; ".join(map(str, failed))
                        + " | all: " + "; ".join(map(str, comparisons)))
    return comparisons
