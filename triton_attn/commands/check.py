"""``triton-attn check``: every available backend against the float64 golden result, at tiny sizes."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import List, Optional

from .common import (
    CommandError,
    NamedMask,
    Progress,
    available_backends,
    library_mask,
    parse_device,
    parse_dtype,
    positive_int,
)

FLOOR = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 1e-2}


@dataclass
class CheckRow:
    backend: str
    mask: str
    dtype: str
    forward_error: float
    forward_bound: float
    backward_error: Optional[float]
    backward_bound: Optional[float]
    note: str = ""

    @property
    def ok(self) -> bool:
        forward = self.forward_error <= self.forward_bound
        backward = self.backward_error is None or self.backward_error <= self.backward_bound
        return forward and backward and not self.note.startswith("error")


def _max_error(a, golden) -> float:
    import torch

    a, golden = a.double(), golden.double()
    both_inf = torch.isinf(a) & torch.isinf(golden) & (torch.sign(a) == torch.sign(golden))
    diff = torch.where(both_inf, torch.zeros_like(a), (a - golden).abs())
    return float(diff.nan_to_num(float("inf")).max()) if diff.numel() else 0.0


def _floor(dtype_name: str, golden) -> float:
    import torch

    finite = golden[torch.isfinite(golden)]
    magnitude = float(finite.abs().max()) if finite.numel() else 0.0
    return FLOOR[dtype_name] * max(1.0, magnitude)


def check_case(backend: str, named: NamedMask, dtype, device, *, seq_len: int = 80, heads: int = 2, kv_heads: int = 1,
               head_dim: int = 32, block_size: int = 32, backward: bool = True) -> CheckRow:
    """Forward (out, lse) and backward (dq, dk, dv) of ``backend`` against the float64 golden result, with the
    numerics rule of docs/design.md (2x / 3x the error of plain same-dtype PyTorch, plus a floor)."""
    import torch

    from ..api import attention
    from ..masks import create_block_mask
    from ..reference import dense_attention

    dtype_name = str(dtype).replace("torch.", "")
    generator = torch.Generator().manual_seed(1234)
    shapes = [(1, heads, seq_len, head_dim), (1, kv_heads, seq_len, head_dim), (1, kv_heads, seq_len, head_dim)]
    base = [torch.randn(*s, generator=generator).to(dtype).to(device) for s in shapes]
    grad_out = torch.randn(1, heads, seq_len, head_dim, generator=generator).to(dtype).to(device)
    block_mask = None
    if named.mask_mod is not None:
        block_mask = create_block_mask(named.mask_mod, None, None, seq_len, seq_len, device=device,
                                       BLOCK_SIZE=block_size)

    def run(fn, compute_dtype):
        inputs = [t.detach().clone().to(compute_dtype).requires_grad_(backward) for t in base]
        out, lse = fn(*inputs)
        grads = None
        if backward:
            grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
        return out.detach(), lse.detach(), grads

    golden = run(lambda q, k, v: dense_attention(q, k, v, mask_mod=named.mask_mod, score_mod=named.score_mod,
                                                 compute_dtype=torch.float64), torch.float64)
    plain = run(lambda q, k, v: dense_attention(q, k, v, mask_mod=named.mask_mod, score_mod=named.score_mod), dtype)
    try:
        ours = run(lambda q, k, v: attention(q, k, v, block_mask=block_mask, score_mod=named.score_mod,
                                             enable_gqa=heads != kv_heads, return_lse=True, backend=backend), dtype)
    except Exception as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return CheckRow(backend, named.name, dtype_name, math.inf, 0.0, None, None,
                        f"error: {type(error).__name__}: {message}"[:160])
    def worst(found, plain_found, truth, factor):
        """(error, bound) of the tensor closest to (or furthest past) its own bound."""
        errors = [_max_error(o, g) for o, g in zip(found, truth)]
        bounds = [factor * _max_error(p, g) + _floor(dtype_name, g) for p, g in zip(plain_found, truth)]
        index = max(range(len(errors)), key=lambda i: errors[i] / bounds[i] if bounds[i] else math.inf)
        return errors[index], bounds[index]

    forward_error, forward_bound = worst(ours[:2], plain[:2], golden[:2], 2.0)
    backward_error = backward_bound = None
    if backward:
        backward_error, backward_bound = worst(ours[2], plain[2], golden[2], 3.0)
    return CheckRow(backend, named.name, dtype_name, forward_error, forward_bound, backward_error, backward_bound)


CHECK_MASKS = ("none", "causal", "sliding_window", "document", "prefix_lm", "softcap")


def targets_command(args) -> int:
    """``check --targets``: the ahead-of-time matrix (``kernels.matrix``) for the named targets."""
    from ..kernels import matrix, targets

    try:
        chosen = targets.parse_names(args.targets)
    except ValueError as error:
        raise CommandError(f"--targets: {error}") from None
    families = tuple(f.strip() for f in args.families.split(",")) if args.families else matrix.FAMILIES
    unknown = [f for f in families if f not in matrix.FAMILIES]
    if unknown:
        raise CommandError(f"--families: unknown {', '.join(unknown)}; known: {', '.join(matrix.FAMILIES)}")
    jobs = positive_int(args.jobs, "--jobs")
    try:
        import triton.compiler  # noqa: F401
    except ImportError as error:
        raise CommandError(f"building ahead of time needs Triton ({error})") from None
    cases = matrix.cases(chosen, fast=args.fast, families=families)
    print(f"triton-attn check --targets: {len(cases)} ahead-of-time builds for {', '.join(t.name for t in chosen)} "
          f"(default configs; no GPU needed)")
    with Progress(len(cases), "aot build", enabled=not args.quiet and sys.stderr.isatty()) as progress:
        rows = matrix.run(cases, jobs=jobs, progress=lambda case: progress.advance(case.label))
    print(matrix.markdown_table(rows) if args.markdown else matrix.format_table(rows))
    print(matrix.summary(rows))
    return 0 if all(row.ok for row in rows) else 1


def check_command(args) -> int:
    import torch

    if getattr(args, "targets", None):
        return targets_command(args)

    device = parse_device(args.device)
    backends = available_backends(device)
    names = [name for name, ok, _ in backends if ok]
    if args.backend:
        status = {name: (ok, why) for name, ok, why in backends}
        if args.backend not in status:
            raise CommandError(f"unknown backend {args.backend!r}")
        ok, why = status[args.backend]
        if not ok:
            raise CommandError(f"backend {args.backend!r} is not available on {device.type}: {why}")
        names = [args.backend]
    skipped = [(name, why) for name, ok, why in backends if not ok and name not in names]
    dtypes = [parse_dtype(d) for d in args.dtype] if args.dtype else (
        [torch.bfloat16, torch.float16] if device.type == "cuda" else [torch.float32])
    seq_len = positive_int(args.seq_len, "--seq-len")
    cases = [(b, m, d) for b in names for m in CHECK_MASKS for d in dtypes]
    print(f"triton-attn check on {device}: B=1, Hq=2, Hkv=1 (GQA), L={seq_len}, D=32, BLOCK_SIZE=32; "
          f"against the float64 golden result")
    rows: List[CheckRow] = []
    with Progress(len(cases), "check", enabled=not args.quiet and sys.stderr.isatty()) as progress:
        for backend, mask_name, dtype in cases:
            named = library_mask(mask_name, seq_len, window=max(1, seq_len // 3), prefix=max(1, seq_len // 4),
                                 documents=3, cap=2.0, device=device)
            rows.append(check_case(backend, named, dtype, device, seq_len=seq_len, backward=not args.no_backward))
            progress.advance(f"{backend} {mask_name} {str(dtype).replace('torch.', '')}")
    header = (f"{'backend':<10} {'mask':<15} {'dtype':<9} {'fwd error':>10} {'bound':>9} {'bwd error':>10} "
              f"{'bound':>9}  result")
    print(header)
    print("-" * len(header))
    for row in rows:
        bwd = (f"{row.backward_error:>10.2e} {row.backward_bound:>9.1e}" if row.backward_error is not None
               else f"{'-':>10} {'-':>9}")
        fwd = f"{row.forward_error:>10.2e} {row.forward_bound:>9.1e}" if math.isfinite(row.forward_error) else \
            f"{'-':>10} {'-':>9}"
        print(f"{row.backend:<10} {row.mask:<15} {row.dtype:<9} {fwd} {bwd}  {'ok' if row.ok else 'FAIL'}"
              + (f"  {row.note}" if row.note else ""))
    for name, why in skipped:
        print(f"skipped backend {name}: {why}")
    failed = sum(not row.ok for row in rows)
    print(f"{len(rows) - failed}/{len(rows)} passed" + ("" if not failed else f"; {failed} FAILED"))
    return 0 if not failed else 1
