"""GPU check of the Triton forward kernel: correctness per mask family, and speed.

On a CUDA machine (bf16, head_dim 64 and 128):

1. correctness: ``triton_attn.attention`` against PyTorch SDPA (fed the dense mask) for each mask
   family, judged like the numerics rule: error vs a float32 SDPA reference at most 2x that of
   bf16 SDPA, plus 1e-2;
2. forward speed at 4k and 16k tokens: TFLOP/s (counting only attended score elements) of
   triton_attn, SDPA and compiled FlexAttention.

Rows go to ``bench/results/gpu_check_<date>_<device>.csv``. Target: under 5 minutes on one H100.
``--dry-run`` runs the same code on CPU through the Triton interpreter at tiny sizes (for tests).

Sections are functions in ``SECTIONS``: ``forward``, ``backward`` (``gpu_check_backward.py``),
``efficiency`` (``gpu_check_efficiency.py``: dense, causal, sliding window, document, softcap, GQA 4:1,
the transposed layout and a ragged length, forward and backward, vs SDPA and FlexAttention),
``cuda_graph`` (capture + replay of ``attention()`` forward and backward under
``torch.cuda.set_sync_debug_mode("error")``, replay compared bit for bit with an eager call), ``decode`` and
``paged`` (``gpu_check_decode.py``: one decode step at B 1/16, caches 4k/32k, Hq 32 / Hkv 8, D 128; us per call and
GB/s against the copy bandwidth, vs SDPA and FlexAttention; paged_attention vs the contiguous decode).

    python bench/gpu_check.py                 # the full check on CUDA
    python bench/gpu_check.py --dry-run       # CPU smoke run
"""

from __future__ import annotations

import argparse
import csv
import datetime
import sys
import time
from pathlib import Path
from typing import Callable, Dict

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import triton_attn as ta  # noqa: E402
from triton_attn.masks import (  # noqa: E402
    and_masks,
    causal_mask,
    chunked_mask,
    document_mask,
    padding_mask,
    prefix_lm_mask,
    sliding_window_mask,
)

FIELDS = ["date", "device", "torch", "triton", "section", "mask", "seq", "head_dim", "dtype", "impl", "ms",
          "tflops", "max_error", "bound", "ok", "batch", "gb_s", "note"]


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


def _time_ms(fn: Callable, device) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100))
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


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


def _flex_fn(q, k, v, block_mask):
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    flex_mask = block_mask.to_flex()
    return lambda: compiled(q, k, v, block_mask=flex_mask)


def run_forward(args, device, dtype, writer_row) -> bool:
    """Correctness at ``args.check_seq`` for every family, then speed at each of ``args.seqs``."""
    backend = "interpret" if args.dry_run else "triton"
    all_ok = True
    for head_dim in args.head_dims:
        q, k, v = (torch.randn(args.batch, args.heads, args.check_seq, head_dim, device=device, dtype=dtype)
                   for _ in range(3))
        for name, mask_mod in mask_families(args.batch, args.check_seq, device).items():
            row = check_correctness(name, mask_mod, q, k, v, backend, device)
            all_ok &= bool(row["ok"])
            writer_row(dict(row, section="forward_correctness", seq=args.check_seq, head_dim=head_dim))
        for length in args.seqs:
            q, k, v = (torch.randn(args.batch, args.heads, length, head_dim, device=device, dtype=dtype)
                       for _ in range(3))
            families = mask_families(args.batch, length, device)
            for name in args.perf_masks:
                mask_mod = families[name]
                block_mask = ta.create_block_mask(mask_mod, args.batch, None, length, length, device=device)
                dense = ta.create_mask(mask_mod, args.batch, 1, length, length, device=device)
                attended = float(dense.sum()) * args.heads
                flops = 4.0 * attended * head_dim  # QK^T and PV, 2 flops per multiply-add
                impls = {"triton_attn": lambda: ta.attention(q, k, v, block_mask=block_mask, backend=backend)}
                if name == "causal":
                    impls["sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
                else:
                    impls["sdpa"] = lambda: _sdpa(q, k, v, dense)
                if device.type == "cuda" and not args.no_flex:
                    impls["flex_compiled"] = _flex_fn(q, k, v, block_mask)
                for impl, fn in impls.items():
                    try:
                        fn()  # compile / warm up outside the timing
                        ms = _time_ms(fn, device)
                        writer_row(dict(section="forward_speed", mask=name, seq=length, head_dim=head_dim, impl=impl,
                                        ms=f"{ms:.3f}", tflops=f"{flops / ms / 1e9:.1f}"))
                    except Exception as error:  # one failing baseline must not hide the other rows
                        writer_row(dict(section="forward_speed", mask=name, seq=length, head_dim=head_dim, impl=impl,
                                        ok=False, max_error=f"error: {type(error).__name__}: {error}"[:200]))
                        all_ok &= impl != "triton_attn"
                # Rebind rather than ``del``: the sdpa lambda closes over ``dense``; this drops the mask before the
                # next length allocates its own.
                dense = None
    return all_ok


def run_backward(args, device, dtype, writer_row) -> bool:
    """Backward: gradients vs a float32 SDPA reference (3x rule), determinism, TFLOP/s vs SDPA and FlexAttention."""
    if str(Path(__file__).resolve().parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_check_backward import backward_section

    all_ok = True
    for head_dim in args.head_dims:
        rows = backward_section(device=device.type, dtype=dtype, batch=args.batch, q_heads=args.heads,
                                kv_heads=args.heads, head_dim=head_dim, seq_lens=args.backward_seqs,
                                repeats=3 if args.dry_run else 10, with_flex=device.type == "cuda" and not args.no_flex,
                                backend="interpret" if args.dry_run else "triton", log=lambda line: None)
        for row in rows:
            ok = row.get("ok")
            all_ok &= ok is not False
            writer_row(dict(section="backward", mask=row["mask"], seq=row["seq_len"], head_dim=head_dim,
                            impl=row["impl"], ms=f"{row['ms']:.3f}", tflops=f"{row['tflops']:.1f}",
                            max_error=("" if row["max_grad_error"] != row["max_grad_error"]
                                       else f"{row['max_grad_error']:.3e}"),
                            bound="" if row["bound"] != row["bound"] else f"{row['bound']:.3e}",
                            ok="" if ok is None else ok))
    return all_ok


def run_cuda_graph(args, device, dtype, writer_row) -> bool:
    """CUDA-graph capture and replay of ``attention()`` (forward, and forward + backward).

    The launch path reads no tensor value (the BlockMask's launch plan is fixed when it is built), so
    the whole call can be captured: warm up on a side stream (kernels compile, masks and tuned configs
    are cached), capture one call into a ``torch.cuda.CUDAGraph`` under ``set_sync_debug_mode("error")``
    (a device-to-host sync would raise), then write new inputs into the static tensors, replay, and
    compare with an eager call on the same inputs. In ``--dry-run`` (no CUDA) the section is skipped.
    """
    if device.type != "cuda":
        writer_row(dict(section="cuda_graph", impl="triton_attn", ok="", max_error="skipped: no CUDA"))
        return True
    all_ok = True
    length, head_dim = args.check_seq, args.head_dims[0]
    for name, mask_mod in mask_families(args.batch, length, device).items():
        block_mask = ta.create_block_mask(mask_mod, args.batch, None, length, length, device=device)
        for with_backward in (False, True):
            static = [torch.randn(args.batch, args.heads, length, head_dim, device=device, dtype=dtype)
                      .requires_grad_(with_backward) for _ in range(3)]
            grad_out = torch.randn(args.batch, args.heads, length, head_dim, device=device, dtype=dtype)

            def step():
                out = ta.attention(*static, block_mask=block_mask, backend="triton")
                if not with_backward:
                    return (out,)
                return (out, *torch.autograd.grad(out, static, grad_out))

            try:
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    for _ in range(3):
                        step()
                torch.cuda.current_stream(device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    with torch.cuda.graph(graph):
                        captured = step()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                fresh = [torch.randn_like(t) for t in static]
                with torch.no_grad():
                    for target, source in zip(static, fresh):
                        target.copy_(source)
                graph.replay()
                torch.cuda.synchronize(device)
                eager = [t.detach().clone().requires_grad_(with_backward) for t in fresh]
                out = ta.attention(*eager, block_mask=block_mask, backend="triton")
                expected = (out,) if not with_backward else (out, *torch.autograd.grad(out, eager, grad_out))
                error = max(float((a.float() - b.float()).abs().max()) for a, b in zip(captured, expected))
                ok = error == 0.0  # same kernels, same inputs: replay must be bit-identical
                ms = _time_ms(graph.replay, device)
                writer_row(dict(section="cuda_graph", mask=name, seq=length, head_dim=head_dim,
                                impl="triton_attn+bwd" if with_backward else "triton_attn", ms=f"{ms:.3f}",
                                max_error=f"{error:.3e}", ok=ok))
            except Exception as error:  # report and go on: one family must not hide the others
                ok = False
                writer_row(dict(section="cuda_graph", mask=name, seq=length, head_dim=head_dim,
                                impl="triton_attn+bwd" if with_backward else "triton_attn", ok=False,
                                max_error=f"error: {type(error).__name__}: {error}"[:200]))
            all_ok &= ok
    return all_ok


def run_efficiency(args, device, dtype, writer_row) -> bool:
    """Issue 12's table: fwd + bwd TFLOP/s of triton_attn, SDPA and compiled FlexAttention per case
    (``gpu_check_efficiency.py``)."""
    if str(Path(__file__).resolve().parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_check_efficiency import run_efficiency as efficiency_section

    return efficiency_section(args, device, dtype, writer_row)


def _decode_rows(section: str, rows, writer_row) -> bool:
    all_ok = True
    for row in rows:
        ok = row.get("ok")
        all_ok &= ok is not False
        writer_row(dict(section=f"{section}_{row['check']}", mask=row.get("mask", "causal"), seq=row["seq"],
                        head_dim=row["head_dim"], impl=row["impl"], batch=row["batch"],
                        ms=f"{row['us'] / 1e3:.4f}" if "us" in row else "",
                        gb_s=f"{row['gb_s']:.0f}" if "gb_s" in row else "",
                        max_error=f"{row['max_error']:.3e}" if "max_error" in row else "",
                        bound=f"{row['bound']:.3e}" if "bound" in row else "", ok="" if ok is None else ok,
                        note=row.get("note", "")))
    return all_ok


def _decode_options(args, device) -> dict:
    if args.dry_run:
        return dict(device="cpu", backend="interpret", batches=(1, 2), cache_lens=(64,), q_heads=4, kv_heads=2,
                    head_dim=16, repeats=1)
    return dict(device=device.type, backend="triton", batches=tuple(args.decode_batches),
                cache_lens=tuple(args.decode_caches), copy_bandwidth=args.copy_bandwidth)


def run_decode(args, device, dtype, writer_row) -> bool:
    """Decode step (Lq = 1, Hq 32 / Hkv 8, D 128): correctness, split count, us and GB/s vs SDPA and FlexAttention."""
    if str(Path(__file__).resolve().parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_check_decode import decode_section

    rows = decode_section(dtype=dtype, with_flex=device.type == "cuda" and not args.no_flex,
                          **_decode_options(args, device))
    return _decode_rows("decode", rows, writer_row)


def run_paged(args, device, dtype, writer_row) -> bool:
    """paged_attention over shuffled pages vs the contiguous decode kernel: correctness (ragged too), us, GB/s."""
    if str(Path(__file__).resolve().parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_check_decode import paged_section

    options = _decode_options(args, device)
    rows = paged_section(dtype=dtype, page_sizes=(16,) if args.dry_run else (16, 64), **options)
    return _decode_rows("paged", rows, writer_row)


SECTIONS = {"forward": run_forward, "backward": run_backward, "efficiency": run_efficiency,
            "cuda_graph": run_cuda_graph, "decode": run_decode, "paged": run_paged}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU smoke run through the Triton interpreter at tiny sizes")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--seqs", type=int, nargs="+", default=None, help="speed lengths (default 4096 16384)")
    parser.add_argument("--backward-seqs", type=int, nargs="+", default=None,
                        help="backward lengths (default 4096: keeps the whole run under 5 minutes)")
    parser.add_argument("--check-seq", type=int, default=None, help="correctness length (default 1024)")
    parser.add_argument("--head-dims", type=int, nargs="+", default=None, help="default 64 128")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=None, help="default 16")
    parser.add_argument("--perf-masks", nargs="+", default=["causal", "sliding_window", "document_causal"])
    parser.add_argument("--no-flex", action="store_true", help="skip compiled FlexAttention")
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 16], help="decode/paged batch sizes")
    parser.add_argument("--decode-caches", type=int, nargs="+", default=[4096, 32768],
                        help="decode/paged cache lengths")
    parser.add_argument("--copy-bandwidth", type=float, default=4300.0,
                        help="GB/s the decode rows are compared with (H200 copy bandwidth)")
    parser.add_argument("--efficiency-budget", type=float, default=240.0,
                        help="seconds for the efficiency section; rows past it are written as skipped")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    tiny = args.dry_run
    args.seqs = args.seqs or ([64] if tiny else [4096, 16384])
    args.backward_seqs = args.backward_seqs or ([64] if tiny else [4096])
    args.check_seq = args.check_seq or (48 if tiny else 1024)
    args.head_dims = args.head_dims or ([16] if tiny else [64, 128])
    args.heads = args.heads or (2 if tiny else 16)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --dry-run for the CPU smoke run", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.bfloat16
    device_name = "cpu-interpreter" if args.dry_run else torch.cuda.get_device_name(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu_check_{stamp}_{device_name.replace(' ', '_')}.csv"
    common = dict(date=stamp, device=device_name, torch=torch.__version__, triton=triton_version, dtype="bf16")
    started = time.time()
    ok = True
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=FIELDS)
        writer.writeheader()

        def write_row(row):
            full = {**common, **row}
            writer.writerow({key: full.get(key, "") for key in FIELDS})
            stream.flush()
            print(", ".join(f"{key}={full[key]}" for key in ("section", "mask", "batch", "seq", "head_dim", "impl",
                                                             "ms", "tflops", "gb_s", "max_error", "ok", "note")
                            if key in full))

        for section in args.sections:
            ok &= SECTIONS[section](args, device, dtype, write_row)
    print(f"wrote {path} in {time.time() - started:.0f}s; {'all checks passed' if ok else 'SOME CHECKS FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
