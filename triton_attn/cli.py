"""The ``triton-attn`` command.

Subcommands: ``demo``, ``tune``, ``bench``, ``show``, ``info``, ``check``. Every user error (a bad flag, a
missing GPU, an unreadable file) prints one line on stderr and exits with code 2; a correctness check that
fails exits with code 1.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import math
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple


class CommandError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``triton-attn <cmd>: error: ...``) and exit code 2."""

    def error(self, message):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- named library masks (shared by show, tune, bench and check) -------------------------------------------

LIBRARY_MASKS = ("none", "causal", "sliding_window", "chunked", "prefix_lm", "document", "softcap")


@dataclass
class NamedMask:
    """A library mask by name: its mask_mod (None = attend everywhere) and score_mod (softcap only)."""

    name: str
    label: str
    mask_mod: Optional[Callable]
    score_mod: Optional[Callable] = None


def document_ids(seq_len: int, documents: int, seed: int = 0):
    """``[seq_len]`` int64 document ids: ``documents`` documents with random (seeded) boundaries."""
    import torch

    documents = max(1, min(int(documents), seq_len))
    generator = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(seq_len - 1, generator=generator)[:documents - 1] + 1
    boundaries = cuts.sort().values
    return torch.bucketize(torch.arange(seq_len), boundaries, right=True)


def library_mask(name: str, seq_len: int, *, window: Optional[int] = None, chunk: Optional[int] = None,
                 prefix: Optional[int] = None, documents: Optional[int] = None, cap: float = 20.0,
                 device=None) -> NamedMask:
    """The named library mask for sequences of ``seq_len`` tokens.

    none: no mask. causal. sliding_window: causal window of ``window`` tokens (default seq_len // 8).
    chunked: causal within chunks of ``chunk`` tokens (default seq_len // 4). prefix_lm: bidirectional over
    the first ``prefix`` tokens (default seq_len // 4), causal after. document: causal within ``documents``
    documents (default max(2, seq_len // 1024)) with seeded random boundaries. softcap: causal with the
    ``cap * tanh(score / cap)`` score_mod.
    """
    from .masks import (and_masks, causal_mask, chunked_mask, document_mask, prefix_lm_mask, sliding_window_mask,
                        softcap_score)

    if name not in LIBRARY_MASKS:
        raise CommandError(f"unknown mask {name!r}; the library masks are {', '.join(LIBRARY_MASKS)}")
    if seq_len <= 0:
        raise CommandError(f"--seq-len must be a positive integer, got {seq_len}")
    for flag, value in (("--window", window), ("--chunk", chunk), ("--prefix", prefix), ("--documents", documents)):
        if value is not None and value <= 0:
            raise CommandError(f"{flag} must be a positive integer, got {value}")
    if not (cap > 0 and math.isfinite(cap)):
        raise CommandError(f"--cap must be a positive number, got {cap}")
    if name == "none":
        return NamedMask(name, "none", None)
    if name == "causal":
        return NamedMask(name, "causal", causal_mask)
    if name == "sliding_window":
        window = window or max(1, seq_len // 8)
        return NamedMask(name, f"sliding window {window}", sliding_window_mask(window))
    if name == "chunked":
        chunk = chunk or max(1, seq_len // 4)
        return NamedMask(name, f"chunked {chunk} (causal)", and_masks(causal_mask, chunked_mask(chunk)))
    if name == "prefix_lm":
        prefix = prefix or max(1, seq_len // 4)
        return NamedMask(name, f"prefix-LM {prefix}", prefix_lm_mask(prefix))
    if name == "document":
        documents = documents or max(2, seq_len // 1024)
        ids = document_ids(seq_len, documents)
        if device is not None:
            ids = ids.to(device)
        return NamedMask(name, f"document ({documents} docs, causal)", and_masks(causal_mask, document_mask(ids)))
    return NamedMask(name, f"softcap {cap:g} (causal)", causal_mask, softcap_score(cap))


def _add_mask_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--window", type=int, default=None, help="sliding_window: window in tokens (default L/8)")
    parser.add_argument("--chunk", type=int, default=None, help="chunked: chunk size (default L/4)")
    parser.add_argument("--prefix", type=int, default=None, help="prefix_lm: prefix length (default L/4)")
    parser.add_argument("--documents", type=int, default=None, help="document: number of documents (default L/1024, >= 2)")
    parser.add_argument("--cap", type=float, default=20.0, help="softcap: the cap (default 20)")


def _mask_kwargs(args) -> Dict[str, Any]:
    return dict(window=args.window, chunk=args.chunk, prefix=args.prefix, documents=args.documents, cap=args.cap)


# -- small helpers ------------------------------------------------------------------------------------------

DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16", "half": "float16",
          "bf16": "bfloat16", "bfloat16": "bfloat16"}


def _dtype(name: str):
    import torch

    key = str(name).lower().replace("torch.", "")
    if key not in DTYPES:
        raise CommandError(f"unknown dtype {name!r}; use one of bf16, fp16, fp32")
    return getattr(torch, DTYPES[key])


def _positive(value, flag: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CommandError(f"{flag} must be a positive integer, got {value!r}")
    return value


class Progress:
    """A progress bar: rich if installed, else tqdm, else one plain line per step (on stderr)."""

    def __init__(self, total: int, description: str, enabled: bool = True):
        self.total, self.description, self.enabled = max(0, total), description, enabled
        self.done = 0
        self._bar = None
        self._kind = "plain"

    def __enter__(self) -> "Progress":
        if not self.enabled:
            return self
        if sys.stderr.isatty():
            try:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
                    TimeElapsedColumn

                self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                         TimeElapsedColumn(), TextColumn("{task.fields[step]}"), transient=False)
                self._bar.start()
                self._task = self._bar.add_task(self.description, total=self.total, step="")
                self._kind = "rich"
                return self
            except ImportError:
                pass
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=self.total, desc=self.description, file=sys.stderr)
                self._kind = "tqdm"
                return self
            except ImportError:
                pass
        return self

    def advance(self, step: str = "") -> None:
        self.done += 1
        if not self.enabled:
            return
        if self._kind == "rich":
            self._bar.update(self._task, advance=1, step=step)
        elif self._kind == "tqdm":
            self._bar.set_postfix_str(step, refresh=False)
            self._bar.update(1)
        else:
            print(f"[{self.done}/{self.total}] {self.description}: {step}", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self._kind == "rich":
            self._bar.stop()
        elif self._kind == "tqdm":
            self._bar.close()


def _kernels_status() -> Tuple[bool, str]:
    """(importable, reason): whether the Triton kernels import on this machine."""
    try:
        import triton  # noqa: F401  (Triton must import before the kernels can)

        importlib.import_module("triton_attn.kernels.autograd")
    except Exception as error:  # ImportError, or Triton failing to initialise
        return False, f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    return True, ""


def available_backends(device) -> List[Tuple[str, bool, str]]:
    """[(backend, available, why not)] for ``device``."""
    import torch

    device = torch.device(device)
    kernels_ok, reason = _kernels_status()
    if device.type == "cuda":
        return [("triton", kernels_ok, reason), ("torch", True, ""),
                ("interpret", False, "the interpreter runs on CPU tensors")]
    return [("torch", True, ""), ("interpret", kernels_ok, reason),
            ("triton", False, "needs a CUDA GPU" if not torch.cuda.is_available() else "needs CUDA tensors (--device cuda)")]


def _device(name: Optional[str]):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise CommandError(f"--device {name!r} is not a torch device ({error})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {name}: no CUDA GPU is available on this machine")
    return device


# -- demo ---------------------------------------------------------------------------------------------------

def _demo(args) -> int:
    from .demo import run_demo

    rows = run_demo(seq_len=args.seq_len, heads=args.heads, head_dim=args.head_dim, device=args.device,
                    backend=args.backend, repeats=args.repeats)
    return 0 if all(row.ok for row in rows) else 1


# -- show ---------------------------------------------------------------------------------------------------

def _block_size(text: str) -> Tuple[int, int]:
    parts = str(text).lower().replace("x", ",").split(",")
    try:
        sizes = tuple(int(p) for p in parts if p.strip())
    except ValueError:
        raise CommandError(f"--block-size must be an int or Q,KV (e.g. 128 or 128,64), got {text!r}") from None
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) <= 0:
        raise CommandError(f"--block-size must be one or two positive integers, got {text!r}")
    return sizes


def _show(args) -> int:
    from .api import full_block_mask
    from .masks import create_block_mask

    seq_len = _positive(args.seq_len, "--seq-len")
    kv_len = _positive(args.kv_len, "--kv-len") if args.kv_len is not None else seq_len
    block_size = _block_size(args.block_size)
    named = library_mask(args.mask, seq_len, **_mask_kwargs(args))
    if named.mask_mod is None:
        block_mask = full_block_mask(1, 1, seq_len, kv_len, "cpu", block_size)
    else:
        block_mask = create_block_mask(named.mask_mod, None, None, seq_len, kv_len, BLOCK_SIZE=block_size)
    partial = int(block_mask.partial_blocks().sum())
    full = int(block_mask.full_blocks().sum())
    nq, nkv = block_mask.num_blocks
    print(f"{named.label}: Q_LEN={seq_len}, KV_LEN={kv_len}, BLOCK_SIZE={block_size}, {nq}x{nkv} blocks: "
          f"{full} full, {partial} partial, {nq * nkv - full - partial} empty ({block_mask.sparsity():.1f}% skipped)")
    if named.score_mod is not None:
        print(f"score_mod: {named.score_mod.__name__} (applied to every computed score)")
    grid = -1 if args.grid == 0 else args.grid
    picture = block_mask.to_string(grid_size=grid, limit=1).split("\n", 1)[1]
    print(picture)
    if grid != -1 and (nq > grid or nkv > grid):
        print(f"(each character pair stands for up to {-(-nq // grid)}x{-(-nkv // grid)} blocks: "
              "█ all full, ░ some computed, blank all empty; --grid 0 shows every block)")
    else:
        print("(█ full block, ░ partial block: mask_mod evaluated, blank: skipped)")
    if args.png:
        _save_png(block_mask, named.label, Path(args.png))
        print(f"saved {args.png}")
    return 0


def _save_png(block_mask, title: str, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
    except ImportError:
        raise CommandError("--png needs matplotlib (pip install 'triton-attn[bench]')") from None
    image = (block_mask.partial_blocks()[0, 0].int() + 2 * block_mask.full_blocks()[0, 0].int()).numpy()
    nq, nkv = image.shape
    size = min(12.0, max(3.0, 0.12 * max(nq, nkv)))
    fig, ax = plt.subplots(figsize=(size * nkv / max(nq, nkv) + 1.5, size * nq / max(nq, nkv) + 0.8))
    ax.imshow(image, cmap=ListedColormap(["#ffffff", "#9ecae1", "#08519c"]), vmin=0, vmax=2,
              interpolation="nearest", aspect="equal")
    q_bs, kv_bs = block_mask.BLOCK_SIZE
    ax.set_title(f"{title}\n{block_mask.sparsity():.1f}% of blocks skipped "
                 f"(dark: full, light: partial, white: empty)", fontsize=9)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"KV block ({kv_bs} tokens)")
    ax.set_ylabel(f"Q block ({q_bs} tokens)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
    except OSError as error:
        raise CommandError(f"cannot write {path}: {error.strerror or error}") from None
    finally:
        plt.close(fig)


# -- info ---------------------------------------------------------------------------------------------------

def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        try:
            return importlib.import_module(module).__version__
        except Exception:
            return "not installed"


def _info(args) -> int:
    import torch

    from .kernels.tuning_cache import default_cache

    from . import __version__

    print(f"triton-attn {__version__} ({Path(__file__).resolve().parent})")
    print(f"python {platform.python_version()}, torch {torch.__version__}, triton {_version('triton')}, "
          f"transformers {_version('transformers')}, flash-attn {_version('flash-attn')}")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            print(f"device cuda:{index}: {props.name}, sm_{props.major}{props.minor}, "
                  f"{props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs")
    else:
        print(f"device: cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"torch threads {torch.get_num_threads()}); no CUDA GPU")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    default = "triton" if device.type == "cuda" else "torch"
    env = os.environ.get("TRITON_ATTN_BACKEND")
    print(f"backends on {device.type} (default {env or default}{' from TRITON_ATTN_BACKEND' if env else ''}):")
    for name, ok, why in available_backends(device):
        print(f"  {name:<10} {'yes' if ok else 'no'}{'' if ok else f'  ({why})'}")
    cache = default_cache()
    entries = cache.entries()
    print(f"autotune cache: {cache.path} ({len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"
          f"{', file not created yet' if not cache.path.exists() else ''})")
    shown = sorted(entries.items())[:args.limit]
    for key, record in shown:
        config = record.get("config", {})
        text = ", ".join(f"{k}={v}" for k, v in config.items())
        ms = record.get("ms")
        print(f"  {key}: {text}" + (f"  ({ms:.4f} ms)" if isinstance(ms, (int, float)) else ""))
    if len(entries) > len(shown):
        print(f"  ... {len(entries) - len(shown)} more (--limit)")
    return 0


# -- check --------------------------------------------------------------------------------------------------

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
    numerics rule of DESIGN.md (2x / 3x the error of plain same-dtype PyTorch, plus a floor)."""
    import torch

    from .api import attention
    from .masks import create_block_mask
    from .reference import dense_attention

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


def _check(args) -> int:
    import torch

    device = _device(args.device)
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
    dtypes = [_dtype(d) for d in args.dtype] if args.dtype else (
        [torch.bfloat16, torch.float16] if device.type == "cuda" else [torch.float32])
    seq_len = _positive(args.seq_len, "--seq-len")
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
    header = f"{'backend':<10} {'mask':<15} {'dtype':<9} {'fwd error':>10} {'bound':>9} {'bwd error':>10} {'bound':>9}  result"
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


# -- tune ---------------------------------------------------------------------------------------------------

@dataclass
class TuneShape:
    mask: str
    seq_len: int
    head_dim: int
    dtype: str
    batch: int = 1
    heads: int = 16
    kv_heads: Optional[int] = None
    kv_len: Optional[int] = None
    value_dim: Optional[int] = None
    block_size: Tuple[int, int] = (128, 128)
    mask_args: Dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        gqa = f", Hkv={self.kv_heads}" if self.kv_heads and self.kv_heads != self.heads else ""
        return (f"{self.mask} L={self.seq_len}{'' if not self.kv_len else f'x{self.kv_len}'} D={self.head_dim} "
                f"{self.dtype} B={self.batch} H={self.heads}{gqa}")


SHAPE_FIELDS = {"mask", "seq_len", "head_dim", "dtype", "batch", "heads", "kv_heads", "kv_len", "value_dim",
                "block_size", "window", "chunk", "prefix", "documents", "cap"}


def _load_spec(path: Path) -> List[Dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise CommandError(f"cannot read {path}: {error.strerror or error}") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise CommandError(f"{path} is YAML but PyYAML is not installed; pip install pyyaml or use JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise CommandError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    else:
        try:
            data = json.loads(text)
        except ValueError as error:
            raise CommandError(f"{path} is not valid JSON: {error}") from None
    if isinstance(data, dict):
        data = data.get("shapes", data.get("problems"))
    if not isinstance(data, list) or not data or not all(isinstance(item, dict) for item in data):
        raise CommandError(f"{path} must hold a non-empty list of shapes (or {{\"shapes\": [...]}}), each an object "
                           f"with keys among {', '.join(sorted(SHAPE_FIELDS))}")
    return data


def _expand(spec: Dict[str, Any], defaults: Dict[str, Any], where: str) -> List[TuneShape]:
    unknown = set(spec) - SHAPE_FIELDS
    if unknown:
        raise CommandError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(SHAPE_FIELDS))}")
    merged = dict(defaults)
    merged.update(spec)
    list_keys = [k for k, v in merged.items() if isinstance(v, list) and k != "block_size"]
    shapes = []
    for values in itertools.product(*(merged[k] for k in list_keys)):
        item = dict(merged)
        item.update(zip(list_keys, values))
        for name in ("seq_len", "head_dim", "batch", "heads"):
            _positive(item.get(name), f"{where}: {name}")
        for name in ("kv_heads", "kv_len", "value_dim", "window", "chunk", "prefix", "documents"):
            if item.get(name) is not None:
                _positive(item[name], f"{where}: {name}")
        if item["mask"] not in LIBRARY_MASKS:
            raise CommandError(f"{where}: unknown mask {item['mask']!r}; the library masks are {', '.join(LIBRARY_MASKS)}")
        block = item.get("block_size", 128)
        block = _block_size(",".join(str(b) for b in block) if isinstance(block, (list, tuple)) else str(block))
        kv_heads = item.get("kv_heads")
        if kv_heads and item["heads"] % kv_heads:
            raise CommandError(f"{where}: heads={item['heads']} is not a multiple of kv_heads={kv_heads}")
        shapes.append(TuneShape(mask=item["mask"], seq_len=item["seq_len"], head_dim=item["head_dim"],
                                dtype=DTYPES.get(str(item["dtype"]).lower()) or str(_dtype(item["dtype"])),
                                batch=item["batch"], heads=item["heads"], kv_heads=kv_heads,
                                kv_len=item.get("kv_len"), value_dim=item.get("value_dim"), block_size=block,
                                mask_args={k: item[k] for k in ("window", "chunk", "prefix", "documents", "cap")
                                           if item.get(k) is not None}))
    return shapes


def tune_shapes(args) -> List[TuneShape]:
    """The shapes to tune: the cross product of the flags, or each entry of --config (flags as defaults)."""
    defaults = dict(mask=args.mask, seq_len=args.seq_len, head_dim=args.head_dim, dtype=args.dtype,
                    batch=args.batch, heads=args.heads, kv_heads=args.kv_heads, block_size=args.block_size)
    defaults.update({k: v for k, v in _mask_kwargs(args).items() if v is not None and k != "cap"})
    if args.cap != 20.0:
        defaults["cap"] = args.cap
    if args.config:
        shapes = []
        for index, spec in enumerate(_load_spec(Path(args.config))):
            shapes += _expand(spec, defaults, f"{args.config} shape {index + 1}")
        return shapes
    return _expand({}, defaults, "flags")


def _parse_arch(text: Optional[str]) -> Optional[int]:
    if text is None:
        return None
    digits = str(text).lower().replace("sm_", "").replace("sm", "").replace(".", "")
    if not digits.isdigit() or int(digits) < 70:
        raise CommandError(f"--arch must look like sm_80 or sm_90, got {text!r}")
    return int(digits)


def _tune(args) -> int:
    import torch

    shapes = tune_shapes(args)
    have_gpu = torch.cuda.is_available()
    if not args.dry_run and not args.interpret and not have_gpu:
        raise CommandError("tuning times the Triton kernels on a CUDA GPU and this machine has none "
                           "(torch.cuda.is_available() is False); `triton-attn tune --dry-run --arch sm_90` lists "
                           "the search space and prunes it by ahead-of-time compilation without a GPU")
    arch = _parse_arch(args.arch)
    if arch is None:
        if have_gpu:
            major, minor = torch.cuda.get_device_capability()
            arch = major * 10 + minor
        else:
            arch = 90
    if args.dry_run:
        return _tune_dry_run(args, shapes, arch)
    if args.interpret:
        return _tune_run(args, shapes, arch, torch.device("cpu"), interpret=True)
    major, minor = torch.cuda.get_device_capability()
    if arch != major * 10 + minor:
        raise CommandError(f"--arch sm_{arch} differs from this GPU's sm_{major}{minor}; --arch is for --dry-run")
    return _tune_run(args, shapes, arch, torch.device("cuda"), interpret=False)


def _candidates(shape: TuneShape, arch: int, args):
    from .kernels import autotune

    space = autotune.search_space("fwd", arch, head_dim=shape.head_dim, value_dim=shape.value_dim,
                                  dtype=_dtype(shape.dtype), block_size=shape.block_size,
                                  q_len=shape.seq_len)
    return space[:args.max_configs] if args.max_configs else space


def _tune_dry_run(args, shapes: List[TuneShape], arch: int) -> int:
    from .kernels import autotune

    print(f"triton-attn tune --dry-run: search space for sm_{arch}, pruned by ahead-of-time compilation "
          f"(shared memory limit {autotune.shared_memory_limit(arch)} B, no register spills); nothing is timed")
    total = sum(len(_candidates(s, arch, args)) for s in shapes)
    aot_ok = True
    try:
        autotune.aot_compile_fn(arch)
    except ImportError as error:
        aot_ok = False
        print(f"note: ahead-of-time pruning unavailable ({error}); listing the search space only")
    kept_total = 0
    with Progress(total, "aot compile", enabled=aot_ok and not args.quiet) as progress:
        for shape in shapes:
            candidates = _candidates(shape, arch, args)
            print(f"\n{shape.label}: {len(candidates)} candidate configs")
            if not aot_ok:
                for config in candidates:
                    print(f"  {config.name}")
                continue
            named = library_mask(shape.mask, shape.seq_len, **shape.mask_args)
            compile_fn = autotune.aot_compile_fn(arch, head_dim=shape.head_dim, value_dim=shape.value_dim,
                                                 dtype=_dtype(shape.dtype), block_size=shape.block_size,
                                                 mask_mod=named.mask_mod, score_mod=named.score_mod)
            result = autotune.prune(candidates, compile_fn, capability=arch,
                                    progress=lambda c, r: progress.advance(c.name))
            kept_total += len(result.kept)
            for config in candidates:
                stats = result.stats[config]
                reason = result.dropped.get(config)
                detail = f"smem {stats.shared:>6} B, {stats.registers:>3} regs, spills {stats.spills}"
                print(f"  {config.name:<18} {'keep' if reason is None else 'drop':<5} "
                      f"{detail if not stats.error else ''}{'' if reason is None else f'  ({reason})'}")
    if aot_ok:
        print(f"\n{kept_total}/{total} configs survive pruning for sm_{arch}")
    return 0


def _tune_run(args, shapes: List[TuneShape], arch: int, device, interpret: bool) -> int:
    """Tune each shape: AOT-prune the candidates for ``arch`` (on a GPU), time the survivors with the real
    launcher, store the winners. ``interpret``: the same flow under the Triton interpreter on CPU tensors
    (for testing the machinery: its timings say nothing about a GPU, and its entries are keyed to device cpu)."""
    import torch

    from .kernels import autotune
    from .kernels.configs import default_config
    from .kernels.launch import attention_forward
    from .masks import create_block_mask

    tuner = autotune.autotuner()
    aot = False
    if not interpret:
        try:
            autotune.aot_compile_fn(arch)
            aot = True
        except ImportError:
            aot = False
    plans = [(shape, _candidates(shape, arch, args)) for shape in shapes]
    winners = []
    with Progress(sum(len(c) * (2 if aot else 1) for _, c in plans), "tune", enabled=not args.quiet) as progress:
        for shape, candidates in plans:
            dtype = _dtype(shape.dtype)
            kv_len = shape.kv_len or shape.seq_len
            kv_heads = shape.kv_heads or shape.heads
            generator = torch.Generator(device=device).manual_seed(0)
            q = torch.randn(shape.batch, shape.heads, shape.seq_len, shape.head_dim, device=device, dtype=dtype,
                            generator=generator)
            k = torch.randn(shape.batch, kv_heads, kv_len, shape.head_dim, device=device, dtype=dtype,
                            generator=generator)
            v = torch.randn(shape.batch, kv_heads, kv_len, shape.value_dim or shape.head_dim, device=device,
                            dtype=dtype, generator=generator)
            named = library_mask(shape.mask, shape.seq_len, device=device, **shape.mask_args)
            if named.mask_mod is None:
                from .api import full_block_mask

                block_mask = full_block_mask(1, 1, shape.seq_len, kv_len, device, shape.block_size)
            else:
                block_mask = create_block_mask(named.mask_mod, None, None, shape.seq_len, kv_len, device=device,
                                               BLOCK_SIZE=shape.block_size)
            key = autotune.make_key(q, k, v, block_mask, variant="score" if named.score_mod else "")
            if tuner.lookup(key) is not None and not args.force:
                print(f"{shape.label}: already tuned ({tuner.lookup(key).name}); --force re-tunes")
                for _ in range(len(candidates) * (2 if aot else 1)):
                    progress.advance("cached")
                continue
            scale = 1.0 / math.sqrt(shape.head_dim)

            def run(config, q=q, k=k, v=v, block_mask=block_mask, named=named, scale=scale):
                return attention_forward(q, k, v, block_mask, score_mod=named.score_mod, scale=scale,
                                         interpret=interpret, config=config)

            compile_fn = autotune.aot_compile_fn(arch, head_dim=shape.head_dim, value_dim=shape.value_dim,
                                                 dtype=dtype, block_size=shape.block_size, mask_mod=named.mask_mod,
                                                 score_mod=named.score_mod) if aot else None
            result = tuner.tune(key, candidates, run, device=device, compile_fn=compile_fn,
                                progress=lambda stage, c, ms: progress.advance(f"{stage} {c.name}"))
            default = default_config(shape.head_dim, shape.value_dim or shape.head_dim, dtype, shape.block_size,
                                     shape.seq_len)
            default_ms = result.timings.get(default)
            if default_ms is None:
                with contextlib.suppress(Exception):
                    run(default)
                    default_ms = autotune.time_ms(lambda: run(default), device)
            winners.append((shape, key, result, default, default_ms))
    print(f"\n{'shape':<48} {'winner':<18} {'ms':>9} {'default':<18} {'ms':>9} {'speedup':>8}  pruned/failed")
    for shape, key, result, default, default_ms in winners:
        if result.best is None:
            print(f"{shape.label:<48} {'(none ran)':<18}")
            continue
        speedup = f"{default_ms / result.best_ms:.2f}x" if default_ms else "-"
        print(f"{shape.label:<48} {result.best.name:<18} {result.best_ms:>9.4f} {default.name:<18} "
              f"{default_ms if default_ms else float('nan'):>9.4f} {speedup:>8}  {len(result.pruned)}/{len(result.failures)}")
    print(f"winners stored in {tuner.cache.path}")
    return 0 if all(w[2].best is not None for w in winners) else 1


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
