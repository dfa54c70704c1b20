"""GPU check of the Triton forward kernel: correctness per mask family, and speed.

On a CUDA or ROCm machine (bf16, head_dim 64 and 128), on any supported target (``triton_attn.kernels.targets``:
NVIDIA sm_80 to sm_120, AMD gfx90a, gfx942, gfx950):

1. correctness: ``triton_attn.attention`` against PyTorch SDPA (fed the dense mask) for each mask
   family, judged like the numerics rule: error vs a float32 SDPA reference at most 2x that of
   bf16 SDPA, plus 1e-2;
2. forward speed at 4k and 16k tokens: TFLOP/s (counting only attended score elements) of
   triton_attn, SDPA and compiled FlexAttention.

Rows go to ``bench/results/gpu_check_<date>_<device>.csv``, each naming the device (as torch reports it) and
its target ("sm_90", "gfx942"; "interpreter" in a dry run); the run prints both first, with the device's peaks.
About 5 minutes on an H100; slower GPUs take longer (the efficiency section keeps to its own time budget).
``--dry-run`` runs the same code on CPU through the Triton interpreter at tiny sizes (for tests).

``pct_peak``: measured TFLOP/s (forward, backward and efficiency rows) as a percentage of the device's peak dense
16-bit tensor-core rate, and GB/s (decode and paged rows) of its peak memory bandwidth, both the vendor's numbers
from ``gpu_peaks.py``; ``--peak-tflops`` / ``--copy-bandwidth`` override them. A device the table does not know
leaves the column empty (never a guessed peak). Compiled FlexAttention runs where torch provides it, on CUDA and
ROCm alike; ``--no-flex`` drops it.

Sections are functions in ``SECTIONS``: ``forward``, ``backward`` (``gpu_check_backward.py``),
``efficiency`` (``gpu_check_efficiency.py``: dense, causal, sliding window, document, softcap, GQA 4:1,
the transposed layout and a ragged length, forward and backward, vs SDPA and FlexAttention),
``cuda_graph`` (capture + replay of ``attention()`` forward and backward under
``torch.cuda.set_sync_debug_mode("error")``, replay compared bit for bit with an eager call), ``decode`` and
``paged`` (``gpu_check_decode.py``: one decode step at B 1/16, caches 4k/32k, Hq 32 / Hkv 8, D 128; us per call and
GB/s against the peak memory bandwidth, vs SDPA and FlexAttention; paged_attention vs the contiguous decode).

    python bench/gpu_check.py                 # the full check on a CUDA or ROCm GPU
    python bench/gpu_check.py --dry-run       # CPU smoke run
"""

from __future__ import annotations

import argparse
import csv
import datetime
import re
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional

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

FIELDS = ["date", "device", "target", "torch", "triton", "section", "mask", "seq", "head_dim", "dtype", "impl", "ms",
          "tflops", "max_error", "bound", "ok", "batch", "gb_s", "pct_peak", "note"]


def percent_of_peak(row: dict, peak_tflops: Optional[float], peak_gb_s: Optional[float]) -> str:
    """``pct_peak`` of a row: its TFLOP/s over ``peak_tflops``, else its GB/s over ``peak_gb_s``, as a
    percentage (three significant digits); "" when the row has neither or the peak is not known. Sections
    hand the rates over unrounded (floats): ``write_row`` rounds them for the CSV after this."""
    for key, peak in (("tflops", peak_tflops), ("gb_s", peak_gb_s)):
        value = row.get(key)
        if value not in (None, "") and peak:
            return f"{100.0 * float(value) / peak:.3g}"
    return ""


def results_path(out: Path, stamp: str, device_name: str) -> Path:
    """``out/gpu_check_<stamp>_<device>.csv``; the device name reduced to a safe file name (ROCm reports
    names like "AMD Instinct MI250X/MI250")."""
    safe = re.sub(r"[^A-Za-z0-9.+-]+", "_", device_name).strip("_") or "device"
    return out / f"gpu_check_{stamp}_{safe}.csv"


def flex_available(device) -> bool:
    """Whether compiled FlexAttention can be offered on ``device``: a CUDA / ROCm device and a torch that
    has it (each use still catches its own failures)."""
    if torch.device(device).type != "cuda":
        return False
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


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
                if args.with_flex:
                    try:
                        impls["flex_compiled"] = _flex_fn(q, k, v, block_mask)
                    except Exception as error:  # its BlockMask conversion failed: a row, not the end of the run
                        writer_row(dict(section="forward_speed", mask=name, seq=length, head_dim=head_dim,
                                        impl="flex_compiled", ok=False,
                                        max_error=f"error: {type(error).__name__}: {error}"[:200]))
                for impl, fn in impls.items():
                    try:
                        fn()  # compile / warm up outside the timing
                        ms = _time_ms(fn, device)
                        writer_row(dict(section="forward_speed", mask=name, seq=length, head_dim=head_dim, impl=impl,
                                        ms=f"{ms:.3f}", tflops=flops / ms / 1e9))
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
                                repeats=3 if args.dry_run else 10, with_flex=args.with_flex,
                                backend="interpret" if args.dry_run else "triton", log=lambda line: None)
        for row in rows:
            ok = row.get("ok")
            all_ok &= ok is not False
            writer_row(dict(section="backward", mask=row["mask"], seq=row["seq_len"], head_dim=head_dim,
                            impl=row["impl"], ms=f"{row['ms']:.3f}", tflops=float(row["tflops"]),
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
                        gb_s=float(row["gb_s"]) if "gb_s" in row else "",
                        max_error=f"{row['max_error']:.3e}" if "max_error" in row else "",
                        bound=f"{row['bound']:.3e}" if "bound" in row else "", ok="" if ok is None else ok,
                        note=row.get("note", "")))
    return all_ok


def _decode_options(args, device) -> dict:
    if args.dry_run:
        return dict(device="cpu", backend="interpret", batches=(1, 2), cache_lens=(64,), q_heads=4, kv_heads=2,
                    head_dim=16, repeats=1, peak_bandwidth=args.peak_gb_s)
    return dict(device=device.type, backend="triton", batches=tuple(args.decode_batches),
                cache_lens=tuple(args.decode_caches), peak_bandwidth=args.peak_gb_s)


def run_decode(args, device, dtype, writer_row) -> bool:
    """Decode step (Lq = 1, Hq 32 / Hkv 8, D 128): correctness, split count, us and GB/s vs SDPA and FlexAttention."""
    if str(Path(__file__).resolve().parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_check_decode import decode_section

    rows = decode_section(dtype=dtype, with_flex=args.with_flex,
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
    parser.add_argument("--copy-bandwidth", type=float, default=None,
                        help="GB/s the decode/paged rows are compared with (default: the device's peak memory "
                             "bandwidth from bench/gpu_peaks.py)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="TFLOP/s the forward/backward/efficiency rows are compared with (default: the device's "
                             "peak dense 16-bit tensor-core rate from bench/gpu_peaks.py)")
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
    # What ``main`` settles from the device (a section called on these args alone gets the overrides).
    args.with_flex = not tiny and not args.no_flex and flex_available("cuda")
    args.peak_gb_s = args.copy_bandwidth
    return args


def identify_device(device):
    """(name as torch reports it, target name, SM / CU count, ``DevicePeaks`` or None) of ``device``;
    a CPU device (the dry run) is ("cpu-interpreter", "interpreter", None, None)."""
    if device.type != "cuda":
        return "cpu-interpreter", "interpreter", None, None
    if str(Path(__file__).resolve().parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_peaks import lookup

    from triton_attn.kernels.targets import device_target

    multiprocessors = torch.cuda.get_device_properties(device).multi_processor_count
    target = device_target(device).name  # an unknown GPU: the nearest target, with its one warning
    name = torch.cuda.get_device_name(device) or f"unnamed {target} device"
    return name, target, multiprocessors, lookup(name, multiprocessors)


def settle_peaks(args, peaks) -> list:
    """Set ``args.peak_tflops`` and ``args.peak_gb_s``, what ``pct_peak`` divides by: the override flag
    when given, else the table's number, else None; return one line per peak saying which and whence."""
    lines = []
    for attr, override, flag, field, what, unit in (
            ("peak_tflops", args.peak_tflops, "--peak-tflops", "tflops", "peak dense 16-bit tensor-core rate",
             "TFLOP/s"),
            ("peak_gb_s", args.copy_bandwidth, "--copy-bandwidth", "gb_s", "peak memory bandwidth", "GB/s")):
        table = None if peaks is None else getattr(peaks, field)
        value = override if override is not None else table
        setattr(args, attr, value)
        whence = flag if override is not None else "" if peaks is None else f"{peaks.model}: {peaks.source}"
        lines.append(f"{what}: {value:g} {unit} ({whence})" if value
                     else f"{what}: not known for this device, pct_peak left empty ({flag} sets it)")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA or ROCm device; run with --dry-run for the CPU smoke run", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.bfloat16
    device_name, target, multiprocessors, peaks = identify_device(device)
    args.with_flex = args.with_flex and flex_available(device)
    runtime = (f"HIP {torch.version.hip}" if torch.version.hip else
               f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU build")
    units = "" if multiprocessors is None else f", {multiprocessors} {'CUs' if torch.version.hip else 'SMs'}"
    print(f"gpu_check on {device_name} (target {target}{units}; torch {torch.__version__}, {runtime})")
    for line in settle_peaks(args, peaks):
        print(f"  {line}")
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    path = results_path(args.out, stamp, device_name)
    common = dict(date=stamp, device=device_name, target=target, torch=torch.__version__, triton=triton_version,
                  dtype="bf16")
    started = time.time()
    ok = True
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=FIELDS)
        writer.writeheader()

        def write_row(row):
            full = {**common, **row}
            full["pct_peak"] = percent_of_peak(full, args.peak_tflops, args.peak_gb_s)
            for key, spec in (("tflops", ".1f"), ("gb_s", ".0f")):  # rounded as the CSV always had them
                if isinstance(full.get(key), float):
                    full[key] = format(full[key], spec)
            writer.writerow({key: full.get(key, "") for key in FIELDS})
            stream.flush()
            print(", ".join(f"{key}={full[key]}" for key in ("section", "mask", "batch", "seq", "head_dim", "impl",
                                                             "ms", "tflops", "gb_s", "pct_peak", "max_error", "ok",
                                                             "note")
                            if full.get(key, "") != ""))

        for section in args.sections:
            ok &= SECTIONS[section](args, device, dtype, write_row)
    print(f"wrote {path} in {time.time() - started:.0f}s; {'all checks passed' if ok else 'SOME CHECKS FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
