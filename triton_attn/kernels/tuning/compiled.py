"""Facts read from a kernel's compiled output (TTGIR and PTX), for tests and tuning without a GPU.

Triton's ahead-of-time build (``tuning/aot.py``) hands back the TTGIR (the GPU dialect after
software pipelining) and the PTX. What they say about speed, in a form a test can assert:

- ``pipelined_loops(ttgir)``: for each innermost ``scf.for`` that copies tiles asynchronously, how
  many buffers each of its shared-memory rings has and which ``ttg.async_wait`` counts it waits
  with. A loop whose K/V ring has ``num_stages`` buffers keeps ``num_stages - 1`` loads in flight
  while it computes on one; ``async_wait {num = 0}`` at the top of every step means it keeps none.
- ``wgmma_shapes(ptx)``: the ``wgmma.mma_async`` instruction shapes ``(m, n, k)`` with their counts
  (Hopper's tensor cores want N >= 64 per warpgroup; ``m64n16k16`` is a sign of starved tiles).
- ``wide_row_products(ttgir)``: ``arith.muli`` of a row or column vector (``[N, 1]`` / ``[1, N]``)
  in 64 bits -- the ``position * row_stride`` products that must not wrap at 2**31.
- ``scalar_products(ttgir, file, lines)``: scalar ``arith.muli`` by width, optionally only those whose
  source location lies at given lines of a file -- the per-program ``index * stride`` products (a block
  list's offset) that must not wrap at 2**31 either.
- ``tensor_products(ttgir)``: ``arith.muli`` on integer tensors of any rank by width (``[N]`` vectors
  included: the decode kernel's per-row and per-key offsets are computed before the expand to 2-D).
- ``ptx_instruction_count(ptx, opcode)``: how often an instruction occurs (``div.full.f32``,
  ``tanh.approx.f32``, ``ex2.approx``, ``fma.rn.f32``).

Everything here is text parsing: it works on any machine and never imports Triton.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Container, Dict, List, Optional, Tuple

_FOR = re.compile(r"=\s*scf\.for\b|^\s*scf\.for\b")
_ASYNC_WAIT = re.compile(r"ttg\.async_wait\b.*\{num = (\d+) : i32\}")
_ASYNC_COPY = re.compile(r"ttg\.async_copy_global_to_local\b")
_RING_ALLOC = re.compile(r"%(\S+) = ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x([0-9x]+)x(\w+),.*mutable")
_WGMMA = re.compile(r"wgmma\.mma_async\.sync\.aligned\.m(\d+)n(\d+)k(\d+)")
_MULI = re.compile(r"arith\.muli\b.*:\s*tensor<(\d+)x(\d+)x(i32|i64)")
_TENSOR_MULI = re.compile(r"arith\.muli\b.*:\s*tensor<(?:\d+x)+(i32|i64)\b")


@dataclass
class PipelinedLoop:
    """One innermost ``scf.for`` of the TTGIR that moves data with asynchronous copies.

    line: 1-based line of the ``scf.for``. waits: the ``num`` of each ``ttg.async_wait`` in its body,
    in order. rings: name -> (buffers, tile shape, element type) of each multi-buffered shared-memory
    allocation made for this loop (the allocations between the previous loop and this one).
    copies: how many ``async_copy_global_to_local`` the body issues per step.
    """

    line: int
    waits: List[int] = field(default_factory=list)
    rings: Dict[str, Tuple[int, str, str]] = field(default_factory=dict)
    copies: int = 0

    def buffers(self, min_elements: int = 256) -> List[int]:
        """Buffer counts of the rings holding tiles of at least ``min_elements`` (K/V, Q, dO: not indices)."""
        result = []
        for count, shape, _ in self.rings.values():
            elements = 1
            for size in shape.split("x"):
                elements *= int(size)
            if elements >= min_elements:
                result.append(count)
        return result

    def loads_in_flight(self) -> int:
        """Tile loads this loop keeps in flight while it computes: (smallest tile ring) - 1, or 0."""
        rings = self.buffers()
        return min(rings) - 1 if rings else 0

    def __str__(self) -> str:
        rings = ", ".join(f"{name}: {count}x{shape}x{dtype}" for name, (count, shape, dtype) in self.rings.items())
        return f"loop at line {self.line}: async_wait {self.waits}, {self.copies} copies per step, rings [{rings}]"


def _body_end(lines: List[str], start: int) -> int:
    """Index of the line closing the region opened on ``lines[start]`` (matching indentation)."""
    indent = len(lines[start]) - len(lines[start].lstrip())
    for index in range(start + 1, len(lines)):
        text = lines[index]
        stripped = text.lstrip()
        if stripped.startswith("}") and len(text) - len(stripped) == indent:
            return index
    return len(lines) - 1


def pipelined_loops(ttgir: str) -> List[PipelinedLoop]:
    """The innermost loops of ``ttgir`` that issue asynchronous copies, in source order."""
    lines = ttgir.splitlines()
    starts = [i for i, text in enumerate(lines) if _FOR.search(text)]
    spans = [(start, _body_end(lines, start)) for start in starts]
    loops, previous_end = [], 0
    for start, end in spans:
        inner = any(start < other < end for other, _ in spans)
        if not inner:
            loop = PipelinedLoop(line=start + 1)
            for text in lines[start + 1:end]:
                wait = _ASYNC_WAIT.search(text)
                if wait:
                    loop.waits.append(int(wait.group(1)))
                if _ASYNC_COPY.search(text):
                    loop.copies += 1
            for text in lines[previous_end:start]:
                ring = _RING_ALLOC.search(text)
                if ring:
                    loop.rings[ring.group(1)] = (int(ring.group(2)), ring.group(3), ring.group(4))
            if loop.copies:
                loops.append(loop)
            previous_end = end
    return loops


def wgmma_shapes(ptx: str) -> Counter:
    """``Counter({(m, n, k): count})`` of the ``wgmma.mma_async`` instructions in ``ptx``."""
    return Counter((int(m), int(n), int(k)) for m, n, k in _WGMMA.findall(ptx))


def wide_row_products(ttgir: str) -> Counter:
    """``Counter({bits: count})`` of ``arith.muli`` on ``[N, 1]`` / ``[1, N]`` integer tensors: the
    per-row (or per-column) ``position * stride`` products of address computations, by width."""
    widths = Counter()
    for rows, cols, dtype in _MULI.findall(ttgir):
        if rows == "1" or cols == "1":
            widths[64 if dtype == "i64" else 32] += 1
    return widths


def tensor_products(ttgir: str) -> Counter:
    """``Counter({bits: count})`` of ``arith.muli`` on integer tensors of any rank (``[N]``, ``[M, N]``, ...)."""
    return Counter(64 if dtype == "i64" else 32 for dtype in _TENSOR_MULI.findall(ttgir))


def ptx_instruction_count(ptx: str, opcode: str) -> int:
    """How many instructions of ``opcode`` (e.g. ``div.full.f32``, ``tanh.approx.f32``) ``ptx`` holds."""
    pattern = re.compile(r"^\s*(@%p\d+\s+)?" + re.escape(opcode) + r"\b", re.MULTILINE)
    return len(pattern.findall(ptx))


_SCALAR_MULI = re.compile(r"arith\.muli\b[^:]*:\s*(i32|i64)\s+loc\((#loc\d*|\"[^\"]*\":\d+:\d+)\)")
_LOC_FILE = re.compile(r'^(#loc\d*) = loc\("([^"]*)":(\d+):\d+\)')
_LOC_NAMED = re.compile(r'^(#loc\d*) = loc\("[^"]*"\((#loc\d*)\)\)')
_LOC_CALLSITE = re.compile(r"^(#loc\d*) = loc\(callsite\((#loc\d*) at (#loc\d*)\)\)")
_INLINE_FILE = re.compile(r'^"([^"]*)":(\d+):\d+$')


def _source_locations(ttgir: str) -> Dict[str, Tuple[str, int]]:
    """``{"#locN": (file, line)}`` for the TTGIR's location aliases: a named location is its inner one, a
    call site (an inlined ``@triton.jit`` call) the callee's frame."""
    files: Dict[str, Tuple[str, int]] = {}
    links: Dict[str, str] = {}
    for text in ttgir.splitlines():
        found = _LOC_FILE.match(text)
        if found:
            files[found.group(1)] = (found.group(2), int(found.group(3)))
            continue
        found = _LOC_NAMED.match(text) or _LOC_CALLSITE.match(text)
        if found:
            links[found.group(1)] = found.group(2)
    resolved: Dict[str, Tuple[str, int]] = {}
    for alias in list(files) + list(links):
        seen, current = set(), alias
        while current in links and current not in seen:
            seen.add(current)
            current = links[current]
        if current in files:
            resolved[alias] = files[current]
    return resolved


def scalar_products(ttgir: str, file: Optional[str] = None, lines: Optional[Container[int]] = None) -> Counter:
    """``Counter({bits: count})`` of scalar ``arith.muli`` (``i32`` / ``i64``, no tensor): per-program address
    arithmetic such as a block list's ``batch * stride + head * stride + row * stride``. ``file`` (a path
    suffix) and ``lines``: only the products whose source location -- the innermost frame of an inlined
    ``@triton.jit`` call -- is in that file, at one of those lines."""
    locations = _source_locations(ttgir)
    widths = Counter()
    for dtype, location in _SCALAR_MULI.findall(ttgir):
        if file is not None or lines is not None:
            inline = _INLINE_FILE.match(location)
            where = (inline.group(1), int(inline.group(2))) if inline else locations.get(location)
            if where is None or (file is not None and not where[0].endswith(file)) \
                    or (lines is not None and where[1] not in lines):
                continue
        widths[64 if dtype == "i64" else 32] += 1
    return widths
