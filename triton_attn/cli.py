"""The ``triton-attn`` command."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


class CommandError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def _demo(args) -> int:
    from .demo import run_demo

    rows = run_demo(seq_len=args.seq_len, heads=args.heads, head_dim=args.head_dim, device=args.device,
                    backend=args.backend, repeats=args.repeats)
    return 0 if all(row.ok for row in rows) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triton-attn", description="Fused block-sparse attention kernels in Triton.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run causal, sliding-window, document and prefix-LM attention, "
                                            "check them against the float64 golden result, and time them")
    demo.add_argument("--seq-len", type=int, default=None, help="sequence length (default 1024 on CPU, 4096 on GPU)")
    demo.add_argument("--heads", type=int, default=4)
    demo.add_argument("--head-dim", type=int, default=64)
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo.add_argument("--backend", default=None, choices=["torch", "triton", "interpret"])
    demo.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported)")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (CommandError, ValueError, TypeError) as error:
        print(f"triton-attn {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
