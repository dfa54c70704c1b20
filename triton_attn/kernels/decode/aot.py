"""Ahead-of-time compiles of the decode kernels for any target of ``kernels.targets`` (no GPU needed).

``compile_decode`` builds ``decode_split_kernel`` for one config and one specialization (dtype, head
dims, GQA packing, paged or not, split or not, the mods' generated functions -- with the hardware tanh
where the launch would use it, ``host.fast_tanh`` --, 32- or 64-bit offsets as the shapes ask): the
launcher's own ``split_kernel_arguments`` on ``meta`` tensors gives the named arguments, and
``tuning.aot.compile_kernel`` derives the signature from them as the JIT would and reads registers
and spills from ptxas.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from ...masks.block_mask import BlockMask
from ...masks.tracing import trace_mask_mod, trace_score_mod
from ..attention.configs import KernelConfig
from ..host import fast_tanh
from ..jit import functions
from ..targets import get as get_target
from ..tuning.aot import AotResult, compile_kernel
from ..tuning.search import CompileStats
from .launch import DecodePlan, combine_kernel_arguments, plan_decode, split_kernel_arguments


def _block_mask(mask_mod: Optional[Callable], q_len: int, kv_len: int, block_size: Tuple[int, int]):
    from ...masks import create_block_mask
    from ...masks.standard import full_block_mask

    if mask_mod is None:
        return full_block_mask(1, 1, q_len, kv_len, "cpu", block_size)
    return create_block_mask(mask_mod, None, None, q_len, kv_len, BLOCK_SIZE=block_size)


def compile_decode(config: KernelConfig, *, arch: int, dtype: torch.dtype = torch.bfloat16, head_dim: int = 128,
                   head_dim_v: Optional[int] = None, q_heads: int = 32, kv_heads: int = 8, q_len: int = 1,
                   kv_len: int = 4096, paged: bool = False, page_size: int = 16, num_splits: int = 4,
                   block_size: Tuple[int, int] = (128, 128), mask_mod: Optional[Callable] = None,
                   score_mod: Optional[Callable] = None, batch: int = 1,
                   block_mask: Optional[BlockMask] = None) -> AotResult:
    """Compile the split kernel with ``config`` (fitted to the packed rows) for the target ``arch`` (80,
    "gfx942", a ``Target``).

    mask_mod (over ``q_len x kv_len``; None: no partial block) and score_mod pick the generated
    functions; with ``paged`` the K/V arguments are ``[num_pages, Hkv, page_size, D]`` pages (``kv_len``
    tokens per sequence, ``batch`` sequences). block_mask: the BlockMask to take the block lists from
    (meta tensors will do) instead of ``mask_mod``'s over ``q_len x kv_len``."""
    from .kernel import decode_split_kernel

    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    block_mask = block_mask if block_mask is not None else _block_mask(mask_mod, q_len, kv_len, block_size)
    target = get_target(arch)
    mask = trace_mask_mod(mask_mod) if mask_mod is not None else None
    score = trace_score_mod(score_mod) if score_mod is not None else None
    # As ``launch.decode_mods``: the hardware tanh for a score_mod compiled for NVIDIA with 16-bit inputs.
    mods = functions.mod_functions(mask, score,
                                   fast_tanh=score is not None and fast_tanh(dtype, interpret=False, target=target))
    meta = dict(device="meta")
    query = torch.empty(batch, q_heads, q_len, head_dim, dtype=dtype, **meta)
    if paged:
        pages = -(-kv_len // page_size)
        key = torch.empty(batch * pages, kv_heads, page_size, head_dim, dtype=dtype, **meta)
        value = torch.empty(batch * pages, kv_heads, page_size, head_dim_v, dtype=dtype, **meta)
        page_table = torch.empty(batch, pages, dtype=torch.int32, **meta)
        kv_lens = torch.empty(batch, dtype=torch.int32, **meta)
    else:
        key = torch.empty(batch, kv_heads, kv_len, head_dim, dtype=dtype, **meta)
        value = torch.empty(batch, kv_heads, kv_len, head_dim_v, dtype=dtype, **meta)
        page_table = kv_lens = None
    plan: DecodePlan = plan_decode(query, kv_heads, head_dim_v, block_mask, config=config, num_splits=num_splits,
                                   target=target)
    out = torch.empty(batch, q_heads, q_len, head_dim_v, dtype=dtype, **meta)
    lse = torch.empty(batch, q_heads, q_len, dtype=torch.float32, **meta)
    part_out = torch.empty(num_splits, batch, q_heads, q_len, head_dim_v, dtype=torch.float32, **meta)
    part_lse = torch.empty(num_splits, batch, q_heads, q_len, dtype=torch.float32, **meta)
    captured = [functions.captured_tuple(t.captured, torch.device("cpu")) if t is not None else ()
                for t in (mask, score)]
    arguments, constexprs = split_kernel_arguments(
        query, key, value, out, lse, part_out, part_lse, block_mask, plan, scale=head_dim ** -0.5,
        page_table=page_table, kv_lens=kv_lens, mask_captured=captured[0], score_captured=captured[1], mods=mods,
        interpret=False, target=target)
    label = (f"decode {plan.config.name} D={head_dim} {str(dtype).replace('torch.', '')} rows={plan.packed_rows} "
             f"splits={num_splits}{' paged' if paged else ''}")
    return compile_kernel(decode_split_kernel, arguments, constexprs, arch=target, num_warps=plan.config.num_warps,
                          num_stages=plan.config.num_stages, options=plan.config.amd_options, label=label)


def compile_combine(*, arch: int, dtype: torch.dtype = torch.bfloat16, head_dim_v: int = 128, q_heads: int = 32,
                    q_len: int = 1, num_splits: int = 16) -> AotResult:
    """Compile ``decode_combine_kernel`` (merging ``num_splits`` partial results) for the target
    ``arch`` (80, "gfx942", a ``Target``)."""
    from .kernel import decode_combine_kernel

    meta = dict(device="meta")
    out = torch.empty(1, q_heads, q_len, head_dim_v, dtype=dtype, **meta)
    lse = torch.empty(1, q_heads, q_len, dtype=torch.float32, **meta)
    part_out = torch.empty(num_splits, 1, q_heads, q_len, head_dim_v, dtype=torch.float32, **meta)
    part_lse = torch.empty(num_splits, 1, q_heads, q_len, dtype=torch.float32, **meta)
    target = get_target(arch)
    arguments, constexprs, num_warps = combine_kernel_arguments(part_out, part_lse, out, lse, target)
    return compile_kernel(decode_combine_kernel, arguments, constexprs, arch=target, num_warps=num_warps, num_stages=1,
                          label=f"decode combine splits={num_splits} Dv={head_dim_v}")


def decode_compile_fn(capability: int, **shape) -> Callable[[KernelConfig], CompileStats]:
    """A ``compile_fn`` for ``tuning.search.prune``: ``compile_decode(config, arch=capability, **shape)``
    reported as shared memory, registers and spilled bytes."""
    def compile_fn(config: KernelConfig) -> CompileStats:
        result = compile_decode(config, arch=capability, **shape)
        return CompileStats(shared=result.shared_bytes, registers=result.registers,
                            spills=result.spill_stores + result.spill_loads)

    return compile_fn
