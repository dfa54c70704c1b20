"""Exact tile refinement on the GPU: the mask compiler's "maybe" tiles, counted by a Triton kernel.

The mask compiler (``masks/compiler.py``) classifies most tiles by interval analysis and leaves a
list of undecided tiles, each given by its ``(b, h, query block row, kv block column)``. On CPU it
evaluates the mask_mod elementwise on them (``compiler.refine_tiles``). Here the same job is one
launch of ``refine_tiles_kernel``: one program per tile evaluates the mask_mod -- the same
generated ``MASK_FN`` the attention kernels call (``jit.functions``) -- on ``[BLOCK_Q, BLOCK_KV]``
sub-tiles covering the mask block, adds the allowed in-bounds positions up in registers and writes one
int32 count per tile. No dense mask ever exists in memory; the launcher turns the counts into
``(partial, full)``:

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

The kernel is ordinary ``@triton.jit`` source; the predicate's module comes from
``jit.functions.mod_functions`` exactly as for the attention kernels (keyed by the graph's
structure hash, ``TracedMod.key``).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..masks.tracing import TracedMod
from .attention.configs import next_power_of_two
from .jit import functions
from .jit.expressions import CodegenError
from .jit.modules import launch

# Sub-tile sides: compiled, int64 index math on [32, 64] keeps a 4-warp program well within its
# registers; the interpreter pays per operation, not per element, so it takes whole blocks.
COMPILED_SUB_TILE = (32, 64)
INTERPRETED_SUB_TILE = (128, 128)
NUM_WARPS = 4


@triton.jit(do_not_specialize=["q_len", "kv_len"])
def refine_tiles_kernel(tile_b, tile_h, tile_rows, tile_cols, counts, q_len, kv_len, mask_captured,
                        MASK_FN: tl.constexpr, Q_BLOCK_SIZE: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr,
                        BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr):
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
            mask_keep = MASK_FN(batch, head, q_idx, kv_idx, *mask_captured)
            keep = (q_in[:, None] & kv_in[None, :]) & (mask_keep != 0)
            allowed += keep.to(tl.int32)
    tl.store(counts + tile, tl.sum(allowed))


def refine_constexprs(block_size: Tuple[int, int], *, interpret: bool) -> dict:
    """The constexpr arguments for mask blocks of ``block_size`` (any positive sizes)."""
    q_bs, kv_bs = block_size
    cap_q, cap_kv = INTERPRETED_SUB_TILE if interpret else COMPILED_SUB_TILE
    return dict(Q_BLOCK_SIZE=q_bs, KV_BLOCK_SIZE=kv_bs,
                BLOCK_Q=min(next_power_of_two(q_bs), cap_q), BLOCK_KV=min(next_power_of_two(kv_bs), cap_kv))


def refine_arguments(tiles, counts: torch.Tensor, Q_LEN: int, KV_LEN: int, mask_captured: tuple) -> Dict[str, object]:
    """Runtime arguments of the refinement kernel by name (``tiles``: int64 b, h, rows, cols)."""
    return dict(zip(("tile_b", "tile_h", "tile_rows", "tile_cols"), tiles), counts=counts, q_len=Q_LEN, kv_len=KV_LEN,
                mask_captured=mask_captured)


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
    mods = functions.mod_functions(traced, None)
    tiles = [t.to(device=device, dtype=torch.int64).contiguous() for t in (b, h, rows, cols)]
    arguments = refine_arguments(tiles, counts, Q_LEN, KV_LEN, functions.captured_tuple(traced.captured, device))
    launch(refine_tiles_kernel, (count,), {**arguments, "MASK_FN": mods.mask_fn,
                                       **refine_constexprs(block_size, interpret=interpret)},
           interpret=interpret, device=device, num_warps=NUM_WARPS)
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

def compile_refine(traced: TracedMod, *, arch: int, block_size: Tuple[int, int] = (128, 128)):
    """Compile the refinement kernel of ``traced`` for ``sm_{arch}`` (no GPU needed): a
    ``tuning.aot.AotResult`` with registers and spills from ptxas."""
    from .tuning.aot import compile_kernel

    mods = functions.mod_functions(traced, None)
    meta = torch.device("meta")
    tiles = [torch.empty(1024, dtype=torch.int64, device=meta) for _ in range(4)]
    arguments = refine_arguments(tiles, torch.empty(1024, dtype=torch.int32, device=meta), 4096, 4096,
                                 functions.captured_tuple(traced.captured, meta))
    constexprs = {"MASK_FN": mods.mask_fn, **refine_constexprs(block_size, interpret=False)}
    return compile_kernel(refine_tiles_kernel, arguments, constexprs, arch=arch, num_warps=NUM_WARPS, num_stages=None,
                          label=f"refine {traced.name} block {tuple(block_size)}")


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
