"""``triton-attn bench``: list and run the benchmark scripts of ``bench/`` by name.

The scripts are not part of the installed package (they write results into the source tree and
need the project's extras); they are found in, in order: ``--dir``, the ``bench/`` folder beside
the imported package (a source checkout or an editable install), ``./bench`` when it holds
``bench_attention.py``. A script that defines ``add_arguments(parser)`` and ``run_from_args(args,
progress_factory)`` runs in this process (one-line errors, the shared progress bar); any other
script runs as ``python bench/<script>.py ARGS`` in a child process, whose exit code is returned.

Usage: ``triton-attn bench [--dir DIR] [--list] [SCRIPT] [SCRIPT OPTIONS...]`` (SCRIPT defaults
to ``attention``; ``triton-attn bench SCRIPT --help`` shows the script's own options).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .common import CommandError, DefaultsHelpFormatter, OneLineErrorParser

DEFAULT_SCRIPT = "attention"
# The project's repository (placeholder until the project is published; see pyproject's [project.urls]).
REPOSITORY = "https://github.com/triton-attn/triton-attn"
INSTALLED_HELP = (f"the benchmark scripts live in bench/ of the source repository and are not installed with the "
                  f"package: git clone {REPOSITORY} && cd triton-attn && pip install -e '.[bench]' && "
                  f"triton-attn bench --list (or pass --dir PATH/TO/bench)")


@dataclass
class BenchScript:
    """A ``bench/*.py`` file: its name (``bench_`` prefix dropped), path, docstring summary, and whether it
    offers the in-process protocol (``add_arguments`` + ``run_from_args``)."""

    name: str
    path: Path
    summary: str
    in_process: bool


def bench_dir(explicit: Optional[str] = None) -> Optional[Path]:
    """The folder of benchmark scripts (see the module docstring), or None when none is found."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            raise CommandError(f"--dir {explicit}: not a folder")
        return path
    beside_package = Path(__file__).resolve().parent.parent.parent / "bench"
    for candidate in (beside_package, Path.cwd() / "bench"):
        if (candidate / "bench_attention.py").is_file():
            return candidate
    return None


def _describe(path: Path) -> BenchScript:
    """Read a script's docstring and top-level functions without importing it (no torch import)."""
    name = path.stem[len("bench_"):] if path.stem.startswith("bench_") else path.stem
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return BenchScript(name, path, "(unreadable)", False)
    doc = (ast.get_docstring(tree) or "").strip().splitlines()
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    return BenchScript(name, path, doc[0] if doc else "", {"add_arguments", "run_from_args"} <= functions)


def bench_scripts(folder: Path) -> Dict[str, BenchScript]:
    """Every runnable ``*.py`` in ``folder`` (not ``_private.py``), by name."""
    scripts = [_describe(p) for p in sorted(folder.glob("*.py")) if not p.name.startswith("_")]
    return {script.name: script for script in scripts}


def find_script(scripts: Dict[str, BenchScript], name: str) -> BenchScript:
    key = name[:-3] if name.endswith(".py") else name
    key = key[len("bench_"):] if key.startswith("bench_") and key[len("bench_"):] in scripts else key
    if key not in scripts:
        raise CommandError(f"no benchmark script {name!r}; available: {', '.join(scripts) or 'none'} "
                           "(triton-attn bench --list)")
    return scripts[key]


def check_output_folder(value: str, flag: str = "--out") -> None:
    """Fail before a long run when ``value`` cannot become a writable folder (a file, under a file, read-only)."""
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise CommandError(f"{flag} {value}: exists and is not a folder")
    parent = path
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise CommandError(f"{flag} {value}: cannot create a folder there, {parent} is a file")
    if parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK):
        raise CommandError(f"{flag} {value}: {parent} is not writable")


def _output_folders(argv: Sequence[str]) -> List[str]:
    found = []
    for index, token in enumerate(argv):
        if token == "--out" and index + 1 < len(argv):
            found.append(argv[index + 1])
        elif token.startswith("--out="):
            found.append(token.split("=", 1)[1])
    return found


BENCH_USAGE = "triton-attn bench [--dir DIR] [--list] [SCRIPT] [SCRIPT OPTIONS...]"


def bench_help(folder: Optional[Path]) -> str:
    lines = [f"usage: {BENCH_USAGE}", "",
             "Run a benchmark script of bench/ by name (default: attention, the forward + backward suite against "
             "SDPA / FlexAttention / flash-attn); results go under bench/results/ as CSV + PNG.", "",
             "options:",
             "  -h, --help   this help; `triton-attn bench SCRIPT --help` shows a script's own options",
             "  --list       list the scripts and exit",
             "  --dir DIR    the folder of benchmark scripts (default: bench/ of the source checkout, or ./bench)", ""]
    if folder is None:
        lines.append(f"no bench/ folder found: {INSTALLED_HELP}")
    else:
        lines.append(f"scripts in {folder}:")
        lines += [f"  {s.name:<22} {s.summary}" for s in bench_scripts(folder).values()]
    return "\n".join(lines)


def run_bench(argv: Sequence[str], progress_factory) -> int:
    """``triton-attn bench`` with ``argv`` the words after ``bench``."""
    argv = list(argv)
    explicit_dir, listing, show_help = None, False, False
    while argv and argv[0] in ("--dir", "--list", "-h", "--help") or (argv and argv[0].startswith("--dir=")):
        token = argv.pop(0)
        if token.startswith("--dir="):
            explicit_dir = token.split("=", 1)[1]
        elif token == "--dir":
            if not argv:
                raise CommandError("--dir needs a folder")
            explicit_dir = argv.pop(0)
        elif token == "--list":
            listing = True
        else:
            show_help = True
    folder = bench_dir(explicit_dir)
    if show_help:
        print(bench_help(folder))
        return 0
    if folder is None:
        raise CommandError(INSTALLED_HELP)
    scripts = bench_scripts(folder)
    if listing:
        print(f"benchmark scripts in {folder} (run: triton-attn bench SCRIPT [OPTIONS]; SCRIPT --help for options):")
        for script in scripts.values():
            print(f"  {script.name:<22} {script.summary}")
        return 0
    name = argv.pop(0) if argv and not argv[0].startswith("-") else DEFAULT_SCRIPT
    script = find_script(scripts, name)
    wants_help = "-h" in argv or "--help" in argv
    if not wants_help:
        for value in _output_folders(argv):
            check_output_folder(value)
    if script.in_process:
        return _run_in_process(script, argv, progress_factory)
    return subprocess.call([sys.executable, str(script.path), *argv])


def _run_in_process(script: BenchScript, argv: List[str], progress_factory) -> int:
    parser = OneLineErrorParser(prog=f"triton-attn bench {script.name}", description=script.summary,
                                formatter_class=DefaultsHelpFormatter)
    spec = importlib.util.spec_from_file_location(f"triton_attn_bench_{script.name}", script.path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    module.add_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    for value in (getattr(args, "out", None),):
        if isinstance(value, str):
            check_output_folder(value)
    return module.run_from_args(args, progress_factory=lambda total, text: progress_factory(total, text,
                                                                                           not args.quiet))
