"""Efficiency section of ``bench/gpu_check.py`` (issue 12): forward and backward TFLOP/s, side by side.

One table, bf16, head_dim 128, batch 1, 16 query heads, at 4k and 16k tokens: ``triton_attn``,
SDPA (the flash kernel where it applies: no mask or causal; otherwise SDPA with the dense mask) and
compiled FlexAttention, for

- ``dense`` (no mask), ``causal``, ``sliding_window`` (1024), ``document`` (packed documents, causal),
  ``softcap`` (causal, ``softcap_score(30)``);
- ``gqa_4to1`` (causal, 16 query heads on 4 KV heads);
- ``transposed`` (causal, q/k/v as ``[B, S, H, D]`` storage viewed ``[B, H, S, D]``, as transformers
  passes them);
- ``ragged`` (causal, 4000 tokens) next to ``causal`` at 4096: the cost of a partial last block.

Work counted: ``4 * Hq * D * attended (q, kv) pairs`` forward, 2.5x that backward (the five
backward matmuls). Times: ``triton.testing.do_bench`` (median) on the forward call, and on the
backward pass alone (``torch.autograd.grad`` on a retained graph). Each measurement is guarded: a
failing implementation writes an error row and the others go on. The masks are the backward
section's (``gpu_check_backward.shared_masks``), so the kernels it compiled at 4k are reused here.

Time: the run's budget (``args.budget_clock``, a ``gpu_check_plan.Budget``; ``--efficiency-budget`` caps
this section alone) is consulted before each (case, length): when what is left cannot hold its rows, they
are written as skipped, never silently dropped. The section runs last by default, so it takes what the
others left. Compiled FlexAttention (``--flex``) goes through ``gpu_check_flex.CompiledFlex``: a row whose
calls did not all run compiled says so.

Rows carry TFLOP/s; ``gpu_check.py`` adds ``pct_peak`` (of the device's peak dense 16-bit tensor-core
rate, ``gpu_peaks.py``) when it writes them.

``--dry-run`` runs two cases (GQA, and softcap on the transposed layout) at tiny sizes on CPU through
the Triton interpreter: a smoke test of this script, not a measurement.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional

import torch
from gpu_check_backward import SOFTCAP, shared_masks
from gpu_check_plan import COSTS, Budget, timing

import triton_attn as ta
from triton_attn.masks import softcap_score

HEAD_DIM = 128
Q_HEADS = 16


def efficiency_cases(dry_run: bool) -> List[dict]:
    """The cases of the table: name, mask kind, score_mod, KV heads, layout, lengths (q and kv)."""
    causal = dict(mask="causal", score=None, q_heads=Q_HEADS, kv_heads=Q_HEADS, head_dim=HEAD_DIM, layout="bhsd")
    if dry_run:
        tiny = dict(causal, q_heads=2, kv_heads=1, head_dim=16, lengths=[48])
        return [dict(tiny, name="gqa_causal"), dict(tiny, name="softcap", score=softcap_score(SOFTCAP), layout="bshd")]
    long = [4096, 16384]
    return [
        dict(causal, name="dense", mask="none", lengths=long),
        dict(causal, name="causal", lengths=long),
        dict(causal, name="sliding_window", mask="sliding_window", lengths=long),
        dict(causal, name="document", mask="document", lengths=long),
        dict(causal, name="softcap", score=softcap_score(SOFTCAP), lengths=long),
        dict(causal, name="gqa_4to1", kv_heads=Q_HEADS // 4, lengths=long),
        dict(causal, name="transposed", layout="bshd", lengths=long),
        dict(causal, name="ragged", lengths=[4000]),
    ]


def _mask_mod(kind: str, length: int, device) -> Optional[Callable]:
    """The mask_mod of ``kind`` ("none", "causal", "sliding_window", "document") at ``length``."""
    return shared_masks(length, device)[kind][0]


def _inputs(case: dict, length: int, device, dtype, requires_grad: bool):
    generator = torch.Generator(device="cpu").manual_seed(length)

    def make(heads: int) -> torch.Tensor:
        dim = case["head_dim"]
        shape = (1, length, heads, dim) if case["layout"] == "bshd" else (1, heads, length, dim)
        tensor = torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)
        tensor = tensor.transpose(1, 2) if case["layout"] == "bshd" else tensor
        return tensor.requires_grad_(requires_grad)

    return make(case["q_heads"]), make(case["kv_heads"]), make(case["kv_heads"])


def _attended_pairs(mask_mod, length: int, device) -> float:
    if mask_mod is None:
        return float(length) * length
    return float(ta.create_mask(mask_mod, 1, 1, length, length, device=device).sum())


def _implementations(case: dict, mask_mod, length: int, device, backend: str, flex) -> Dict[str, Callable]:
    """name -> forward(q, k, v) returning the output, for this case (``flex``: a ``CompiledFlex`` or None)."""
    score_mod, gqa = case["score"], case["kv_heads"] != case["q_heads"]
    block_mask = None if mask_mod is None else ta.create_block_mask(mask_mod, 1, None, length, length, device=device)
    impls = {"triton_attn": lambda q, k, v: ta.attention(q, k, v, block_mask=block_mask, score_mod=score_mod,
                                                         enable_gqa=gqa, backend=backend)}
    if score_mod is None:
        sdpa = torch.nn.functional.scaled_dot_product_attention
        if case["mask"] in ("none", "causal"):
            impls["sdpa"] = lambda q, k, v: sdpa(q, k, v, is_causal=case["mask"] == "causal", enable_gqa=gqa)
        else:
            dense = ta.create_mask(mask_mod, 1, 1, length, length, device=device)
            impls["sdpa"] = lambda q, k, v: sdpa(q, k, v, attn_mask=dense, enable_gqa=gqa)
    if flex is not None:
        flex_mask = block_mask.to_flex() if block_mask is not None else None
        impls["flex_compiled"] = lambda q, k, v: flex(q, k, v, score_mod=score_mod, block_mask=flex_mask,
                                                      enable_gqa=gqa)
    return impls


def _timer(device) -> Callable[[Callable[[], object]], float]:
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def wall(fn) -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return wall


def _measure(forward: Callable, q, k, v, pass_name: str, timer) -> float:
    """ms of one pass: the forward call (no grad), or the backward pass alone on a retained graph."""
    if pass_name == "fwd":
        with torch.no_grad():
            forward(q, k, v)  # compile / warm up outside the timing
            return timer(lambda: forward(q, k, v))
    out = forward(q, k, v)
    grad = torch.randn_like(out)
    inputs = (q, k, v)
    torch.autograd.grad(out, inputs, grad, retain_graph=True)  # warm up
    return timer(lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True))


def run_efficiency(args, device, dtype, writer_row) -> bool:
    """Write one row per (case, length, implementation, pass); False when triton_attn failed anywhere."""
    backend = "interpret" if args.dry_run else "triton"
    flex = getattr(args, "flex_compiled", None)  # gpu_check creates it with --flex on a GPU with FlexAttention
    clock = getattr(args, "budget_clock", None) or Budget(None)
    cap = getattr(args, "efficiency_budget", None)
    timer, started, all_ok = _timer(device), time.monotonic(), True
    for case in efficiency_cases(args.dry_run):
        for length in case["lengths"]:
            label = dict(section="efficiency", mask=case["name"], seq=length, head_dim=case["head_dim"])
            # Its timings and, where it is new, a forward kernel variant (upper estimate of one case's rows).
            needs = 2 * (2 + (flex is not None)) * timing(length) + COSTS["forward_compile"]
            if cap is not None and time.monotonic() - started + needs > cap:
                writer_row(dict(label, impl="all", ok="", note=f"skipped: --efficiency-budget {cap:.0f} s spent"))
                continue
            if not clock.admits(needs):
                writer_row(dict(label, impl="all", ok="", note=clock.skip_note(needs)))
                continue
            mask_mod = _mask_mod(case["mask"], length, device)
            forward_flops = 4.0 * case["q_heads"] * case["head_dim"] * _attended_pairs(mask_mod, length, device)
            try:
                impls = _implementations(case, mask_mod, length, device, backend, flex)
            except Exception as error:  # the BlockMask itself failed: nothing to time
                writer_row(dict(label, impl="triton_attn", ok=False, max_error=f"error: {error}"[:200]))
                all_ok = False
                continue
            for impl, forward in impls.items():
                q, k, v = _inputs(case, length, device, dtype, requires_grad=True)
                for pass_name, flops in (("fwd", forward_flops), ("bwd", 2.5 * forward_flops)):
                    row = dict(label, impl=f"{impl}_{pass_name}")
                    since = flex.snapshot() if impl == "flex_compiled" else None
                    try:
                        ms = _measure(forward, q, k, v, pass_name, timer)
                    except Exception as error:  # one failing implementation must not hide the others
                        writer_row(dict(row, ok=False, max_error=f"error: {type(error).__name__}: {error}"[:200]))
                        all_ok &= impl != "triton_attn"
                        continue
                    verdict = None if since is None else flex.verdict(since)
                    if verdict is not None and not verdict.ok:  # an eager fallback's time is no compiled row
                        writer_row(dict(row, ok=False, note=f"{verdict.note}; {ms:.3f} ms"))
                        continue
                    writer_row(dict(row, ms=f"{ms:.3f}", tflops=flops / ms / 1e9, ok=True,
                                    note="" if verdict is None else verdict.note))
                # Rebind rather than ``del`` (the timing lambda closes over these names): frees the inputs before
                # the next implementation allocates its own.
                q = k = v = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return all_ok
