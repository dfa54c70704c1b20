"""Ahead-of-time builds of the attention kernels for any target of ``kernels.targets``, without a GPU.

``arch`` names the target everywhere: 80, 90, "sm_120", "gfx942" or a ``Target``; the build uses
that target's dot precision, compile options and (for ``aot_compile_fn``) tables.

Each build takes its arguments from the launcher's own argument builders
(``forward_launch.forward_arguments``, ``backward_launch.dkdv_arguments`` / ``dq_arguments`` /
``preprocess_arguments``) applied to example tensors on the ``meta`` device, so a kernel's
signature is described once; ``tuning.aot.compile_kernel`` turns the named arguments into the
``ASTSource`` signature the way the JIT specializes a launch. Example shapes: batch 2, 8 query
heads on 2 KV heads (GQA 4), contiguous tensors -- so strides divide by 16, unit strides are
constants, and head counts and lengths stay runtime values, as in a real launch. The launch-time
decisions (64-bit row and layout offsets, the folded batch-head grid) are the launcher's own,
made from the example tensors.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

from ...dropout import Dropout
from ...masks.tracing import TracedMod
from ..host import fast_tanh, layout_arguments, needs_64bit_layout, needs_64bit_rows, trace_score
from ..jit import functions
from ..targets import get as get_target
from ..tuning.aot import AotResult, compile_kernel
from ..tuning.search import CompileStats
from . import fallback
from .backward_launch import (
    DKDV_LAYOUT,
    DQ_LAYOUT,
    BackwardConfig,
    backward_pair,
    dkdv_arguments,
    dkdv_constexprs,
    dq_arguments,
    dq_constexprs,
    function_constexprs,
    preprocess_arguments,
    preprocess_constexprs,
)
from .configs import KernelConfig, cdiv, default_backward_config
from .forward_launch import FORWARD_LAYOUT, forward_arguments
from .tiling import kernel_constexprs

META = torch.device("meta")
EXAMPLE_BATCH, EXAMPLE_Q_HEADS, EXAMPLE_KV_HEADS = 2, 8, 2


def _empty(*shape, dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device=META)


def _example_layout(rows: int, columns: int, names, row: str, heads: int, per_head: bool) -> Dict[str, object]:
    """A block layout of ``rows`` x ``columns`` blocks, as a BlockMask has: broadcast (``[1, 1, ...]``), or
    (``per_head``) one per (example batch, query head) -- ``heads`` of them -- as a mask built with B and H."""
    batch, heads = (EXAMPLE_BATCH, heads) if per_head else (1, 1)
    counts = _empty(batch, heads, rows, dtype=torch.int32)
    indices = _empty(batch, heads, rows, columns, dtype=torch.int32)
    return layout_arguments(counts, indices, counts, indices, META, names, row)


def _mask_captured(mask_mode: str, mask: Optional[TracedMod], block_size: Tuple[int, int], q_len: int,
                   kv_len: int) -> tuple:
    if mask_mode == functions.MASK_TRACED:
        return functions.captured_tuple(mask.captured, META)
    if mask_mode == functions.MASK_BITMASK:
        rows, columns = cdiv(q_len, block_size[0]), cdiv(kv_len, block_size[1])
        return fallback.example_bitmask_captured(rows, columns, block_size, META)
    return ()


def _score_captured(score: Optional[TracedMod]) -> tuple:
    return functions.captured_tuple(score.captured, META) if score is not None else ()


def _mode(mask: Optional[TracedMod], mask_mode: Optional[str]) -> str:
    return mask_mode or (functions.MASK_TRACED if mask is not None else functions.MASK_NONE)


def _example_dropout(dropout: bool) -> Optional[Dropout]:
    """An example ``Dropout`` (its seed on the meta device) for a build with dropout, else None."""
    return Dropout(0.1, _empty(1, dtype=torch.int64)) if dropout else None


def _constants(arguments: Dict[str, object]) -> Dict[str, object]:
    """The arguments a launch passes as None (dropout's without dropout): Triton's JIT makes them
    constants, so the build takes them as constexprs too."""
    return {name: value for name, value in arguments.items() if value is None}


def _example_inputs(q_len: int, kv_len: int, head_dim: int, head_dim_v: int, dtype: torch.dtype,
                    transposed: bool) -> Tuple[torch.Tensor, ...]:
    """Example query, key, value [B, H, L, D] on the meta device: contiguous, or (``transposed``) views of
    [B, L, H, D] storage, as transformers passes them."""
    def make(heads: int, length: int, dim: int) -> torch.Tensor:
        if transposed:
            return _empty(EXAMPLE_BATCH, length, heads, dim, dtype=dtype).transpose(1, 2)
        return _empty(EXAMPLE_BATCH, heads, length, dim, dtype=dtype)

    return (make(EXAMPLE_Q_HEADS, q_len, head_dim), make(EXAMPLE_KV_HEADS, kv_len, head_dim),
            make(EXAMPLE_KV_HEADS, kv_len, head_dim_v))


def compile_forward(config: KernelConfig, *, arch: int, mask: Optional[TracedMod] = None,
                    score: Optional[TracedMod] = None, mask_mode: Optional[str] = None,
                    dtype: torch.dtype = torch.bfloat16, head_dim: int = 128, head_dim_v: Optional[int] = None,
                    block_size: Tuple[int, int] = (128, 128), q_len: int = 4096, kv_len: int = 4096,
                    inspect_sass: bool = False, transposed: bool = False, per_head_layout: bool = False,
                    dropout: bool = False) -> AotResult:
    """Compile the forward kernel for ``mask``/``score`` (traced mods) with ``config`` for the target ``arch``.

    ``mask_mode``: ``functions.MASK_*`` (default: traced when ``mask`` is given, else none).
    ``transposed``: inputs are [B, L, H, D] views, as from transformers. ``per_head_layout``: a block
    layout per (batch, head) instead of a broadcast one. ``dropout``: the variant with attention dropout.
    The build is the one a training launch makes (softmax statistics stored), with the launch's own 64-bit
    and grid decisions.
    """
    from .forward import attention_forward_kernel

    mode = _mode(mask, mask_mode)
    target = get_target(arch)
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    mods = functions.mod_functions(mask if mode == functions.MASK_TRACED else None, score, mask_mode=mode,
                                   fast_tanh=fast_tanh(dtype, interpret=False, target=target))
    query, key, value = _example_inputs(q_len, kv_len, head_dim, head_dim_v, dtype, transposed)
    out = _empty(EXAMPLE_BATCH, EXAMPLE_Q_HEADS, q_len, head_dim_v, dtype=dtype)
    lse = _empty(EXAMPLE_BATCH, EXAMPLE_Q_HEADS, q_len, dtype=torch.float32)
    stats = _empty(EXAMPLE_BATCH, EXAMPLE_Q_HEADS, q_len, 2, dtype=torch.float32)
    layout = _example_layout(cdiv(q_len, block_size[0]), cdiv(kv_len, block_size[1]), FORWARD_LAYOUT, "m",
                             EXAMPLE_Q_HEADS, per_head_layout)
    arguments = forward_arguments(query, key, value, out, lse, layout, scale=0.125,
                                  mask_captured=_mask_captured(mode, mask, block_size, q_len, kv_len),
                                  score_captured=_score_captured(score), stats=stats,
                                  dropout=_example_dropout(dropout))
    constexprs = dict(MASK_FN=mods.mask_fn, SCORE_FN=mods.score_fn, STORE_STATS=True, DROPOUT=dropout,
                      **_constants(arguments),
                      **kernel_constexprs(head_dim=head_dim, head_dim_v=head_dim_v, dtype=dtype,
                                          block_size=block_size, config=config, kv_len=kv_len, interpret=False,
                                          row_offsets_64=needs_64bit_rows(query, key, value, out),
                                          layout_offsets_64=needs_64bit_layout(layout),
                                          batch_heads=EXAMPLE_BATCH * EXAMPLE_Q_HEADS, target=target))
    return compile_kernel(attention_forward_kernel, arguments, constexprs, arch=target, num_warps=config.num_warps,
                          num_stages=config.num_stages, inspect_sass=inspect_sass, options=config.amd_options,
                          label=f"forward {mods.name}{' dropout' if dropout else ''} {config.name} D={head_dim} "
                                f"{dtype}")


def compile_backward(config: BackwardConfig, *, arch: int, mask: Optional[TracedMod] = None,
                     score: Optional[TracedMod] = None, mask_mode: Optional[str] = None,
                     dtype: torch.dtype = torch.bfloat16, head_dim: int = 128, head_dim_v: Optional[int] = None,
                     block_size: Tuple[int, int] = (128, 128), q_len: int = 4096, kv_len: int = 4096,
                     inspect_sass: bool = False, transposed: bool = False, per_head_layout: bool = False,
                     only: Optional[str] = None, dropout: bool = False) -> Dict[str, AotResult]:
    """Compile the dK/dV and dQ kernels with ``config`` for the target ``arch``: ``{"dkdv": ..., "dq": ...}``, or
    ``{"dv": ..., "dk": ..., "dq": ...}`` for a config with ``split_dkdv``; ``only="dkdv"`` or ``"dq"``: that
    kernel's builds alone.

    ``config`` is fitted to ``block_size`` and the lengths first, exactly as a launch would;
    ``transposed``: [B, L, H, D] input views (the gradients are contiguous, as the launcher makes them);
    ``per_head_layout``: block layouts per (batch, query head), as ``compile_forward``; ``dropout``: the
    variants with attention dropout.
    """
    from .backward import attention_backward_dkdv_kernel, attention_backward_dq_kernel

    mode = _mode(mask, mask_mode)
    target = get_target(arch)
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    config = config.fitted(block_size[0], block_size[1], q_len, kv_len)
    mods = functions.mod_functions(mask if mode == functions.MASK_TRACED else None, score, mask_mode=mode,
                                   derivative=True, fast_tanh=fast_tanh(dtype, interpret=False, target=target))
    query, key, value = _example_inputs(q_len, kv_len, head_dim, head_dim_v, dtype, transposed)
    grad_out = _empty(EXAMPLE_BATCH, EXAMPLE_Q_HEADS, q_len, head_dim_v, dtype=dtype)
    grad_query, grad_key, grad_value = (_empty(*t.shape, dtype=dtype) for t in (query, key, value))
    stats = _empty(EXAMPLE_BATCH, EXAMPLE_Q_HEADS, q_len, 2, dtype=torch.float32)
    delta = _empty(EXAMPLE_BATCH, EXAMPLE_Q_HEADS, q_len, dtype=torch.float32)
    captured = dict(scale=0.125, mask_captured=_mask_captured(mode, mask, block_size, q_len, kv_len),
                    score_captured=_score_captured(score), dropout=_example_dropout(dropout))
    rows, columns = cdiv(q_len, block_size[0]), cdiv(kv_len, block_size[1])
    shapes = dict(head_dim=head_dim, head_dim_v=head_dim_v, dtype=dtype, block_size=block_size, q_len=q_len,
                  kv_len=kv_len, interpret=False, target=target,
                  row_offsets_64=needs_64bit_rows(query, key, value, grad_out, grad_query, grad_key, grad_value))
    label = f"{mods.name}{' dropout' if dropout else ''} D={head_dim} {dtype}"
    results = {}
    dkdv_layout = _example_layout(columns, rows, DKDV_LAYOUT, "n", EXAMPLE_Q_HEADS, per_head_layout)
    for part in config.dkdv_parts if only in (None, "dkdv") else ():
        arguments = dkdv_arguments(query, key, value, grad_out, stats, delta, grad_key, grad_value, dkdv_layout,
                                   **captured)
        results[part] = compile_kernel(
            attention_backward_dkdv_kernel, arguments,
            {**function_constexprs(mods), **_constants(arguments),
             **dkdv_constexprs(tiles=config.dkdv, part=part, batch_heads=EXAMPLE_BATCH * EXAMPLE_KV_HEADS,
                               layout_offsets_64=needs_64bit_layout(dkdv_layout), dropout=dropout, **shapes)},
            arch=target, num_warps=config.dkdv.num_warps, num_stages=config.dkdv.num_stages, inspect_sass=inspect_sass,
            options=config.dkdv.amd_options, label=f"{part} {config.dkdv.name} {label}")
    if only == "dkdv":
        return results
    dq_layout = _example_layout(rows, columns, DQ_LAYOUT, "m", EXAMPLE_Q_HEADS, per_head_layout)
    arguments = dq_arguments(query, key, value, grad_out, stats, delta, grad_query, dq_layout, **captured)
    dq = compile_kernel(
        attention_backward_dq_kernel, arguments,
        {**function_constexprs(mods), **_constants(arguments),
         **dq_constexprs(tiles=config.dq, batch_heads=EXAMPLE_BATCH * EXAMPLE_Q_HEADS,
                         layout_offsets_64=needs_64bit_layout(dq_layout), dropout=dropout, **shapes)},
        arch=target, num_warps=config.dq.num_warps, num_stages=config.dq.num_stages, inspect_sass=inspect_sass,
        options=config.dq.amd_options, label=f"dq {config.dq.name} {label}")
    results["dq"] = dq
    return results


def compile_preprocess(*, arch: int, dtype: torch.dtype = torch.bfloat16, head_dim_v: int = 128,
                       q_len: int = 4096, transposed: bool = False) -> AotResult:
    """The delta preprocessing kernel for the target ``arch`` (it has no config to vary; the target's warps).

    ``transposed``: the incoming gradient is a [B, L, H, Dv] view, as through transformers (the output is
    contiguous, as the forward makes it); with the launch's own 64-bit row decision."""
    from .backward import attention_backward_preprocess

    out = _empty(EXAMPLE_BATCH, EXAMPLE_Q_HEADS, q_len, head_dim_v, dtype=dtype)
    grad_out = out
    if transposed:
        grad_out = _empty(EXAMPLE_BATCH, q_len, EXAMPLE_Q_HEADS, head_dim_v, dtype=dtype).transpose(1, 2)
    grad_lse = delta = _empty(EXAMPLE_BATCH, EXAMPLE_Q_HEADS, q_len, dtype=torch.float32)
    constexprs = preprocess_constexprs(out, grad_out, has_grad_lse=True)
    target = get_target(arch)
    return compile_kernel(attention_backward_preprocess, preprocess_arguments(out, grad_out, grad_lse, delta),
                          constexprs, arch=target, num_warps=target.tables.preprocess_warps, num_stages=None,
                          label=f"preprocess Dv={head_dim_v} {dtype}")


def compile_dropout_mask(*, arch: int, q_len: int = 4096, kv_len: int = 4096) -> AotResult:
    """The dropout keep-mask kernel (``dropout_mask``) for the target ``arch``, on the example batch and
    query heads."""
    from .dropout_mask import MASK_WARPS, dropout_mask_kernel, mask_arguments, mask_constexprs

    keep = _empty(EXAMPLE_BATCH, EXAMPLE_Q_HEADS, q_len, kv_len, dtype=torch.uint8)
    return compile_kernel(dropout_mask_kernel, mask_arguments(keep, _example_dropout(True)),
                          mask_constexprs(EXAMPLE_BATCH * EXAMPLE_Q_HEADS), arch=get_target(arch),
                          num_warps=MASK_WARPS, num_stages=None, label="dropout mask")


def aot_compile_fn(capability: int, *, head_dim: int = 64, value_dim: Optional[int] = None, dtype=torch.float16,
                   block_size: Tuple[int, int] = (128, 128), kernel: str = "fwd", mask_mod=None, score_mod=None,
                   kv_len: int = 4096) -> Callable[[KernelConfig], CompileStats]:
    """A ``compile_fn`` for ``tuning.search.prune``: compiles the kernels specialized on
    ``mask_mod``/``score_mod`` for the target ``capability`` (90, "gfx942", a ``Target``) with one candidate config
    (``kernel="bwd"``: both backward kernels, see ``backward_launch.backward_pair``) and reports shared
    memory, registers and spill bytes (for the backward pair: the larger shared memory and register
    count and the sum of the spills). Works without a GPU; raises ImportError without Triton."""
    import triton.compiler  # noqa: F401  (raises ImportError here, not per candidate, without Triton)

    from ...masks.tracing import UntraceableModError, trace_mask_mod

    if kernel not in ("fwd", "bwd"):
        raise ValueError(f"ahead-of-time compilation covers the fwd and bwd kernels, got kernel={kernel!r}")
    value_dim = head_dim if value_dim is None else value_dim
    block_size = tuple(block_size)
    mask, mode = None, functions.MASK_NONE
    if mask_mod is not None:
        try:
            mask = trace_mask_mod(mask_mod)
            functions.check_graph(mask)
            mode = functions.MASK_TRACED
        except (UntraceableModError, functions.CodegenError):
            mask, mode = None, functions.MASK_BITMASK
    score = trace_score(score_mod)
    shapes = dict(arch=capability, mask=mask, score=score, mask_mode=mode, dtype=dtype, head_dim=head_dim,
                  head_dim_v=value_dim, block_size=block_size, kv_len=kv_len)
    # The backward candidates run split into dV and dK kernels where the default config does.
    split_dkdv = kernel == "bwd" and default_backward_config(head_dim, value_dim, dtype, block_size, kv_len, kv_len,
                                                             target=get_target(capability)).split_dkdv
    memo: Dict[KernelConfig, CompileStats] = {}

    def compile_fn(config: KernelConfig) -> CompileStats:
        if config not in memo:
            if kernel == "fwd":
                results = [compile_forward(config, **shapes)]
            else:
                results = list(compile_backward(backward_pair(config, split_dkdv), **shapes).values())
            memo[config] = CompileStats(shared=max(r.shared_bytes for r in results),
                                        registers=max(r.registers for r in results),
                                        spills=sum(r.spill_stores + r.spill_loads for r in results))
        return memo[config]

    return compile_fn
