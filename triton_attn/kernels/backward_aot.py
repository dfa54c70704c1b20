"""Ahead-of-time compilation of the backward kernels for sm_80 / sm_90, without a GPU.

The backward counterpart of ``aot.compile_forward``: same pipeline (``triton.compile`` of an
``ASTSource`` for ``GPUTarget("cuda", arch, 32)``, then the bundled ``ptxas -v`` for registers
and spills), same ``AotResult``. Only the signatures differ: they come from
``backward.DKDV_RUNTIME_PARAMS`` / ``DQ_RUNTIME_PARAMS`` and the kernels' captured parameters.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from . import backward
from .aot import _TRITON_DTYPES, AotResult, ptxas_report, sass_has_wgmma
from .backward_codegen import BackwardKernels
from .backward_launch import BackwardConfig, dkdv_constexprs, dq_constexprs
from .codegen import MASK_BITMASK, GeneratedKernel
from .configs import KernelConfig

# Runtime parameters the JIT turns into the constant 1 for contiguous tensors.
_UNIT_STRIDES = {"stride_qd", "stride_kd", "stride_vd", "stride_dod", "stride_dkd", "stride_dvd", "stride_dqd",
                 "stride_layout_m", "stride_layout_n"}
_NOT_DIVISIBLE = {"q_len", "kv_len", "num_q_heads", "num_kv_heads", "gqa_groups", "scale_log2", "score_scale"}


def _captured_pointer_types(kernel: GeneratedKernel) -> Dict[str, str]:
    if kernel.spec.mask_mode == MASK_BITMASK:
        types = {"fallback_bits": "*u8", "fallback_offsets": "*i32", "fallback_block_ids": "*i32"}
    else:
        types = {}
        if kernel.spec.mask is not None:
            types.update({f"mask_cap{i}": "*" + _TRITON_DTYPES[t.dtype]
                          for i, t in enumerate(kernel.spec.mask.captured)})
    if kernel.spec.score is not None:
        types.update({f"score_cap{i}": "*" + _TRITON_DTYPES[t.dtype]
                      for i, t in enumerate(kernel.spec.score.captured)})
    return types


def build_backward_signature(kernel: GeneratedKernel, runtime_params, dtype: torch.dtype,
                             constexprs: Dict[str, object]):
    """(signature, constexprs, attrs) for ``ASTSource``, in the kernel's parameter order."""
    pointer_types = {"ptr:in": "*" + _TRITON_DTYPES[dtype], "ptr:f32": "*fp32", "ptr:i32": "*i32"}
    runtime_types = dict(runtime_params)
    captured_pointers = _captured_pointer_types(kernel)
    signature, all_constexprs, attrs = {}, dict(constexprs), {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name in _UNIT_STRIDES:
            signature[name], all_constexprs[name] = "constexpr", 1
            continue
        if name in runtime_types:
            signature[name] = pointer_types.get(runtime_types[name], runtime_types[name])
        else:
            signature[name] = captured_pointers.get(name, "i32")  # else a captured tensor's size or stride
        if signature[name].startswith("*") or (signature[name] == "i32" and name.startswith("stride_")
                                               and name not in _NOT_DIVISIBLE):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, all_constexprs, attrs


def _compile(kernel: GeneratedKernel, runtime_params, constexprs: dict, tiles: KernelConfig, *, arch: int,
             dtype: torch.dtype, head_dim: int, inspect_sass: bool) -> AotResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, all_constexprs, attrs = build_backward_signature(kernel, runtime_params, dtype, constexprs)
    compiled = triton.compile(ASTSource(kernel.jit(), signature, all_constexprs, attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": tiles.num_warps, "num_stages": tiles.num_stages})
    ptx = compiled.asm["ptx"]
    registers, spill_stores, spill_loads = ptxas_report(ptx, arch)
    shared = int(getattr(compiled.metadata, "shared", 0))
    wgmma = sass_has_wgmma(compiled.asm["cubin"]) if inspect_sass else None
    return AotResult(arch, tiles, head_dim, dtype, ptx, registers, spill_stores, spill_loads, shared, wgmma)


def compile_backward(kernels: BackwardKernels, config: BackwardConfig, *, arch: int,
                     dtype: torch.dtype = torch.bfloat16, head_dim: int = 128, head_dim_v: Optional[int] = None,
                     block_size: Tuple[int, int] = (128, 128), q_len: int = 4096, kv_len: int = 4096,
                     inspect_sass: bool = False) -> Dict[str, AotResult]:
    """Compile the dK/dV and dQ kernels with ``config`` for ``sm_{arch}``: {"dkdv": ..., "dq": ...}.

    ``config`` is fitted to ``block_size`` and the lengths first, exactly as a launch would.
    """
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    config = config.fitted(block_size[0], block_size[1], q_len, kv_len)
    shapes = dict(head_dim=head_dim, head_dim_v=head_dim_v, dtype=dtype, block_size=block_size,
                  q_len=q_len, kv_len=kv_len, interpret=False)
    options = dict(arch=arch, dtype=dtype, head_dim=head_dim, inspect_sass=inspect_sass)
    return {
        "dkdv": _compile(kernels.dkdv, backward.DKDV_RUNTIME_PARAMS, dkdv_constexprs(tiles=config.dkdv, **shapes),
                         config.dkdv, **options),
        "dq": _compile(kernels.dq, backward.DQ_RUNTIME_PARAMS, dq_constexprs(tiles=config.dq, **shapes),
                       config.dq, **options),
    }


def compile_preprocess(*, arch: int, dtype: torch.dtype = torch.bfloat16, head_dim_v: int = 128) -> str:
    """PTX of the delta preprocessing kernel for ``sm_{arch}`` (it has no config to vary)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from .configs import padded_head_dim

    element = "*" + _TRITON_DTYPES[dtype]
    signature = {"Out": element, "DOut": element, "DLse": "*fp32", "Delta": "*fp32"}
    for name in ("ob", "oh", "om", "od", "dob", "doh", "dom", "dod", "dlse_b", "dlse_h"):
        signature[f"stride_{name}"] = "i32"
    signature.update(q_len="i32", num_q_heads="i32", HEAD_DIM_V="constexpr", BLOCK_DV="constexpr",
                     BLOCK_M="constexpr", HAS_DLSE="constexpr")
    constexprs = dict(HEAD_DIM_V=head_dim_v, BLOCK_DV=padded_head_dim(head_dim_v), BLOCK_M=64, HAS_DLSE=True)
    compiled = triton.compile(ASTSource(JITFunction(backward.attention_backward_preprocess), signature, constexprs),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
    return compiled.asm["ptx"]
