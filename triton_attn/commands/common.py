"""What the subcommands share: user errors, the library masks by name, dtypes, devices, progress."""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple


class CommandError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``triton-attn <cmd>: error: ...``) and exit code 2."""

    def error(self, message):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help text already states it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        default = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else action.default
        return f"{text} (default: {default})" if text else f"default: {default}"



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
    from ..masks import (
        and_masks,
        causal_mask,
        chunked_mask,
        document_mask,
        prefix_lm_mask,
        sliding_window_mask,
        softcap_score,
    )

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


def add_mask_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--window", type=int, default=None, help="sliding_window: window in tokens (default L/8)")
    parser.add_argument("--chunk", type=int, default=None, help="chunked: chunk size (default L/4)")
    parser.add_argument("--prefix", type=int, default=None, help="prefix_lm: prefix length (default L/4)")
    parser.add_argument("--documents", type=int, default=None,
                        help="document: number of documents (default L/1024, >= 2)")
    parser.add_argument("--cap", type=float, default=20.0, help="softcap: the cap (default 20)")


def mask_kwargs(args) -> Dict[str, Any]:
    return dict(window=args.window, chunk=args.chunk, prefix=args.prefix, documents=args.documents, cap=args.cap)


# -- small helpers ------------------------------------------------------------------------------------------

DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16", "half": "float16",
          "bf16": "bfloat16", "bfloat16": "bfloat16"}


def parse_dtype(name: str):
    import torch

    key = str(name).lower().replace("torch.", "")
    if key not in DTYPES:
        raise CommandError(f"unknown dtype {name!r}; use one of bf16, fp16, fp32")
    return getattr(torch, DTYPES[key])


def positive_int(value, flag: str) -> int:
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
                from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
                from rich.progress import Progress as RichProgress

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


def kernels_status(interpret: bool = False) -> Tuple[bool, str]:
    """(usable, reason): whether the Triton kernels (under the interpreter: ``interpret``) run on this machine."""
    from ..versions import require_triton

    try:
        require_triton(interpret=interpret)
        import triton  # noqa: F401  (Triton must import before the kernels can)

        importlib.import_module("triton_attn.kernels.entry")
    except Exception as error:  # ImportError, or Triton failing to initialise
        return False, f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    return True, ""


def available_backends(device) -> List[Tuple[str, bool, str]]:
    """[(backend, available, why not)] for ``device``."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        kernels_ok, reason = kernels_status()
        return [("triton", kernels_ok, reason), ("torch", True, ""),
                ("interpret", False, "the interpreter runs on CPU tensors")]
    interpret_ok, reason = kernels_status(interpret=True)
    return [("torch", True, ""), ("interpret", interpret_ok, reason),
            ("triton", False,
             "needs a CUDA GPU" if not torch.cuda.is_available() else "needs CUDA tensors (--device cuda)")]


def parse_device(name: Optional[str]):
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
