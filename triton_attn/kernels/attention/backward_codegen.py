"""Code generation for the backward kernels: templates of ``backward.py`` -> one module -> kernels.

The dK/dV and dQ kernels of one (mask_mod, score_mod) pair are written into a single module file
in the cache directory and imported from there, exactly like the forward kernel (``codegen``):
same key scheme (graph structure hashes, never ``id()``), same emitted predicate and score
expressions, same ``GeneratedKernel`` objects (compiled with ``jit()`` or run with
``interpreted()``).

Backward-specific pieces generated here:

- the score lines also define ``dscore`` = d score_mod / d score (``derivative.py``), emitted
  through the *same* emitter as the score itself, so shared subexpressions are computed once;
- ``# @@SCORE_GRAD@@`` becomes ``ds = dz`` (no score_mod), ``ds = dz * c`` (constant derivative,
  e.g. ALiBi or a bias table: c = 1) or a masked product (where ``P == 0`` the derivative may be
  inf/NaN on masked or padded positions, and must not leak into the sums);
- the untraceable-mask fallback: the dQ kernel walks the forward layout and reads the forward's
  bitmask lines unchanged; the dK/dV kernel walks the transposed layout, so it finds each block's
  bits through ``fallback_block_ids`` (int32, shaped like ``q_indices``: the index into ``bits``
  of block (row = q_indices[..., slot], column)) and reads the slab transposed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import List, Optional, Tuple

from ...masks.tracing import TracedMod
from . import backward
from ..jit import functions as codegen
from ..jit import derivative
from ..jit.functions import CapturedParam, GeneratedKernel, KernelSpec

BACKWARD_CODEGEN_VERSION = 2
LOG2_E = codegen.LOG2_E

# Captured arguments of the dK/dV kernel in bitmask mode (the dQ kernel uses the forward's pair).
TRANSPOSED_FALLBACK_PARAMS = [CapturedParam("fallback_bits", 0), CapturedParam("fallback_block_ids", 0)]


def backward_key(spec: KernelSpec) -> str:
    """Cache key of the backward module for ``spec`` (forward spec key + backward versions)."""
    text = f"bwd{backward.TEMPLATE_VERSION}.{BACKWARD_CODEGEN_VERSION}|{spec.key}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


# ---------------------------------------------------------------------------------------------
# Source pieces
# ---------------------------------------------------------------------------------------------

def score_lines(score: Optional[TracedMod]) -> Tuple[List[str], List[str], List[CapturedParam]]:
    """(``# @@SCORE@@`` lines, ``# @@SCORE_GRAD@@`` lines, captured params) for the backward kernels.

    Raises ``derivative.NotDifferentiableError`` or ``codegen.CodegenError``.
    """
    if score is None:
        return list(codegen.RAW_SCORE_LINES), ["ds = dz"], []
    grad_graph = derivative.score_derivative(score.graph)
    emitter = codegen.Emitter("score_v", "score_cap", fast_tanh=True)
    # The forward's statements exactly (same emitter, same order): both passes round scores alike.
    lines = codegen.score_value_lines(score, emitter)
    if derivative.is_constant(grad_graph):
        constant = float(grad_graph.args[0])
        grad_lines = ["ds = dz"] if constant == 1.0 else [f"ds = dz * {constant!r}"]
    else:
        start = len(emitter.lines)
        grad_value = emitter.value(grad_graph)
        lines += list(emitter.lines[start:]) + [f"dscore = {emitter.as_float(grad_value)}"]
        # P == 0 (masked, padded, underflowed) means dZ == 0; the derivative there may be inf/NaN.
        grad_lines = ["ds = tl.where(probs > 0.0, dz * dscore, 0.0)"]
    params = [CapturedParam(f"score_cap{i}", t.dim()) for i, t in enumerate(score.captured)]
    return lines, grad_lines, params


def transposed_bitmask_lines() -> List[str]:
    """The predicate of the dK/dV kernel for an untraceable mask_mod: the block's bits, transposed."""
    return [
        "# Untraceable mask_mod: this block's precomputed bits (kernels/fallback.py), read transposed.",
        "fallback_block = tl.load(fallback_block_ids + index_offset + slot)",
        "fallback_ptrs = (fallback_bits + fallback_block.to(tl.int64) * (Q_BLOCK_SIZE * KV_BLOCK_SIZE)",
        "                 + rows_in_block[None, :] * KV_BLOCK_SIZE + cols_in_block[:, None])",
        "mask_keep = tl.load(fallback_ptrs, mask=(rows_in_block[None, :] < Q_BLOCK_SIZE)"
        " & (cols_in_block[:, None] < KV_BLOCK_SIZE), other=0) != 0",
    ]


def _specialize(template: str, kernel_name: str, captured: List[CapturedParam], mask: List[str],
                score: List[str], score_grad: List[str], score_units: List[str]) -> str:
    body = template.replace("@@KERNEL_NAME@@", kernel_name)
    body = codegen.replace_marker(body, "CAPTURED_ARGS", [", ".join(p.arg_names()) + "," for p in captured])
    body = codegen.replace_marker(body, "MASK_PREDICATE", mask)
    body = codegen.replace_marker(body, "SCORE", score)
    body = codegen.replace_marker(body, "SCORE_UNITS", score_units)
    body = codegen.replace_marker(body, "SCORE_GRAD", score_grad)
    return body.strip("\n") + "\n"


@dataclass(frozen=True)
class BackwardSource:
    """Module source holding both backward kernels, with their names and captured parameters."""

    source: str
    dkdv_name: str
    dq_name: str
    dkdv_captured: Tuple[CapturedParam, ...]
    dq_captured: Tuple[CapturedParam, ...]


def generate_backward_source(spec: KernelSpec) -> BackwardSource:
    """The module source of the dK/dV and dQ kernels for ``spec`` (the forward's spec)."""
    key = backward_key(spec)
    forward_mask_lines, mask_params = codegen.mask_lines(spec)
    if spec.mask_mode == codegen.MASK_BITMASK:
        dkdv_mask_lines, dkdv_mask_params = transposed_bitmask_lines(), list(TRANSPOSED_FALLBACK_PARAMS)
    else:
        dkdv_mask_lines, dkdv_mask_params = forward_mask_lines, mask_params
    score, score_grad, score_params = score_lines(spec.score)
    score_units = codegen.score_unit_lines(spec.score)
    dkdv_captured = tuple(dkdv_mask_params + score_params)
    dq_captured = tuple(mask_params + score_params)
    dkdv_name, dq_name = f"attention_backward_dkdv_{key}", f"attention_backward_dq_{key}"
    mask_name = spec.mask.name if spec.mask is not None else spec.mask_mode
    score_name = spec.score.name if spec.score is not None else "none"
    header = (f'"""Generated by triton_attn.kernels.backward_codegen; do not edit.\n\n'
              f"mask_mod: {mask_name!r} ({spec.mask_mode}); score_mod: {score_name!r}; key {key}\n"
              f'"""\n\nimport triton\nimport triton.language as tl\n\n\n')
    source = (header
              + _specialize(backward.DKDV_TEMPLATE, dkdv_name, list(dkdv_captured), dkdv_mask_lines, score, score_grad,
                          score_units)
              + "\n\n"
              + _specialize(backward.DQ_TEMPLATE, dq_name, list(dq_captured), forward_mask_lines, score, score_grad,
                          score_units))
    return BackwardSource(source, dkdv_name, dq_name, dkdv_captured, dq_captured)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

@dataclass
class BackwardKernels:
    """The two generated kernels of one spec (each a ``codegen.GeneratedKernel``)."""

    spec: KernelSpec
    dkdv: GeneratedKernel
    dq: GeneratedKernel


_KERNELS = codegen.KernelMemo()


def backward_kernels_for(spec: KernelSpec) -> BackwardKernels:
    """The backward kernels for ``spec``, from memory, the cache directory, or freshly written."""
    key = backward_key(spec)

    def make() -> BackwardKernels:
        generated = generate_backward_source(spec)
        module, path = codegen.load_module(f"attention_backward_{key}", generated.source)
        return BackwardKernels(
            spec,
            GeneratedKernel(spec, generated.dkdv_name, path, getattr(module, generated.dkdv_name),
                            generated.dkdv_captured),
            GeneratedKernel(spec, generated.dq_name, path, getattr(module, generated.dq_name), generated.dq_captured))

    return _KERNELS.get(key, make)
