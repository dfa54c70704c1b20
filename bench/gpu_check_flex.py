"""Compiled FlexAttention for ``bench/gpu_check.py``: compiled once per shape, and proven to have run compiled.

Dynamo keeps one cache of compiled graphs per code object: every ``torch.compile(flex_attention)`` of a run
shares ``flex_attention``'s, and each new shape, BlockMask structure or score_mod adds an entry. Past
``torch._dynamo.config.recompile_limit`` (8 by default) dynamo stops compiling and, without ``fullgraph``,
runs the function eagerly -- FlexAttention's unfused reference, hundreds of times slower -- with one log
line, so a "flex_compiled" row would time the eager fallback. Three guards:

- ``flex_limits()`` raises the recompile limits for the run (``RECOMPILE_LIMIT`` per code object);
- ``CompiledFlex`` compiles with ``fullgraph=True, dynamic=False``: a limit hit or a graph break raises
  (the row becomes an error row) instead of falling back, and one graph is compiled per shape;
- its backend counts compiles and runs of the compiled graph (``CountingBackend``): after the calls a row
  times, ``flex_verdict`` compares the calls made with the compiled runs, and a row whose calls did not all
  run compiled says so (``ok=False``, "ran EAGER ...") instead of passing as compiled.

``flex_verdict`` is a pure function (tests/test_gpu_check.py checks it flags a fallback).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, NamedTuple, Optional, Tuple

import torch

RECOMPILE_LIMIT = 256  # per code object: every shape x mask x score_mod of one gpu_check run fits


class FlexVerdict(NamedTuple):
    """Whether the calls since a snapshot all ran the compiled graph (``ok``), and a note saying so."""

    ok: bool
    note: str


def flex_verdict(calls: int, compiled_runs: int, compiles: int) -> FlexVerdict:
    """The verdict on ``calls`` calls of a compiled callable during which its compiled graph ran
    ``compiled_runs`` times and ``compiles`` graphs were compiled.

    With ``fullgraph=True`` each call runs exactly one compiled graph, so every call is accounted for only
    when ``compiled_runs >= calls``; a call that ran no compiled graph ran eagerly (dynamo's fallback)."""
    if calls <= 0:
        return FlexVerdict(False, "not called")
    new = f", {compiles} compile{'s' if compiles != 1 else ''}" if compiles else ""
    if compiled_runs >= calls:
        return FlexVerdict(True, f"compiled ({calls} call{'s' if calls != 1 else ''}{new})")
    if compiled_runs <= 0:
        return FlexVerdict(False, f"ran EAGER: none of {calls} calls ran a compiled graph (dynamo fell back){new}")
    return FlexVerdict(False, f"ran EAGER on {calls - compiled_runs} of {calls} calls (dynamo fell back){new}")


class CountingBackend:
    """A ``torch.compile`` backend that compiles with ``inner`` (default inductor) and counts compiles and runs
    of the graphs it compiled. Dynamo calls a compiled graph as ``fn(*args)``; the wrapper passes them on."""

    def __init__(self, inner: str = "inductor"):
        self.inner = inner
        self.compiles = 0
        self.runs = 0

    def __call__(self, graph_module, example_inputs):
        from torch._dynamo.backends.registry import lookup_backend

        compiled = lookup_backend(self.inner)(graph_module, example_inputs)
        self.compiles += 1

        def run(*args, **kwargs):
            self.runs += 1
            return compiled(*args, **kwargs)

        if getattr(compiled, "_boxed_call", False):  # the same calling convention as what it wraps
            run._boxed_call = True
        return run


class CompiledFlex:
    """``torch.compile(fn, fullgraph=True, dynamic=False)`` (``fn`` defaults to FlexAttention) with a
    ``CountingBackend``: call it like ``fn``; ``snapshot()`` before the calls a row times and
    ``verdict(snapshot)`` after them say whether they all ran compiled. One per run: dynamo compiles one graph
    per shape and reuses it (the cache belongs to ``fn``'s code object, not to this wrapper)."""

    def __init__(self, fn: Optional[Callable] = None, inner: str = "inductor"):
        if fn is None:
            from torch.nn.attention.flex_attention import flex_attention as fn
        self.backend = CountingBackend(inner)
        self.compiled = torch.compile(fn, backend=self.backend, fullgraph=True, dynamic=False)
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.compiled(*args, **kwargs)

    def snapshot(self) -> Tuple[int, int, int]:
        """(calls, compiled runs, compiles) so far."""
        return self.calls, self.backend.runs, self.backend.compiles

    def verdict(self, since: Tuple[int, int, int]) -> FlexVerdict:
        calls, runs, compiles = (now - before for now, before in zip(self.snapshot(), since))
        return flex_verdict(calls, runs, compiles)


@contextlib.contextmanager
def flex_limits(limit: int = RECOMPILE_LIMIT) -> Iterator[None]:
    """Raise dynamo's recompile limits (per code object and accumulated) to at least ``limit`` inside the block
    (``cache_size_limit`` is the older name of ``recompile_limit``; either is set where it exists)."""
    config = torch._dynamo.config
    saved = {}
    for names in (("recompile_limit", "cache_size_limit"),
                  ("accumulated_recompile_limit", "accumulated_cache_size_limit")):
        name = next((n for n in names if hasattr(config, n)), None)
        if name is not None:
            saved[name] = getattr(config, name)
            setattr(config, name, max(limit, saved[name]))
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(config, name, value)


def timed_flex(flex: CompiledFlex, call: Callable[[], object], timer: Callable[[Callable[[], object]], float]
               ) -> Tuple[float, FlexVerdict]:
    """Warm ``call`` up (compiles), then time it with ``timer``; the verdict covers every call made, warm-up
    included: (ms, verdict)."""
    since = flex.snapshot()
    call()
    ms = timer(call)
    return ms, flex.verdict(since)
