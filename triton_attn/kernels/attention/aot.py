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
from ..tuning.aot import _TRITON_DTYPES, AotResult, build_signature, compile_kernel
from .backward_codegen import BackwardKernels
from .backward_launch import BackwardConfig, dkdv_constexprs, dq_constexprs
from ..jit.functions import GeneratedKernel
from .configs import KernelConfig

# Runtime parameters the JIT turns into the constant 1 for contiguous tensors.
_UNIT_STRIDES = {"stride_qd", "stride_kd", "stride_vd", "stride_dod", "stride_dkd", "stride_dvd", "stride_dqd",
                 "stride_layout_m", "stride_layout_n"}
_NOT_DIVISIBLE = {"q_len", "kv_len", "num_q_heads", "num_kv_heads", "gqa_groups", "scale_log2", "score_scale"}


def _compile(kernel: GeneratedKernel, runtime_params, constexprs: dict, tiles: KernelConfig, *, arch: int,
             dtype: torch.dtype, head_dim: int, inspect_sass: bool) -> AotResult:
    signature, all_constexprs, attrs = build_signature(kernel, dtype, constexprs, runtime_params=runtime_params,
                                                       unit_strides=_UNIT_STRIDES, not_divisible=_NOT_DIVISIBLE)
    return compile_kernel(kernel, signature, all_constexprs, attrs, tiles, arch=arch, dtype=dtype, head_dim=head_dim,
                          inspect_sass=inspect_sass)


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
