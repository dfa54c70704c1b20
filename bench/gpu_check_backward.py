"""Backward section of ``bench/gpu_check.py``: the Triton backward kernels on a real GPU.

``backward_section()`` checks, per mask and sequence length, that ``triton_attn.attention``'s
gradients (dQ, dK, dV) match a float32 SDPA reference built from the same inputs, that two
backward passes are bitwise equal (determinism), and measures backward TFLOP/s against SDPA and
compiled FlexAttention. Work counted: ``2.5 * 4 * B * Hq * D * allowed (q, kv) pairs`` (2.5x the
forward's FLOPs); time is the backward pass alone (the graph is built once, ``retain_graph``).

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
from typing import Callable, Dict, List, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import triton_attn as ta  # noqa: E402
from triton_attn.masks import and_masks, causal_mask, document_mask, sliding_window_mask, softcap_score  # noqa: E402


def _masks(seq_len: int, device: str) -> Dict[str, Optional[Callable]]:
    documents = max(2, seq_len // 1024)
    ids = (torch.arange(seq_len, device=device) * documents) // seq_len
    window = sliding_window_mask(max(64, min(1024, seq_len // 8)))
    return {"none": None, "causal": causal_mask, "sliding_window": window,
            "document": and_masks(causal_mask, document_mask(ids)), "softcap_causal": causal_mask}


def _time_ms(fn: Callable[[], object], repeats: int) -> float:
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
    return _time_ms(lambda: torch.autograd.grad(out, inputs, grad_out, retain_graph=True), repeats)


def backward_section(*, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, batch: int = 2, q_heads: int = 16,
                     kv_heads: int = 16, head_dim: int = 128, seq_lens: Sequence[int] = (1024, 4096),
                     masks: Optional[Sequence[str]] = None, repeats: int = 10, with_flex: bool = True,
                     backend: str = "triton", log: Callable[[str], None] = print) -> List[dict]:
    """Correctness, determinism and backward TFLOP/s of ours vs SDPA and FlexAttention; one row per (mask, L, impl).

    backend: "triton" on the GPU; "interpret" (CPU tensors, ``device="cpu"``) only to smoke-test this script.
    """
    compiled_flex = None
    if with_flex:  # imported only when asked for: the rest of the check runs without FlexAttention
        from torch.nn.attention import flex_attention as flex_module

        compiled_flex = torch.compile(flex_module.flex_attention, dynamic=False)
    rows = []
    for seq_len in seq_lens:
        for name, mask_mod in _masks(seq_len, device).items():
            if masks is not None and name not in masks:
                continue
            score_mod = softcap_score(20.0) if name == "softcap_causal" else None
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
                return ta.attention(q_, k_, v_, block_mask=block_mask, score_mod=score_mod, enable_gqa=gqa,
                                    backend=backend)

            # Correctness vs a float32 SDPA reference (softcap: skip the reference, check determinism only).
            grads = torch.autograd.grad(ours(q, k, v), (q, k, v), grad_out)
            again = torch.autograd.grad(ours(q, k, v), (q, k, v), grad_out)
            deterministic = all(torch.equal(a, b) for a, b in zip(grads, again))
            error = bound = float("nan")
            if score_mod is None:
                leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
                reference = torch.nn.functional.scaled_dot_product_attention(
                    *leaves, attn_mask=dense, enable_gqa=gqa)
                ref_grads = torch.autograd.grad(reference, leaves, grad_out.float())
                error = max(float((a.float() - b).abs().max()) for a, b in zip(grads, ref_grads))
                # The numerics rule's yardstick: SDPA's own gradients in the input dtype against the same reference.
                plain = [t.detach().requires_grad_() for t in (q, k, v)]
                plain_out = torch.nn.functional.scaled_dot_product_attention(
                    *plain, attn_mask=dense, enable_gqa=gqa)
                plain_grads = torch.autograd.grad(plain_out, plain, grad_out)
                baseline = max(float((a.float() - b).abs().max()) for a, b in zip(plain_grads, ref_grads))
                magnitude = max(float(b.abs().max()) for b in ref_grads)
                bound = (3.0 * baseline
                         + {torch.float16: 1e-3, torch.bfloat16: 1e-2}.get(dtype, 1e-5) * max(1.0, magnitude))

            timings = {"ours": _backward_timer(ours, (q, k, v), grad_out, repeats)}
            if score_mod is None:
                timings["sdpa"] = _backward_timer(
                    lambda q_, k_, v_: torch.nn.functional.scaled_dot_product_attention(
                        q_, k_, v_, attn_mask=None if name in ("none", "causal") else dense,
                        is_causal=name == "causal", enable_gqa=gqa), (q, k, v), grad_out, repeats)
            if compiled_flex is not None:
                flex_mask = block_mask.to_flex() if block_mask is not None else None
                flex_score = (lambda s, b, h, qi, ki: 20.0 * torch.tanh(s / 20.0)) if score_mod else None
                try:
                    timings["flex"] = _backward_timer(
                        lambda q_, k_, v_: compiled_flex(q_, k_, v_, score_mod=flex_score, block_mask=flex_mask,
                                                         enable_gqa=gqa), (q, k, v), grad_out, repeats)
                except Exception as failure:  # a FlexAttention that does not compile here is reported, not fatal
                    log(f"flex failed for {name} L={seq_len}: {type(failure).__name__}: {failure}")
            for impl, ms in timings.items():
                row = dict(pass_="backward", mask=name, seq_len=seq_len, impl=impl,
                           dtype=str(dtype).split(".")[-1], batch=batch, q_heads=q_heads, kv_heads=kv_heads,
                           head_dim=head_dim, ms=round(ms, 4),
                           tflops=round(flops / (ms * 1e-3) / 1e12, 2),
                           max_grad_error=error if impl == "ours" else float("nan"),
                           bound=bound if impl == "ours" else float("nan"),
                           ok=(deterministic and not error > bound) if impl == "ours" else None,
                           deterministic=deterministic if impl == "ours" else None)
                rows.append(row)
                log(format_rows([row], header=False))
    return rows


def format_rows(rows: Sequence[dict], header: bool = True) -> str:
    """A fixed-width table of ``backward_section`` rows."""
    lines = [f"{'mask':<16}{'L':>6} {'impl':<6}{'ms':>10}{'TFLOP/s':>9}{'grad err':>10} det"] if header else []
    for row in rows:
        error = "" if math.isnan(row["max_grad_error"]) else f"{row['max_grad_error']:.2e}"
        lines.append(f"{row['mask']:<16}{row['seq_len']:>6} {row['impl']:<6}{row['ms']:>10.3f}{row['tflops']:>9.1f}"
                     f"{error:>10} {'' if row['deterministic'] is None else row['deterministic']}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one length, fewer repeats, no FlexAttention")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA or ROCm device: the backward GPU check needs one")
        return 1
    if args.quick:
        rows = backward_section(seq_lens=(1024,), repeats=3, with_flex=False)
    else:
        rows = backward_section()
    print(format_rows(rows))
    bad = [r for r in rows if r["impl"] == "ours" and (r["deterministic"] is False)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
