"""The ``triton-attn`` command.

Subcommands: ``demo``, ``tune``, ``bench``, ``show``, ``explain``, ``info``, ``check``. Every user error (a bad flag, a
missing GPU, an unreadable file) prints one line on stderr and exits with code 2; a correctness check that
fails exits with code 1.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import __version__
from .commands.check import check_command
from .commands.common import (  # noqa: F401
    LIBRARY_MASKS,
    CommandError,
    DefaultsHelpFormatter,
    OneLineErrorParser,
    Progress,
    add_mask_options,
    available_backends,
    library_mask,
)
from .commands.explain import explain_command
from .commands.info import info_command
from .commands.show import show_command
from .commands.tune import SHAPE_FIELDS, tune_command, tune_shapes  # noqa: F401  (re-exported)

# The command modules import torch (and Triton) inside their handlers, never at module level, so
# `triton-attn --help` and `--version` import neither.


def demo_command(args) -> int:
    from .commands.common import parse_device
    from .demo import run_demo

    device = parse_device(args.device)
    rows = run_demo(seq_len=args.seq_len, heads=args.heads, head_dim=args.head_dim, device=str(device),
                    backend=args.backend, repeats=args.repeats)
    return 0 if all(row.ok for row in rows) else 1


def bench_command(args) -> int:
    from .commands.bench import run_bench

    return run_bench(args.bench_args, lambda total, text, enabled=True: Progress(total, text, enabled=enabled))


# -- the parser ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="triton-attn", description="Fused block-sparse attention kernels in Triton.",
                                formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=f"triton-attn {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)

    def command(name: str, help: str, handler, **kwargs) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help, formatter_class=DefaultsHelpFormatter, **kwargs)
        sub.set_defaults(handler=handler)
        return sub

    demo = command("demo", "run causal, sliding-window, document and prefix-LM attention, check them against the "
                           "float64 golden result, and time them", demo_command)
    demo.add_argument("--seq-len", type=int, default=None, help="sequence length (default 1024 on CPU, 4096 on GPU)")
    demo.add_argument("--heads", type=int, default=4, help="attention heads")
    demo.add_argument("--head-dim", type=int, default=64, help="head dimension")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo.add_argument("--backend", default=None, choices=["torch", "triton", "interpret"],
                      help="torch, triton or interpret (default: triton on CUDA, torch on CPU)")
    demo.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported)")

    tune = command("tune", "autotune the forward kernel for shapes and masks on this GPU and store the winners in "
                           "the autotune cache", tune_command)
    tune.add_argument("--config", default=None, metavar="FILE",
                      help="JSON (or YAML, with PyYAML) file: a list of shapes, each an object with keys "
                           + ", ".join(sorted(SHAPE_FIELDS)) + "; list values expand to a cross product; "
                           "flags give the defaults (default: the flags alone)")
    tune.add_argument("--mask", nargs="+", default=["causal"], choices=LIBRARY_MASKS, metavar="MASK",
                      help=f"library masks ({', '.join(LIBRARY_MASKS)}; default causal)")
    tune.add_argument("--seq-len", nargs="+", type=int, default=[4096], metavar="L", help="sequence lengths")
    tune.add_argument("--head-dim", nargs="+", type=int, default=[128], metavar="D", help="head dimensions")
    tune.add_argument("--dtype", nargs="+", default=["bf16"], metavar="DTYPE", help="bf16, fp16, fp32")
    tune.add_argument("--batch", type=int, default=1, help="batch size")
    tune.add_argument("--heads", type=int, default=16, help="query heads")
    tune.add_argument("--kv-heads", type=int, default=None, help="key/value heads (GQA; default: --heads)")
    tune.add_argument("--block-size", default="128", help="BlockMask block size: 128 or Q,KV")
    add_mask_options(tune)
    tune.add_argument("--max-configs", type=int, default=None,
                      help="tune only the first N candidates (default: all)")
    tune.add_argument("--force", action="store_true", help="re-tune shapes already in the cache")
    tune.add_argument("--dry-run", action="store_true",
                      help="no GPU needed: list the search space and prune it by ahead-of-time compilation")
    tune.add_argument("--arch", default=None,
                      help="with --dry-run: the target (sm_80, sm_86, sm_89, sm_90, sm_100, sm_120, gfx90a, gfx942, "
                           "gfx950; default: this GPU, else sm_90)")
    tune.add_argument("--interpret", action="store_true",
                      help="debugging: run the tuning flow with the Triton interpreter on CPU tensors (timings are "
                           "meaningless; entries are keyed to device cpu and never used on a GPU)")
    tune.add_argument("--quiet", action="store_true", help="no progress bar")
    tune.add_argument("--kind", default="fwd", choices=["fwd", "decode"],
                      help="fwd: the prefill forward kernel; decode: the split-KV decode kernel (--q-len query rows "
                           "at the end of a --seq-len cache)")
    tune.add_argument("--q-len", type=int, default=1, help="with --kind decode: query rows per step (1..16)")

    # `bench` passes its words through to a script of bench/ (main() routes them); this entry is for --help.
    command("bench", "run a benchmark script of bench/ by name (default: attention, forward + backward vs SDPA, "
                     "FlexAttention, flash-attn; CSV + PNG under bench/results/); `triton-attn bench --help` lists "
                     "the scripts", bench_command, add_help=False)

    show = command("show", "print a library mask's block picture (or save it as a PNG)", show_command)
    show.add_argument("mask", choices=LIBRARY_MASKS, metavar="MASK", help=", ".join(LIBRARY_MASKS))
    show.add_argument("--seq-len", type=int, default=4096, help="query length")
    show.add_argument("--kv-len", type=int, default=None, help="key/value length (default: --seq-len)")
    show.add_argument("--block-size", default="128", help="128 or Q,KV")
    show.add_argument("--grid", type=int, default=32, help="characters per side at most (0: one per block)")
    show.add_argument("--png", default=None, metavar="PATH",
                      help="also save the block picture as a PNG (default: no PNG)")
    add_mask_options(show)

    explain = command("explain", "print the route (backend, kernel family, custom op or direct, backward) that "
                                 "attention() takes for a described call, and why", explain_command)
    explain.add_argument("mask", choices=LIBRARY_MASKS, metavar="MASK", help=", ".join(LIBRARY_MASKS))
    explain.add_argument("--seq-len", type=int, default=4096, help="keys (and query rows unless --q-len)")
    explain.add_argument("--q-len", type=int, default=None,
                         help="query rows, the last of the sequence (default: --seq-len)")
    explain.add_argument("--batch", type=int, default=1, help="batch size")
    explain.add_argument("--heads", type=int, default=8, help="query heads")
    explain.add_argument("--kv-heads", type=int, default=None, help="key/value heads (GQA; default: --heads)")
    explain.add_argument("--head-dim", type=int, default=64, help="head dimension")
    explain.add_argument("--dtype", default="fp32", help="bf16, fp16, fp32")
    explain.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    explain.add_argument("--backend", default=None, choices=["torch", "triton", "interpret"],
                         help="torch, triton or interpret (default: triton on CUDA, torch on CPU)")
    explain.add_argument("--grad", action="store_true", help="a training call (the query requires grad)")
    add_mask_options(explain)

    info = command("info", "device, versions, available backends, autotune cache", info_command)
    info.add_argument("--limit", type=int, default=20, help="cache entries to list")

    check = command("check", "quick correctness check of every available backend against the float64 golden "
                             "result, at tiny sizes", check_command)
    check.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    check.add_argument("--backend", default=None, choices=["torch", "triton", "interpret"],
                       help="check only this backend (default: every available one)")
    check.add_argument("--dtype", nargs="+", default=None,
                       help="bf16, fp16, fp32 (default: fp32 on CPU; bf16 fp16 on GPU)")
    check.add_argument("--seq-len", type=int, default=80, help="sequence length")
    check.add_argument("--no-backward", action="store_true", help="forward only")
    check.add_argument("--quiet", action="store_true", help="no progress bar")
    check.add_argument("--targets", default=None, metavar="NAMES",
                       help="instead: build the kernels ahead of time for GPU targets (no GPU needed) -- 'all' or a "
                            "comma-separated list of sm_80, sm_86, sm_89, sm_90, sm_100, sm_120, gfx90a, gfx942, "
                            "gfx950 -- and print the matrix (kernel family x head_dim x dtype x mask: shared memory, "
                            "registers, spills, tensor-core instructions); default: the backend check above")
    check.add_argument("--fast", action="store_true",
                       help="with --targets: one build per target and kernel family (what CI runs)")
    check.add_argument("--families", default=None, metavar="NAMES",
                       help="with --targets: comma-separated kernel families (forward, preprocess, dq, dkdv, decode, "
                            "combine, refine; default all)")
    check.add_argument("--jobs", type=int, default=1, help="with --targets: parallel build processes")
    check.add_argument("--markdown", action="store_true",
                       help="with --targets: print one line per target (the README's Supported GPUs table)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "bench":
        args = argparse.Namespace(command="bench", handler=bench_command, bench_args=argv[1:])
    else:
        args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (CommandError, ValueError, TypeError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"triton-attn {args.command}: error: {message}", file=sys.stderr)
        return getattr(error, "exit_code", 2)
    except KeyboardInterrupt:
        print(f"triton-attn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
