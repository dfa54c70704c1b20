"""Forward section of ``bench/gpu_check.py``: correctness per mask family, and forward speed.

1. correctness at ``args.check_seq`` for every family of ``mask_families`` and every head_dim of
   ``args.head_dims``: ``triton_attn.attention`` against PyTorch SDPA fed the dense mask, judged like the
   numerics rule: error vs a float32 SDPA reference at most 2x that of bf16 SDPA, plus 1e-2;
2. speed at each length of ``args.seqs`` and head_dim of ``args.speed_head_dims`` (the efficiency section
   times head_dim 128, and compiled FlexAttention with ``--flex``) for ``args.perf_masks``: TFLOP/s counting
   only attended score elements, of triton_attn and SDPA.
"""

from __future__ import annotations

import time
from typing import Callable, Dict

import torch

import triton_attn as ta
from triton_attn.masks import (
    and_masks,
    causal_mask,
    chunked_mask,
    document_mask,
    padding_mask,
    prefix_lm_mask,
    sliding_window_mask,
)


def mask_families(batch: int, length: int, device) -> Dict[str, Callable]:
    """The mask families checked: name -> mask_mod (captured tensors on ``device``)."""
    generator = torch.Generator().manual_seed(0)
    cuts = torch.sort(torch.randint(1, length, (max(1, length // 1024 + 3),), generator=generator)).values
    ids = torch.bucketize(torch.arange(length), cuts, right=True).to(device)
    keep = torch.ones(batch, length, dtype=torch.bool)
    keep[:, length - length // 5:] = False  # the last fifth is padding
    return {
        "causal": causal_mask,
        "sliding_window": sliding_window_mask(max(1, length // 8)),
        "chunked_causal": and_masks(causal_mask, chunked_mask(max(1, length // 4))),
        "prefix_lm": prefix_lm_mask(length // 4),
        "document_causal": and_masks(causal_mask, document_mask(ids)),
        "padding": padding_mask(keep.to(device)),
    }


def time_ms(fn: Callable, device) -> float:
    """Median ms of ``fn`` (``triton.testing.do_bench`` on a GPU; one wall-clock call on CPU)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100))
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def error_text(error: BaseException) -> str:
    return f"error: {type(error).__name__}: {error}"[:200]


def _sdpa(q, k, v, dense_mask):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask)


def check_correctness(name, mask_mod, q, k, v, backend, device) -> dict:
    batch, heads, length, _ = q.shape
    block_mask = ta.create_block_mask(mask_mod, batch, None, length, length, device=device)
    dense = ta.create_mask(mask_mod, batch, 1, length, length, device=device)
    out = ta.attention(q, k, v, block_mask=block_mask, backend=backend)
    reference = _sdpa(q.float(), k.float(), v.float(), dense)
    baseline = _sdpa(q, k, v, dense)
    error = float((out.float() - reference).abs().max())
    bound = 2 * float((baseline.float() - reference).abs().max()) + 1e-2
    return dict(mask=name, impl="triton_attn", max_error=f"{error:.3e}", bound=f"{bound:.3e}", ok=error <= bound)


def _speed_rows(args, device, dtype, backend, length, head_dim, writer_row) -> bool:
    """Speed rows at one (length, head_dim): False when triton_attn itself failed."""
    all_ok = True
    q, k, v = (torch.randn(args.batch, args.heads, length, head_dim, device=device, dtype=dtype) for _ in range(3))
    families = mask_families(args.batch, length, device)
    for name in args.perf_masks:
        label = dict(section="forward_speed", mask=name, seq=length, head_dim=head_dim)
        mask_mod = families[name]
        block_mask = ta.create_block_mask(mask_mod, args.batch, None, length, length, device=device)
        dense = ta.create_mask(mask_mod, args.batch, 1, length, length, device=device)
        flops = 4.0 * float(dense.sum()) * args.heads * head_dim  # QK^T and PV, 2 flops per multiply-add
        impls = {"triton_attn": lambda: ta.attention(q, k, v, block_mask=block_mask, backend=backend)}
        if name == "causal":
            impls["sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            impls["sdpa"] = lambda: _sdpa(q, k, v, dense)
        for impl, fn in impls.items():
            try:
                fn()  # compile / warm up outside the timing
                ms = time_ms(fn, device)
            except Exception as error:  # one failing baseline must not hide the other rows
                writer_row(dict(label, impl=impl, ok=False, max_error=error_text(error)))
                all_ok &= impl != "triton_attn"
                continue
            writer_row(dict(label, impl=impl, ms=f"{ms:.3f}", tflops=flops / ms / 1e9))
        # Rebind rather than ``del``: the sdpa lambda closes over ``dense``; this drops the mask before the
        # next one is built.
        dense = None
    return all_ok


def run_forward(args, device, dtype, writer_row) -> bool:
    """Correctness at ``args.check_seq`` for every family, then speed at each of ``args.seqs``."""
    backend = "interpret" if args.dry_run else "triton"
    all_ok = True
    for head_dim in args.head_dims:
        q, k, v = (torch.randn(args.batch, args.heads, args.check_seq, head_dim, device=device, dtype=dtype)
                   for _ in range(3))
        for name, mask_mod in mask_families(args.batch, args.check_seq, device).items():
            label = dict(section="forward_correctness", mask=name, seq=args.check_seq, head_dim=head_dim)
            try:
                row = check_correctness(name, mask_mod, q, k, v, backend, device)
            except Exception as error:  # a row, and the other families still run
                row = dict(impl="triton_attn", ok=False, max_error=error_text(error))
            all_ok &= bool(row["ok"])
            writer_row(dict(label, **row))
    for length in args.seqs:
        for head_dim in args.speed_head_dims:
            all_ok &= _speed_rows(args, device, dtype, backend, length, head_dim, writer_row)
    return all_ok
