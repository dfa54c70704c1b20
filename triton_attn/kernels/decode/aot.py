"""Ahead-of-time compiles of the decode kernels for sm_80 / sm_90 (no GPU needed).

``compile_decode`` builds ``decode_split_kernel`` for one config and one specialization (dtype, head
dims, GQA packing, paged or not, split or not, the mods' generated functions) with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and reads registers and
spills from ptxas (``tuning/aot.ptxas_report``). The signature mirrors what the JIT specializes for
contiguous inputs: unit last-dim strides are the constant 1.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from ...masks.tracing import trace_mask_mod, trace_score_mod
from ..attention.configs import KernelConfig, cdiv, padded_head_dim
from ..jit import functions
from ..tuning.aot import SHARED_MEMORY_LIMIT, AotResult, ptxas_report  # noqa: F401  (re-exported limit)
from .configs import fit_decode

_POINTER = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
_UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_layout_m")
_FLOAT_PARAMS = ("scale_log2", "score_scale")


def _runtime_type(name: str, dtype: torch.dtype, paged: bool) -> str:
    if name in ("Q", "K", "V", "Out"):
        return _POINTER[dtype]
    if name in ("Lse", "PartOut", "PartLse"):
        return "*fp32"
    if name in ("page_table", "kv_lens"):
        return "*i32" if paged else "*fp32"
    if name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        return "*i32"
    if name in _FLOAT_PARAMS:
        return "fp32"
    return "i32"


def compile_decode(config: KernelConfig, *, arch: int, dtype: torch.dtype = torch.bfloat16, head_dim: int = 128,
                   head_dim_v: Optional[int] = None, groups: int = 4, q_len: int = 1, paged: bool = False,
                   page_size: int = 16, num_splits: int = 4, block_size=(128, 128),
                   mask_mod: Optional[Callable] = None, score_mod: Optional[Callable] = None) -> AotResult:
    """Compile the split kernel with ``config`` (fitted to the packed rows) for ``sm_{arch}``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .kernel import decode_split_kernel

    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    mask = trace_mask_mod(mask_mod) if mask_mod is not None else None
    score = trace_score_mod(score_mod) if score_mod is not None else None
    mods = functions.mod_functions(mask, score)
    q_bs, kv_bs = block_size
    rows = min(q_bs, q_len) * groups
    tiles = fit_decode(config, rows, kv_bs)
    constexprs: Dict[str, object] = dict(
        MASK_FN=mods.mask_fn, SCORE_FN=mods.score_fn, HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v,
        BLOCK_D=padded_head_dim(head_dim), BLOCK_DV=padded_head_dim(head_dim_v),
        BLOCK_M=tiles.BLOCK_M, BLOCK_N=tiles.BLOCK_N, Q_BLOCK_SIZE=q_bs, KV_BLOCK_SIZE=kv_bs,
        KV_TILES_PER_BLOCK=cdiv(kv_bs, tiles.BLOCK_N), ROW_TILES_PER_BLOCK=cdiv(rows, tiles.BLOCK_M),
        HEADS_PER_TILE=groups, NUM_SPLITS=num_splits, PAGED=paged, PAGE_SIZE=page_size if paged else 1,
        CHECK_KV_BOUNDS=paged, DOT_PRECISION="tf32x3" if dtype == torch.float32 else "tf32", UPCAST_DOT=False)
    captured = {"mask_captured": functions.captured_signature(mask.captured) if mask is not None else (),
                "score_captured": functions.captured_signature(score.captured) if score is not None else ()}
    signature, attrs = {}, {}
    for index, name in enumerate(decode_split_kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _UNIT_STRIDES:
            signature[name], constexprs[name] = "constexpr", 1
        elif name in captured:
            signature[name] = captured[name]
        else:
            signature[name] = _runtime_type(name, dtype, paged)
            if signature[name].startswith("*") or (name.startswith("stride_") and signature[name] == "i32"):
                attrs[(index,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(decode_split_kernel, signature, constexprs, attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": tiles.num_warps, "num_stages": tiles.num_stages,
                                       "enable_fp_fusion": True})
    ptx = compiled.asm["ptx"]
    registers, spill_stores, spill_loads = ptxas_report(ptx, arch)
    shared = int(getattr(compiled.metadata, "shared", 0))
    return AotResult(arch, tiles, head_dim, dtype, ptx, registers, spill_stores, spill_loads, shared, None)
