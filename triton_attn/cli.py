"""The ``triton-attn`` command.

Subcommands: ``demo``, ``tune``, ``bench``, ``show``, ``info``, ``check``. Every user error (a bad flag, a
missing GPU, an unreadable file) prints one line on stderr and exits with code 2; a correctness check that
fails exits with code 1.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
from pathlib import Path
from typing import List, Optional


from .commands.check import _check
from .commands.common import (LIBRARY_MASKS, CommandError, Progress, _add_mask_options,  # noqa: F401  (re-exported)
                              available_backends, library_mask)
from .commands.info import _info
from .commands.show import _show
from .commands.tune import SHAPE_FIELDS, _tune, tune_shapes  # noqa: F401  (re-exported)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``triton-attn <cmd>: error: ...``) and exit code 2."""

    def error(self, message):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- named library masks (shared by show, tune, bench and check) -------------------------------------------



# -- demo ---------------------------------------------------------------------------------------------------

def _demo(args) -> int:
    from .demo import run_demo

    rows = run_demo(seq_len=args.seq_len, heads=args.heads, head_dim=args.head_dim, device=args.device,
                    backend=args.backend, repeats=args.repeats)
    return 0 if all(row.ok for row in rows) else 1



# -- bench --------------------------------------------------------------------------------------------------

def _bench_module():
    """The benchmark harness ``bench/bench_attention.py`` of the source checkout (None when not there)."""
    path = Path(__file__).resolve().parent.parent / "bench" / "bench_attention.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("triton_attn_bench_attention", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


def _bench(args) -> int:
    module = args.bench_module
    if module is None:
        raise CommandError("the benchmark suite lives in bench/bench_attention.py of the source checkout, "
                           "which is not next to this installation; run it from a git checkout")
    return module.run_from_args(args, progress_factory=lambda total, text: Progress(total, text, enabled=not args.quiet))


# -- the parser ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="triton-attn", description="Fused block-sparse attention kernels in Triton.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = commands.add_parser("demo", help="run causal, sliding-window, document and prefix-LM attention, "
                                            "check them against the float64 golden result, and time them")
    demo.add_argument("--seq-len", type=int, default=None, help="sequence length (default 1024 on CPU, 4096 on GPU)")
    demo.add_argument("--heads", type=int, default=4)
    demo.add_argument("--head-dim", type=int, default=64)
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo.add_argument("--backend", default=None, choices=["torch", "triton", "interpret"])
    demo.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported)")
    demo.set_defaults(handler=_demo)

    tune = commands.add_parser("tune", help="autotune the forward kernel for shapes and masks on this GPU and "
                                            "store the winners in the autotune cache")
    tune.add_argument("--config", default=None, metavar="FILE",
                      help="JSON (or YAML, with PyYAML) file: a list of shapes, each an object with keys "
                           + ", ".join(sorted(SHAPE_FIELDS)) + "; list values expand to a cross product; "
                           "flags give the defaults")
    tune.add_argument("--mask", nargs="+", default=["causal"], choices=LIBRARY_MASKS, metavar="MASK",
                      help=f"library masks ({', '.join(LIBRARY_MASKS)}; default causal)")
    tune.add_argument("--seq-len", nargs="+", type=int, default=[4096], metavar="L")
    tune.add_argument("--head-dim", nargs="+", type=int, default=[128], metavar="D")
    tune.add_argument("--dtype", nargs="+", default=["bf16"], metavar="DTYPE", help="bf16, fp16, fp32")
    tune.add_argument("--batch", type=int, default=1)
    tune.add_argument("--heads", type=int, default=16)
    tune.add_argument("--kv-heads", type=int, default=None, help="key/value heads (GQA); default = --heads")
    tune.add_argument("--block-size", default="128", help="BlockMask block size: 128 or Q,KV")
    _add_mask_options(tune)
    tune.add_argument("--max-configs", type=int, default=None, help="tune only the first N candidates")
    tune.add_argument("--force", action="store_true", help="re-tune shapes already in the cache")
    tune.add_argument("--dry-run", action="store_true",
                      help="no GPU needed: list the search space and prune it by ahead-of-time compilation")
    tune.add_argument("--arch", default=None, help="with --dry-run: target sm_80 or sm_90 (default: this GPU, else sm_90)")
    tune.add_argument("--interpret", action="store_true",
                      help="debugging: run the tuning flow with the Triton interpreter on CPU tensors (timings are "
                           "meaningless; entries are keyed to device cpu and never used on a GPU)")
    tune.add_argument("--quiet", action="store_true", help="no progress bar")
    tune.add_argument("--kind", default="fwd", choices=["fwd", "decode"],
                      help="fwd: the prefill forward kernel; decode: the split-KV decode kernel (--q-len query rows "
                           "at the end of a --seq-len cache)")
    tune.add_argument("--q-len", type=int, default=1, help="with --kind decode: query rows per step (1..16)")
    tune.set_defaults(handler=_tune)

    module = None
    with contextlib.suppress(Exception):
        module = _bench_module()
    bench = commands.add_parser("bench", help="run the benchmark suite (forward and backward; ours, SDPA, "
                                              "FlexAttention, flash-attn) and write CSV + PNG under bench/results/")
    if module is not None:
        module.add_arguments(bench)
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.set_defaults(handler=_bench, bench_module=module)

    show = commands.add_parser("show", help="print a library mask's block picture (or save it as a PNG)")
    show.add_argument("mask", choices=LIBRARY_MASKS, metavar="MASK", help=", ".join(LIBRARY_MASKS))
    show.add_argument("--seq-len", type=int, default=4096)
    show.add_argument("--kv-len", type=int, default=None, help="default: --seq-len")
    show.add_argument("--block-size", default="128", help="128 or Q,KV")
    show.add_argument("--grid", type=int, default=32, help="characters per side at most (0: one per block)")
    show.add_argument("--png", default=None, metavar="PATH", help="also save the block picture as a PNG")
    _add_mask_options(show)
    show.set_defaults(handler=_show)

    info = commands.add_parser("info", help="device, versions, available backends, autotune cache")
    info.add_argument("--limit", type=int, default=20, help="cache entries to list")
    info.set_defaults(handler=_info)

    check = commands.add_parser("check", help="quick correctness check of every available backend against "
                                              "the float64 golden result, at tiny sizes")
    check.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    check.add_argument("--backend", default=None, choices=["torch", "triton", "interpret"])
    check.add_argument("--dtype", nargs="+", default=None, help="default: fp32 on CPU; bf16 fp16 on GPU")
    check.add_argument("--seq-len", type=int, default=80)
    check.add_argument("--no-backward", action="store_true", help="forward only")
    check.add_argument("--quiet", action="store_true", help="no progress bar")
    check.set_defaults(handler=_check)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (CommandError, ValueError, TypeError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"triton-attn {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"triton-attn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
