"""Exact tile refinement on the GPU: the mask compiler's "maybe" tiles, counted by a Triton kernel.

The mask compiler (``masks/compiler.py``) classifies most tiles by interval analysis and leaves a
list of undecided tiles, each given by its ``(b, h, query block row, kv block column)``. On CPU it
evaluates the mask_mod elementwise on them (``compiler.refine_tiles``). Here the same job is one
launch of a generated kernel: one program per tile evaluates the mask_mod's graph, inlined by the
same ``Emitter`` as the attention kernels, on ``[BLOCK_Q, BLOCK_KV]`` sub-tiles covering the mask
block, adds the allowed in-bounds positions up in registers and writes one int32 count per tile.
No dense mask ever exists in memory; the launcher turns the counts into ``(partial, full)``:

    full    = count == in-bounds positions of the tile   (all allowed)
    partial = 0 < count < in-bounds positions             (some allowed)

exactly ``compiler.refine_tiles``'s contract (positions past ``Q_LEN``/``KV_LEN`` in a ragged tail
take no part).

Semantics follow eager PyTorch where the attention kernels' shortcuts could differ: the index
values ``batch``, ``head``, ``q_idx``, ``kv_idx`` are int64 here (eager mask_mods see int64
``arange``s), and positions past the end of a ragged tail are clamped to the last in-bounds one
before the predicate sees them (as ``refine_tiles`` does), so no out-of-range index is ever formed
on their behalf. Loads from captured tensors are bounds-masked (an out-of-range index reads 0
where eager PyTorch raises): the compiler must send tiles that interval analysis marks *poisoned*
(where eager evaluation might raise or wrap) to the eager ``refine_tiles`` instead, so that
errors surface exactly as in the exact compiler (see ``install``).

Dispatch: ``masks/`` knows no Triton, so the compiler only consults a registry,
``masks.compiler.TILE_REFINERS`` (device type -> refiner); ``install()`` puts ``cuda_refiner``
there under ``"cuda"``. The API layer calls it when CUDA is available and Triton imports.

Module files, keys and kernel objects come from ``codegen``/``modules`` exactly as for the
attention kernels: the source is written to the cache directory and imported, keyed by the
graph's structure hash (``TracedMod.key``) and this template's version.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from ..masks.tracing import TracedMod
from .jit import functions as codegen
from .jit.functions import CapturedParam, CodegenError, GeneratedKernel, KernelSpec

# Bump when the template or its specialization changes: it is part of the cache key.
TEMPLATE_VERSION = 1

KERNEL_TEMPLATE = '''
def @@KERNEL_NAME@@(
    tile_b, tile_h, tile_rows, tile_cols, counts,
    q_len, kv_len,
    # @@CAPTURED_ARGS@@
    Q_BLOCK_SIZE: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr,
):
    tile = tl.program_id(0)
    # Index values are int64, as the aranges an eager mask_mod sees.
    batch = tl.load(tile_b + tile).to(tl.int64)
    head = tl.load(tile_h + tile).to(tl.int64)
    row0 = tl.load(tile_rows + tile).to(tl.int64) * Q_BLOCK_SIZE
    col0 = tl.load(tile_cols + tile).to(tl.int64) * KV_BLOCK_SIZE
    allowed = tl.zeros([BLOCK_Q, BLOCK_KV], dtype=tl.int32)
    for q_step in range(0, Q_BLOCK_SIZE, BLOCK_Q):
        rows_in_block = q_step + tl.arange(0, BLOCK_Q)
        q_pos = row0 + rows_in_block                                         # [BLOCK_Q] int64
        q_in = (q_pos < q_len) & (rows_in_block < Q_BLOCK_SIZE)
        # Past the end of a ragged tail: evaluate the last in-bounds row instead (counted out below).
        q_idx = tl.minimum(q_pos, q_len - 1)[:, None]                        # [BLOCK_Q, 1]
        for kv_step in range(0, KV_BLOCK_SIZE, BLOCK_KV):
            cols_in_block = kv_step + tl.arange(0, BLOCK_KV)
            kv_pos = col0 + cols_in_block                                    # [BLOCK_KV] int64
            kv_in = (kv_pos < kv_len) & (cols_in_block < KV_BLOCK_SIZE)
            kv_idx = tl.minimum(kv_pos, kv_len - 1)[None, :]                 # [1, BLOCK_KV]
            # @@MASK_PREDICATE@@
            keep = (q_in[:, None] & kv_in[None, :]) & (mask_keep != 0)
            allowed += keep.to(tl.int32)
    tl.store(counts + tile, tl.sum(allowed))
'''

# Runtime (non-constexpr, non-captured) parameters, in order, with their AOT signature types.
RUNTIME_PARAMS = (("tile_b", "*i64"), ("tile_h", "*i64"), ("tile_rows", "*i64"), ("tile_cols", "*i64"),
                  ("counts", "*i32"), ("q_len", "i32"), ("kv_len", "i32"))
CONSTEXPR_NAMES = ("Q_BLOCK_SIZE", "KV_BLOCK_SIZE", "BLOCK_Q", "BLOCK_KV")

# Sub-tile sides: compiled, int64 index math on [32, 64] keeps a 4-warp program well within its
# registers; the interpreter pays per operation, not per element, so it takes whole blocks.
COMPILED_SUB_TILE = (32, 64)
INTERPRETED_SUB_TILE = (128, 128)
NUM_WARPS = 4


def refine_key(traced: TracedMod) -> str:
    text = f"refine{TEMPLATE_VERSION}.{codegen.CODEGEN_VERSION}|{traced.key}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class RefineSource:
    kernel_name: str
    source: str
    captured: Tuple[CapturedParam, ...]


def generate_refine_source(traced: TracedMod) -> RefineSource:
    """The module source of the refinement kernel for ``traced``; raises ``CodegenError``."""
    key = refine_key(traced)
    mask_source, captured = codegen.mask_lines(KernelSpec(codegen.MASK_TRACED, traced))
    kernel_name = f"refine_tiles_{key}"
    body = KERNEL_TEMPLATE.replace("@@KERNEL_NAME@@", kernel_name)
    body = codegen.replace_marker(body, "CAPTURED_ARGS", [", ".join(p.arg_names()) + "," for p in captured])
    body = codegen.replace_marker(body, "MASK_PREDICATE", mask_source)
    header = (f'"""Generated by triton_attn.kernels.refine; do not edit.\n\n'
              f"mask_mod: {traced.name!r}; key {key}\n"
              f'"""\n\nimport triton\nimport triton.language as tl\n\n')
    return RefineSource(kernel_name, header + body.strip("\n") + "\n", tuple(captured))


_KERNELS = codegen.KernelMemo()


def refine_kernel_for(traced: TracedMod) -> GeneratedKernel:
    """The refinement kernel for ``traced``, from memory, the cache directory, or freshly written."""
    def make() -> GeneratedKernel:
        generated = generate_refine_source(traced)
        module, path = codegen.load_module(generated.kernel_name, generated.source)
        return GeneratedKernel(KernelSpec(codegen.MASK_TRACED, traced), generated.kernel_name, path,
                               getattr(module, generated.kernel_name), generated.captured)

    return _KERNELS.get(refine_key(traced), make)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def refine_constexprs(block_size: Tuple[int, int], *, interpret: bool) -> dict:
    """The constexpr arguments for mask blocks of ``block_size`` (any positive sizes)."""
    q_bs, kv_bs = block_size
    cap_q, cap_kv = INTERPRETED_SUB_TILE if interpret else COMPILED_SUB_TILE
    return dict(Q_BLOCK_SIZE=q_bs, KV_BLOCK_SIZE=kv_bs,
                BLOCK_Q=min(_next_power_of_2(q_bs), cap_q), BLOCK_KV=min(_next_power_of_2(kv_bs), cap_kv))


def tile_capacity(rows: torch.Tensor, cols: torch.Tensor, Q_LEN: int, KV_LEN: int,
                  block_size: Tuple[int, int]) -> torch.Tensor:
    """int32 per tile: its positions inside the sequence (smaller in ragged tails)."""
    q_bs, kv_bs = block_size
    in_rows = (Q_LEN - rows * q_bs).clamp(max=q_bs)
    in_cols = (KV_LEN - cols * kv_bs).clamp(max=kv_bs)
    return (in_rows * in_cols).to(torch.int32)


def tile_counts_triton(traced: TracedMod, b: torch.Tensor, h: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                       Q_LEN: int, KV_LEN: int, block_size: Tuple[int, int], *,
                       interpret: bool = False) -> torch.Tensor:
    """int32 ``[T]``: allowed in-bounds positions of each listed tile, counted by the kernel."""
    device = rows.device
    count = rows.numel()
    counts = torch.empty(count, dtype=torch.int32, device=device)
    if count == 0:
        return counts
    if max(Q_LEN, KV_LEN) >= 2 ** 31:
        raise ValueError("refine_tiles_triton: sequence lengths must fit in int32")
    kernel = refine_kernel_for(traced)
    tiles = [t.to(device=device, dtype=torch.int64).contiguous() for t in (b, h, rows, cols)]
    from .attention.forward_launch import _captured_args

    args = [*tiles, counts, Q_LEN, KV_LEN, *_captured_args(kernel.captured, list(traced.captured), device)]
    constexprs = refine_constexprs(block_size, interpret=interpret)
    grid = (count,)
    if interpret:
        kernel.interpreted()[grid](*args, **constexprs)
    else:
        with torch.cuda.device(device):
            kernel.jit()[grid](*args, **constexprs, num_warps=NUM_WARPS)
    return counts


def refine_tiles_triton(traced: TracedMod, b: torch.Tensor, h: torch.Tensor, rows: torch.Tensor,
                        cols: torch.Tensor, Q_LEN: int, KV_LEN: int, block_size: Tuple[int, int], *,
                        interpret: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """``compiler.refine_tiles`` on the GPU (or the interpreter): ``(partial, full)`` bool ``[T]``.

    ``traced``: the traced mask_mod (``trace_mask_mod``). ``b``/``h``/``rows``/``cols``: int64
    ``[T]``, each tile's batch, head, query block and kv block. ``interpret``: run the same kernel
    under Triton's interpreter on CPU tensors. Raises ``CodegenError`` when the graph cannot be
    emitted as Triton code.
    """
    counts = tile_counts_triton(traced, b, h, rows, cols, Q_LEN, KV_LEN, block_size, interpret=interpret)
    capacity = tile_capacity(rows.to(counts.device), cols.to(counts.device), Q_LEN, KV_LEN, tuple(block_size))
    full = counts == capacity
    partial = (counts > 0) & ~full
    return partial, full


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation (no GPU needed): proves a variant builds for sm_80 / sm_90
# ---------------------------------------------------------------------------------------------

@dataclass
class RefineAotResult:
    arch: int
    block_size: Tuple[int, int]
    ptx: str
    registers: int
    spill_stores: int
    spill_loads: int

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0

    def __str__(self) -> str:
        return (f"refine sm_{self.arch} block {self.block_size}: {self.registers} registers, "
                f"spills {self.spill_stores}/{self.spill_loads} bytes")


def build_refine_signature(kernel: GeneratedKernel, constexprs: Dict[str, object]):
    """(signature, constexprs, attrs) for ``ASTSource``, as the JIT specializes contiguous inputs."""
    from .tuning.aot import _TRITON_DTYPES

    runtime = dict(RUNTIME_PARAMS)
    pointers = {f"mask_cap{i}": "*" + _TRITON_DTYPES[t.dtype] for i, t in enumerate(kernel.spec.mask.captured)}
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = runtime.get(name) or pointers.get(name) or "i32"  # else a captured size or stride
        if signature[name].startswith("*"):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, dict(constexprs), attrs


def compile_refine(traced: TracedMod, *, arch: int, block_size: Tuple[int, int] = (128, 128)) -> RefineAotResult:
    """Compile the refinement kernel of ``traced`` for ``sm_{arch}``; registers and spills from ptxas."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .tuning.aot import ptxas_report

    kernel = refine_kernel_for(traced)
    signature, constexprs, attrs = build_refine_signature(kernel, refine_constexprs(block_size, interpret=False))
    compiled = triton.compile(ASTSource(kernel.jit(), signature, constexprs, attrs),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": NUM_WARPS})
    ptx = compiled.asm["ptx"]
    registers, spill_stores, spill_loads = ptxas_report(ptx, arch)
    return RefineAotResult(arch, tuple(block_size), ptx, registers, spill_stores, spill_loads)


# ---------------------------------------------------------------------------------------------
# Registration with the mask compiler
# ---------------------------------------------------------------------------------------------

def cuda_refiner(traced: TracedMod, b, h, rows, cols, Q_LEN: int, KV_LEN: int,
                 block_size: Tuple[int, int]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The refiner registered for ``"cuda"``: compiled kernel; None when the graph cannot be
    generated (the compiler then refines eagerly, as without a refiner)."""
    try:
        return refine_tiles_triton(traced, b, h, rows, cols, Q_LEN, KV_LEN, block_size, interpret=False)
    except CodegenError:
        return None


def interpreted_refiner(traced: TracedMod, b, h, rows, cols, Q_LEN: int, KV_LEN: int,
                        block_size: Tuple[int, int]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """Same as ``cuda_refiner`` under the interpreter (CPU tensors): for tests and debugging."""
    try:
        return refine_tiles_triton(traced, b, h, rows, cols, Q_LEN, KV_LEN, block_size, interpret=True)
    except CodegenError:
        return None


def install(device_type: str = "cuda", refiner=None) -> None:
    """Register the Triton refiner with the mask compiler for ``device_type`` (default "cuda").

    ``refiner`` defaults to ``cuda_refiner`` (compiled); pass ``interpreted_refiner`` to run the
    kernel under the interpreter, e.g. for ``"cpu"`` in tests. Needs ``masks.compiler.TILE_REFINERS``.
    """
    from ..masks import compiler

    registry = getattr(compiler, "TILE_REFINERS", None)
    if registry is None:
        raise RuntimeError("triton_attn.masks.compiler has no TILE_REFINERS hook")
    registry[device_type] = cuda_refiner if refiner is None else refiner


def uninstall(device_type: str = "cuda") -> None:
    from ..masks import compiler

    getattr(compiler, "TILE_REFINERS", {}).pop(device_type, None)
