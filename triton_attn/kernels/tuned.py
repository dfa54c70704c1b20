"""The tuned configs of the kernels: cache lookups, and searches when autotuning asks.

Above the launchers and the AOT builds (searching runs the one and, on a GPU, prunes with the
other), below ``entry``. Per kernel family:

- ``tuned_forward_config``: the prefill forward (tuning key ``fwd``; candidates pruned by AOT compiles).
- ``tuned_backward_config``: the dK/dV and dQ tiles (keys ``bwd_dkdv`` / ``bwd_dq``), searched apart.
- ``tuned_decode_config``: the decode and paged kernels (key ``decode``, per split count;
  ``decode_key``, ``decode_candidates``).

The ``*_chooser`` functions bind one call's inputs into the ``choose_config`` callable its launcher
takes (the launcher knows the default config, the mods' structure class and the split count only
once it has planned the launch).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

import torch

from ..masks.block_mask import BlockMask
from .attention import backward_launch, forward_launch
from .attention.backward_launch import DKDV_PARTS, BackwardChooser, BackwardConfig, transposed_tiles
from .attention.configs import KernelConfig
from .attention.forward_launch import ForwardChooser
from .decode import launch as decode_launch
from .decode.configs import fit_decode
from .decode.launch import DecodeChooser
from .tuning import search as tuning

# ---------------------------------------------------------------------------------------------
# Prefill forward
# ---------------------------------------------------------------------------------------------

def tuned_forward_config(query, key, value, block_mask: BlockMask, score_mod, scale: float, default: KernelConfig,
                         autotune: Optional[bool], structure: str, stats: Optional[torch.Tensor]) -> KernelConfig:
    """The cached winner for this call's tuning key, or ``default``; searches only when asked.

    A search prunes by compiling each candidate once for this GPU (``attention.aot.aot_compile_fn``:
    configs that spill or do not fit in shared memory are skipped) and times the kernel launch alone
    (``forward_launch.prepare_forward``): no tracing, layout or allocation inside the timed region."""
    tuning_key = tuning.make_key(query, key, value, block_mask, variant="score" if score_mod is not None else "",
                                 structure=structure)
    head_dim, head_dim_v = query.shape[-1], value.shape[-1]

    def target():  # only when a search runs: the hot path does not resolve the target
        return tuning.call_target(tuning_key, query.device)

    def compile_fn(candidate: KernelConfig):
        from .attention.aot import aot_compile_fn

        return aot_compile_fn(target(), head_dim=head_dim, value_dim=head_dim_v, dtype=query.dtype,
                              block_size=block_mask.BLOCK_SIZE, kernel="fwd", mask_mod=block_mask.mask_mod,
                              score_mod=score_mod, kv_len=key.shape[2])(candidate)

    return tuning.select_config(
        tuning_key, default, autotune=autotune, device=query.device,
        candidates=lambda: tuning.search_space("fwd", target(), head_dim=head_dim, value_dim=head_dim_v,
                                               dtype=query.dtype, block_size=block_mask.BLOCK_SIZE,
                                               q_len=query.shape[2]),
        compile_fn=compile_fn,
        run=lambda candidate: forward_launch.prepare_forward(query, key, value, block_mask, score_mod=score_mod,
                                                             scale=scale, interpret=False, config=candidate,
                                                             stats=stats)[0])


def forward_key(query, key, value, block_mask: BlockMask, *, score_mod, scale: float) -> tuning.TuningKey:
    """The tuning key a compiled prefill forward of this call looks up (``tuned_forward_config``'s): what
    ``triton-attn tune`` stores its winner under."""
    structure = forward_launch.forward_mods(query, block_mask, score_mod=score_mod, scale=scale,
                                            interpret=False)[2].key[:8]
    return tuning.make_key(query, key, value, block_mask, variant="score" if score_mod is not None else "",
                           structure=structure)


def forward_chooser(query, key, value, block_mask: BlockMask, *, score_mod, scale: float,
                    autotune: Optional[bool], stats: Optional[torch.Tensor]) -> ForwardChooser:
    """``choose_config(default, structure)`` for ``forward_launch.attention_forward``: ``tuned_forward_config``."""
    def choose(default: KernelConfig, structure: str) -> KernelConfig:
        return tuned_forward_config(query, key, value, block_mask, score_mod, scale, default, autotune,
                                    structure=structure, stats=stats)
    return choose


# ---------------------------------------------------------------------------------------------
# Prefill backward
# ---------------------------------------------------------------------------------------------

def _kernel_launch(prepared, name: str):
    """The launch of one backward kernel from what ``run`` returned (a dict of launches), or None: the
    autotuner then times the whole ``run`` call. "dkdv" is both launches of a split dK/dV kernel."""
    if not isinstance(prepared, dict):
        return None
    launches = [prepared[part] for part in (DKDV_PARTS if name == "dkdv" else (name,)) if part in prepared]
    if len(launches) <= 1:
        return launches[0] if launches else None
    return lambda: [launch() for launch in launches]


def tuned_backward_config(query, key, value, block_mask: BlockMask, score_mod, default: BackwardConfig,
                          autotune: Optional[bool], run: Callable[[BackwardConfig], object],
                          structure: str = "") -> BackwardConfig:
    """The tuned dK/dV and dQ tiles for this call (tuning keys ``bwd_dkdv`` / ``bwd_dq``), each falling back
    to ``default``'s; with tuning on and nothing cached, searches the two kernels independently.

    ``run(pair)`` prepares the backward with a ``BackwardConfig`` and returns its launches by kernel name
    (``prepare_backward``): each candidate is timed on its own kernel's launch alone (a split dK/dV
    kernel: its two launches), with the other kernel's tiles held at the default. (A ``run`` that
    returns nothing is timed as a whole.) Whether dK/dV is split is ``default``'s choice; its tiles are
    tuned (and cached, under a key marked "split") for that choice."""
    variant = "score" if score_mod is not None else ""
    split = "+".join(part for part in (variant, "split") if part)
    tuner = tuning.autotuner()
    keys = {name: tuning.make_key(query, key, value, block_mask, kernel=f"bwd_{name}",
                                  variant=split if name == "dkdv" and default.split_dkdv else variant,
                                  structure=structure) for name in ("dkdv", "dq")}
    tuned = {name: tuner.lookup(tuning_key) for name, tuning_key in keys.items()}
    if any(found is None for found in tuned.values()) and tuning.autotune_requested(autotune):
        space = tuning.search_space("bwd", tuning.call_target(keys["dkdv"], query.device), head_dim=query.shape[-1],
                                    value_dim=value.shape[-1], dtype=query.dtype, block_size=block_mask.BLOCK_SIZE,
                                    q_len=query.shape[2])
        pairs = {"dkdv": lambda tiles: replace(default, dkdv=tiles), "dq": lambda tiles: replace(default, dq=tiles)}
        spaces = {"dkdv": space, "dq": [transposed_tiles(config) for config in space]}
        for name in ("dkdv", "dq"):
            if tuned[name] is None:
                tuned[name] = tuner.tune(keys[name], spaces[name],
                                         lambda tiles, name=name: _kernel_launch(run(pairs[name](tiles)), name),
                                         device=query.device).best
    if tuned["dkdv"] is None and tuned["dq"] is None:
        return default
    return replace(default, dkdv=tuned["dkdv"] or default.dkdv, dq=tuned["dq"] or default.dq)


def backward_chooser(query, key, value, out, lse, grad_out, grad_lse, block_mask: BlockMask, *, score_mod,
                     scale: float, autotune: Optional[bool], softmax_stats: Optional[torch.Tensor]) -> BackwardChooser:
    """``choose_config(default, structure)`` for ``backward_launch.attention_backward``: ``tuned_backward_config``,
    timing candidates with this call's tensors (after the delta preprocessing, which both kernels read)."""
    def run(candidate: BackwardConfig):
        launches, _ = backward_launch.prepare_backward(query, key, value, out, lse, grad_out, grad_lse, block_mask,
                                                       score_mod=score_mod, scale=scale, interpret=False,
                                                       config=candidate, softmax_stats=softmax_stats)
        if "preprocess" in launches:
            launches["preprocess"]()  # delta, which both timed kernels read
        return launches

    def choose(default: BackwardConfig, structure: str) -> BackwardConfig:
        return tuned_backward_config(query, key, value, block_mask, score_mod, default, autotune, run=run,
                                     structure=structure)
    return choose


# ---------------------------------------------------------------------------------------------
# Decode and paged
# ---------------------------------------------------------------------------------------------

def decode_candidates(capability, query: torch.Tensor, head_dim_v: int, block_mask: BlockMask, *,
                      groups: int) -> list:
    """The decode search space (``tuning.search_space("decode")``) fitted to this call's packed rows, deduplicated."""
    q_bs, kv_bs = block_mask.BLOCK_SIZE
    rows = min(q_bs, query.shape[2]) * (groups if block_mask.shape[1] == 1 else 1)
    space = tuning.search_space("decode", capability, head_dim=query.shape[-1], value_dim=head_dim_v,
                                dtype=query.dtype, block_size=block_mask.BLOCK_SIZE, q_len=None)
    return list(dict.fromkeys(fit_decode(config, rows, kv_bs) for config in space))


def decode_key(query: torch.Tensor, kv_heads: int, kv_len: int, head_dim_v: int, block_mask: BlockMask,
               num_splits: int, *, paged: bool, score: bool, structure: str = "") -> tuning.TuningKey:
    """The tuning key of a decode launch: device, dtype, head dims, GQA ratio, Lq and cache-length
    buckets, the mask's sparsity class, B * Hq, block size, bounds checks, the mods' structure class
    (``ModFunctions.key``), and (as the variant) the split count, paging and score_mod."""
    name, capability = tuning.device_identity(query.device)
    q_bs, kv_bs = block_mask.BLOCK_SIZE
    variant = ".".join([f"splits{num_splits}"] + (["paged"] if paged else []) + (["score"] if score else []))
    return tuning.TuningKey(kernel="decode", device=name, capability=capability,
                            dtype=str(query.dtype).replace("torch.", ""), head_dim=int(query.shape[-1]),
                            value_dim=int(head_dim_v), gqa=int(query.shape[1]) // kv_heads,
                            q_bucket=tuning.seq_bucket(query.shape[2]), kv_bucket=tuning.seq_bucket(kv_len),
                            sparsity=tuning.block_mask_sparsity_class(block_mask), variant=variant,
                            occupancy=tuning.occupancy_bucket(query.shape[0] * query.shape[1]),
                            block=f"{q_bs}x{kv_bs}", ragged=paged or bool(kv_len % kv_bs), structure=structure)


def tuned_decode_config(query, key, value, block_mask: BlockMask, *, score_mod, scale: float,
                        page_table: Optional[torch.Tensor], kv_lens: Optional[torch.Tensor], default: KernelConfig,
                        num_splits: int, structure: str, autotune: Optional[bool]) -> KernelConfig:
    """The cached winner for a decode launch with ``num_splits`` splits (``decode_key``), or ``default``;
    with tuning on and nothing cached, times ``decode_candidates`` on this call's tensors (no AOT pruning).
    K/V as ``decode.launch.run_decode`` takes them (pages with ``page_table``)."""
    paged = page_table is not None
    kv_heads, head_dim_v = key.shape[1], value.shape[3]
    kv_len = page_table.shape[1] * key.shape[2] if paged else key.shape[2]
    tuning_key = decode_key(query, kv_heads, kv_len, head_dim_v, block_mask, num_splits, paged=paged,
                            score=score_mod is not None, structure=structure)
    return tuning.select_config(
        tuning_key, default, autotune=autotune, device=query.device,
        candidates=lambda: decode_candidates(tuning.call_target(tuning_key, query.device), query, head_dim_v,
                                             block_mask,
                                             groups=query.shape[1] // kv_heads),
        run=lambda candidate: decode_launch.run_decode(query, key, value, block_mask, score_mod=score_mod,
                                                       scale=scale, interpret=False, page_table=page_table,
                                                       kv_lens=kv_lens, config=candidate, num_splits=num_splits))


def decode_chooser(query, key, value, block_mask: BlockMask, *, score_mod, scale: float,
                   page_table: Optional[torch.Tensor] = None, kv_lens: Optional[torch.Tensor] = None,
                   autotune: Optional[bool]) -> DecodeChooser:
    """``choose_config(default, num_splits, structure)`` for ``decode.launch.run_decode``: ``tuned_decode_config``."""
    def choose(default: KernelConfig, num_splits: int, structure: str) -> KernelConfig:
        return tuned_decode_config(query, key, value, block_mask, score_mod=score_mod, scale=scale,
                                   page_table=page_table, kv_lens=kv_lens, default=default, num_splits=num_splits,
                                   structure=structure, autotune=autotune)
    return choose
