"""Code generation: a traced mask_mod / score_mod graph -> Triton source -> a loaded kernel.

``forward.KERNEL_TEMPLATE`` is specialized with

- the mask predicate (``mask_keep = ...``) emitted from the mask_mod's graph, or a lookup into
  per-block bitmasks (the fallback for mask_mods that cannot be traced), or nothing;
- the score computation (``logits = ...``) with the score_mod's graph inlined;
- one kernel argument per captured tensor: its pointer, then its sizes and strides, so new
  values (or new shapes) of the same dtype and rank reuse the compiled kernel.

Triton's JIT reads a kernel's source through ``inspect``, so the specialized source is written
to a module file in the cache directory (``$TRITON_ATTN_CACHE_DIR``, default
``~/.cache/triton_attn``), atomically, and imported from there. Files and the in-memory cache
are keyed by the graphs' structure hashes (``TracedMod.key``), never by the ``id()`` of the
Python callables, so the same mask_mod rebuilt in a loop is generated and compiled once.

The pieces: ``expressions`` (graph -> Triton expressions), this module (kernel specs, the
specialized source, ``kernel_for``), ``modules`` (files, import, compiled/interpreted kernels).
"""


from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from ...masks.tracing import TracedMod
from ..attention import forward
from .expressions import ARG_NAMES, CodegenError, Emitter  # noqa: F401  (re-exported)
from .modules import (GeneratedKernel, InterpretedKernel, KernelMemo, cache_dir,  # noqa: F401  (re-exported)
                      import_file, interpreter_scope, load_module, write_atomically)

CODEGEN_VERSION = 3
LOG2_E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------
# Kernel specs and source
# ---------------------------------------------------------------------------------------------

MASK_NONE = "none"        # every visited block is full: no predicate
MASK_TRACED = "traced"    # the mask_mod's graph, inlined
MASK_BITMASK = "bitmask"  # untraceable mask_mod: per-partial-block bitmasks (see fallback.py)


@dataclass(frozen=True)
class CapturedParam:
    """A captured tensor argument of a generated kernel: ``{prefix}{slot}`` and its rank.

    The launcher passes the pointer, then ``rank`` sizes, then ``rank`` strides.
    """

    name: str
    rank: int

    def arg_names(self) -> List[str]:
        return ([self.name] + [f"{self.name}_size{d}" for d in range(self.rank)]
                + [f"{self.name}_stride{d}" for d in range(self.rank)])


@dataclass(frozen=True)
class KernelSpec:
    """What a generated forward kernel is specialized on."""

    mask_mode: str
    mask: Optional[TracedMod] = None
    score: Optional[TracedMod] = None

    @property
    def key(self) -> str:
        parts = [f"v{forward.TEMPLATE_VERSION}.{CODEGEN_VERSION}", self.mask_mode,
                 self.mask.key if self.mask is not None and self.mask_mode == MASK_TRACED else "-",
                 self.score.key if self.score is not None else "-"]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def mask_lines(spec: KernelSpec) -> Tuple[List[str], List[CapturedParam]]:
    if spec.mask_mode == MASK_NONE:
        return ["mask_keep = True"], []
    if spec.mask_mode == MASK_BITMASK:
        lines = [
            "# Untraceable mask_mod: read this block's precomputed bits (see kernels/fallback.py).",
            "fallback_block = tl.load(fallback_offsets + layout_offset) + slot",
            "fallback_ptrs = (fallback_bits + fallback_block.to(tl.int64) * (Q_BLOCK_SIZE * KV_BLOCK_SIZE)",
            "                 + rows_in_block[:, None] * KV_BLOCK_SIZE + cols_in_block[None, :])",
            "mask_keep = tl.load(fallback_ptrs, mask=(rows_in_block[:, None] < Q_BLOCK_SIZE)"
            " & (cols_in_block[None, :] < KV_BLOCK_SIZE), other=0) != 0",
        ]
        return lines, [CapturedParam("fallback_bits", 0), CapturedParam("fallback_offsets", 0)]
    emitter = Emitter("mask_v", "mask_cap")
    result = emitter.value(spec.mask.graph)
    lines = list(emitter.lines) + [f"mask_keep = {result.text}"]
    params = [CapturedParam(f"mask_cap{i}", t.dim()) for i, t in enumerate(spec.mask.captured)]
    return lines, params


# Score lines without a score_mod: the raw Q K^T tile, scaled later (once, inside the exp2's FMA).
RAW_SCORE_LINES = ["scores = qk  # raw: the row max is taken before scaling"]


def score_unit_lines(score: Optional[TracedMod]) -> List[str]:
    """``# @@SCORE_UNITS@@`` (before the loops): the positive factors from ``scores`` to base-2 logits
    and to natural-log units -- ``scale * log2(e)`` and ``scale`` for raw scores, ``log2(e)`` and 1
    for a score_mod's output."""
    if score is None:
        return ["scores_to_log2 = scale_log2", "scores_to_natural = score_scale"]
    return [f"scores_to_log2 = {LOG2_E!r}", "scores_to_natural = 1.0"]


def score_value_lines(score: TracedMod, emitter: Emitter) -> List[str]:
    """Statements defining ``scores`` = score_mod(qk * scale, ...) (see ``score_unit_lines``)."""
    result = emitter.value(score.graph)
    final = emitter.as_float(result)
    if result.is_const:
        final = f"tl.full(qk.shape, {final}, tl.float32)"
    return (["score = qk * score_scale  # the score_mod sees scores in natural units"] + list(emitter.lines)
            + [f"scores = {final}"])


def score_lines(spec: KernelSpec) -> Tuple[List[str], List[CapturedParam]]:
    """``# @@SCORE@@`` lines of the forward kernel (they define ``scores``), and captured params."""
    if spec.score is None:
        return list(RAW_SCORE_LINES), []
    lines = score_value_lines(spec.score, Emitter("score_v", "score_cap", fast_tanh=True))
    params = [CapturedParam(f"score_cap{i}", t.dim()) for i, t in enumerate(spec.score.captured)]
    return lines, params


def check_graph(traced: TracedMod) -> None:
    """Raise ``CodegenError`` if ``traced`` cannot be emitted as Triton code."""
    Emitter("v", "cap").value(traced.graph)


def replace_marker(source: str, marker: str, lines: Sequence[str]) -> str:
    out = []
    for line in source.split("\n"):
        if line.strip() == f"# @@{marker}@@":
            indent = line[: len(line) - len(line.lstrip())]
            out.extend(indent + text for text in lines)
        else:
            out.append(line)
    return "\n".join(out)


@dataclass(frozen=True)
class GeneratedSource:
    kernel_name: str
    source: str
    captured: Tuple[CapturedParam, ...]


def generate_source(spec: KernelSpec) -> GeneratedSource:
    """The module source of the kernel for ``spec``; raises ``CodegenError``."""
    mask_source, mask_params = mask_lines(spec)
    score_source, score_params = score_lines(spec)
    captured = tuple(mask_params + score_params)
    kernel_name = f"attention_forward_{spec.key}"
    arg_lines = [", ".join(param.arg_names()) + "," for param in captured]
    body = forward.KERNEL_TEMPLATE.replace("@@KERNEL_NAME@@", kernel_name)
    body = replace_marker(body, "CAPTURED_ARGS", arg_lines)
    body = replace_marker(body, "MASK_PREDICATE", mask_source)
    body = replace_marker(body, "SCORE", score_source)
    body = replace_marker(body, "SCORE_UNITS", score_unit_lines(spec.score))
    mask_name = spec.mask.name if spec.mask is not None else spec.mask_mode
    score_name = spec.score.name if spec.score is not None else "none"
    header = (f'"""Generated by triton_attn.kernels.codegen; do not edit.\n\n'
              f"mask_mod: {mask_name!r} ({spec.mask_mode}); score_mod: {score_name!r}; key {spec.key}\n"
              f'"""\n\nimport triton\nimport triton.language as tl\n\n')
    return GeneratedSource(kernel_name, header + body.lstrip("\n"), captured)





_KERNELS = KernelMemo()


def kernel_for(spec: KernelSpec) -> GeneratedKernel:
    """The generated kernel for ``spec``, from memory, the cache directory, or freshly written."""
    def make() -> GeneratedKernel:
        generated = generate_source(spec)
        module, path = load_module(generated.kernel_name, generated.source)
        return GeneratedKernel(spec, generated.kernel_name, path, getattr(module, generated.kernel_name),
                               generated.captured)

    return _KERNELS.get(spec.key, make)


def generated_kernel_count() -> int:
    """How many distinct kernels this process has generated and loaded (for recompilation tests)."""
    return _KERNELS.generated
