"""Backward section of ``bench/gpu_check.py``: the Triton backward kernels on a real GPU.

``backward_section()`` checks, per mask and sequence length, that ``triton_attn.attention``'s
gradients (dQ, dK, dV) match a float32 SDPA reference built from the same inputs (the numerics rule:
at most 3x bf16 SDPA's own error, plus a floor), that two backward passes are bitwise equal
(determinism), and measures backward TFLOP/s against SDPA and, when given a ``CompiledFlex``
(``gpu_check_flex``), compiled FlexAttention. Work counted: ``2.5 * 4 * B * Hq * D * allowed (q, kv)
pairs`` (2.5x the forward's FLOPs); time is the backward pass alone (the graph is built once,
``retain_graph``).

A comparison that raises (or runs out of memory) becomes a row, ``guarded_rows``: a FAIL row with the
error (a skipped row for out-of-memory), and the other masks and lengths still run.

The masks are the efficiency section's at the same length (``shared_masks``: window ``min(1024, L // 4)``,
softcap 30), so both sections run the same compiled kernels.

``gpu_check.py`` imports and calls it::

    from gpu_check_backward import backward_section, format_rows
    rows = backward_section()
    print(format_rows(rows))

Run standalone: ``python bench/gpu_check_backward.py [--quick]``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import triton_attn as ta  # noqa: E402
from triton_attn.masks import and_masks, causal_mask, document_mask, sliding_window_mask, softcap_score  # noqa: E402

SOFTCAP = 30.0
FLOOR = {torch.float16: 1e-3, torch.bfloat16: 1e-2}


def shared_masks(seq_len: int, device) -> Dict[str, Tuple[Optional[Callable], Optional[Callable]]]:
    """name -> (mask_mod, score_mod) of the masks the backward and efficiency sections share at ``seq_len``."""
    documents = max(2, seq_len // 1024)
    ids = (torch.arange(seq_len, device=device) * documents) // seq_len
    return {"none": (None, None), "causal": (causal_mask, None),
            "sliding_window": (sliding_window_mask(min(1024, max(16, seq_len // 4))), None),
            "document": (and_masks(causal_mask, document_mask(ids)), None),
            "softcap_causal": (causal_mask, softcap_score(SOFTCAP))}


def time_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` in ms (CUDA events; perf_counter off CUDA), after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if not torch.cuda.is_available():
            start_s = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start_s) * 1e3)
            continue
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _backward_timer(forward: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], grad_out: torch.Tensor,
                    repeats: int) -> float:
    out = forward(*inputs)
    return time_ms(lambda: torch.autograd.grad(out, inputs, grad_out, retain_graph=True), repeats)


def guarded_rows(label: dict, compare: Callable[[], List[dict]]) -> List[dict]:
    """``compare()``'s rows, or, when it raises, one row for ``label`` saying so: out of GPU memory is a
    skipped row (``ok`` None), any other exception a FAIL row (``ok`` False) with the error."""
    failure = None
    try:
        return compare()
    except torch.cuda.OutOfMemoryError as error:
        failure = (None, f"skipped: out of GPU memory ({str(error).splitlines()[0][:120]})")
    except Exception as error:  # a mismatch that raised, a kernel that failed: a row, and the run goes on
        failure = (False, f"error: {type(error).__name__}: {error}"[:200])
    # Outside the handler: its traceback, holding the case's tensors, is gone.
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    ok, note = failure
    return [dict(label, pass_="backward", impl="ours", ms=float("nan"), tflops=float("nan"),
                 max_grad_error=float("nan"), bound=float("nan"), ok=ok, deterministic=None, note=note)]


def backward_section(*, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, batch: int = 2, q_heads: int = 16,
                     kv_heads: int = 16, head_dim: int = 128, seq_lens: Sequence[int] = (1024, 4096),
                     masks: Optional[Sequence[str]] = None, repeats: int = 10, flex=None,
                     backend: str = "triton", log: Callable[[str], None] = print) -> List[dict]:
    """Correctness, determinism and backward TFLOP/s of ours vs SDPA (and ``flex``, a
    ``gpu_check_flex.CompiledFlex``, when given); one row per (mask, L, impl).

    backend: "triton" on the GPU; "interpret" (CPU tensors, ``device="cpu"``) only to smoke-test this script.
    """
    rows = []
    for seq_len in seq_lens:
        for name, (mask_mod, score_mod) in shared_masks(seq_len, device).items():
            if masks is not None and name not in masks:
                continue
            label = dict(mask=name, seq_len=seq_len, dtype=str(dtype).split(".")[-1], batch=batch, q_heads=q_heads,
                         kv_heads=kv_heads, head_dim=head_dim)
            case = dict(label, mask_mod=mask_mod, score_mod=score_mod, device=device, dtype=dtype,
                        repeats=repeats, flex=flex, backend=backend, log=log)
            found = guarded_rows(label, lambda case=case: compare_case(**case))
            for row in found:
                log(format_rows([row], header=False))
            rows += found
    return rows


def compare_case(*, mask: str, seq_len: int, mask_mod, score_mod, device, dtype, batch: int, q_heads: int,
                 kv_heads: int, head_dim: int, repeats: int, flex, backend: str, log: Callable[[str], None],
                 **label) -> List[dict]:
    """The rows of one (mask, length): ours (correctness, determinism, time), SDPA and FlexAttention (times)."""
    torch.manual_seed(0)
    shape_q, shape_kv = (batch, q_heads, seq_len, head_dim), (batch, kv_heads, seq_len, head_dim)
    q = torch.randn(shape_q, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(shape_kv, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(shape_kv, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(shape_q, device=device, dtype=dtype)
    block_mask = dense = None
    if mask_mod is not None:
        block_mask = ta.create_block_mask(mask_mod, None, None, seq_len, seq_len, device=device)
        dense = ta.create_mask(mask_mod, 1, 1, seq_len, seq_len, device=device)
    allowed = float(dense.sum()) if dense is not None else float(seq_len * seq_len)
    flops = 2.5 * 4.0 * batch * q_heads * head_dim * allowed
    gqa = q_heads != kv_heads

    def ours(q_, k_, v_):
        return ta.attention(q_, k_, v_, block_mask=block_mask, score_mod=score_mod, enable_gqa=gqa, backend=backend)

    # Correctness vs a float32 SDPA reference (softcap: SDPA has no score_mod, determinism only).
    grads = torch.autograd.grad(ours(q, k, v), (q, k, v), grad_out)
    again = torch.autograd.grad(ours(q, k, v), (q, k, v), grad_out)
    deterministic = all(torch.equal(a, b) for a, b in zip(grads, again))
    error = bound = float("nan")
    if score_mod is None:
        leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
        reference = torch.nn.functional.scaled_dot_product_attention(*leaves, attn_mask=dense, enable_gqa=gqa)
        ref_grads = torch.autograd.grad(reference, leaves, grad_out.float())
        error = max(float((a.float() - b).abs().max()) for a, b in zip(grads, ref_grads))
        # The numerics rule's yardstick: SDPA's own gradients in the input dtype against the same reference.
        plain = [t.detach().requires_grad_() for t in (q, k, v)]
        plain_out = torch.nn.functional.scaled_dot_product_attention(*plain, attn_mask=dense, enable_gqa=gqa)
        plain_grads = torch.autograd.grad(plain_out, plain, grad_out)
        baseline = max(float((a.float() - b).abs().max()) for a, b in zip(plain_grads, ref_grads))
        magnitude = max(float(b.abs().max()) for b in ref_grads)
        bound = 3.0 * baseline + FLOOR.get(dtype, 1e-5) * max(1.0, magnitude)

    timings, notes = {"ours": _backward_timer(ours, (q, k, v), grad_out, repeats)}, {}
    if score_mod is None:
        timings["sdpa"] = _backward_timer(
            lambda q_, k_, v_: torch.nn.functional.scaled_dot_product_attention(
                q_, k_, v_, attn_mask=None if mask in ("none", "causal") else dense,
                is_causal=mask == "causal", enable_gqa=gqa), (q, k, v), grad_out, repeats)
    if flex is not None:
        flex_mask = block_mask.to_flex() if block_mask is not None else None
        since = flex.snapshot()
        try:
            ms = _backward_timer(lambda q_, k_, v_: flex(q_, k_, v_, score_mod=score_mod, block_mask=flex_mask,
                                                         enable_gqa=gqa), (q, k, v), grad_out, repeats)
            verdict = flex.verdict(since)
            notes["flex"] = verdict.note
            if verdict.ok:
                timings["flex"] = ms
            else:
                log(f"flex ran eagerly for {mask} L={seq_len}: {verdict.note}")
        except Exception as failure:  # a FlexAttention that does not compile here is reported, not fatal
            notes["flex"] = f"error: {type(failure).__name__}: {failure}"[:200]
            log(f"flex failed for {mask} L={seq_len}: {notes['flex']}")
    rows = []
    for impl, ms in timings.items():
        shape = dict(mask=mask, seq_len=seq_len, dtype=str(dtype).split(".")[-1], batch=batch, q_heads=q_heads,
                     kv_heads=kv_heads, head_dim=head_dim)
        rows.append(dict(label, **shape, pass_="backward", impl=impl, ms=round(ms, 4),
                         tflops=round(flops / (ms * 1e-3) / 1e12, 2),
                         max_grad_error=error if impl == "ours" else float("nan"),
                         bound=bound if impl == "ours" else float("nan"),
                         ok=(deterministic and not error > bound) if impl == "ours" else None,
                         deterministic=deterministic if impl == "ours" else None,
                         note=notes.get(impl, "" if impl != "ours" or deterministic else "NOT deterministic")))
    if "flex" in notes and "flex" not in timings:  # an eager fallback or an error: said, not timed
        rows.append(dict(rows[0], impl="flex", ms=float("nan"), tflops=float("nan"), ok=False, deterministic=None,
                         max_grad_error=float("nan"), bound=float("nan"), note=notes["flex"]))
    return rows


def format_rows(rows: Sequence[dict], header: bool = True) -> str:
    """A fixed-width table of ``backward_section`` rows."""
    lines = [f"{'mask':<16}{'L':>6} {'impl':<6}{'ms':>10}{'TFLOP/s':>9}{'grad err':>10} det"] if header else []
    for row in rows:
        error = "" if math.isnan(row["max_grad_error"]) else f"{row['max_grad_error']:.2e}"
        lines.append(f"{row['mask']:<16}{row['seq_len']:>6} {row['impl']:<6}{row['ms']:>10.3f}{row['tflops']:>9.1f}"
                     f"{error:>10} {'' if row['deterministic'] is None else row['deterministic']}"
                     f"{'  ' + row['note'] if row.get('note') else ''}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one length, fewer repeats, no FlexAttention")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA or ROCm device: the backward GPU check needs one")
        return 1
    if args.quick:
        rows = backward_section(seq_lens=(1024,), repeats=3)
    else:
        from gpu_check_flex import CompiledFlex, flex_limits

        with flex_limits():
            rows = backward_section(flex=CompiledFlex())
    print(format_rows(rows))
    bad = [r for r in rows if r["impl"] == "ours" and r["ok"] is False]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
