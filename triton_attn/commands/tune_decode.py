"""``triton-attn tune --kind decode``: tune the split-KV decode kernel (``kernels/decode/``).

Each shape is a decode step: ``--q-len`` query rows (default 1) at the end of a cache of ``--seq-len``
tokens (``kv_len`` in a --config file), with the library mask moved to the query's position. The
candidates are the decode search space fitted to the packed rows (GQA group x query rows); the split
count is what the launcher would choose on this GPU and is part of the tuning key, so the winner is
found again by ``attention()`` / ``paged_attention()`` for the same shape class.
"""

from __future__ import annotations

import math
from typing import List

from .common import DTYPES, Progress, library_mask


def _decode_problem(shape, q_len: int, device):
    """(q, k, v, block_mask, mask_mod, score_mod) of one decode step of ``shape``."""
    import torch

    from ..masks import create_block_mask
    from ..masks.standard import full_block_mask

    dtype = getattr(torch, DTYPES[str(shape.dtype).lower().replace("torch.", "")])  # validated by tune_shapes
    kv_len = shape.kv_len or shape.seq_len
    kv_heads = shape.kv_heads or shape.heads
    generator = torch.Generator(device=device).manual_seed(0)

    def draw(*size):
        return torch.randn(*size, device=device, dtype=dtype, generator=generator)

    q = draw(shape.batch, shape.heads, q_len, shape.head_dim)
    k = draw(shape.batch, kv_heads, kv_len, shape.head_dim)
    v = draw(shape.batch, kv_heads, kv_len, shape.value_dim or shape.head_dim)
    named = library_mask(shape.mask, kv_len, device=device, **shape.mask_args)
    if named.mask_mod is None:
        return q, k, v, full_block_mask(1, 1, q_len, kv_len, device, shape.block_size), None, named.score_mod
    user, offset = named.mask_mod, kv_len - q_len

    def at_cache_end(b, h, q_idx, kv_idx):
        return user(b, h, q_idx + offset, kv_idx)

    at_cache_end.__name__ = f"{getattr(user, '__name__', 'mask')}_at_{offset}"
    block_mask = create_block_mask(at_cache_end, None, None, q_len, kv_len, device=device, BLOCK_SIZE=shape.block_size)
    return q, k, v, block_mask, at_cache_end, named.score_mod


def tune_decode(args, shapes: List, arch, device, *, interpret: bool, dry_run: bool) -> int:
    """Dry run: list and AOT-prune each shape's decode candidates for ``arch``. Otherwise time them with
    the real launcher (on ``device``; the interpreter with ``interpret``) and store the winners."""
    from ..kernels.decode import launch as decode
    from ..kernels.decode.configs import default_decode_config
    from ..kernels.tuned import decode_candidates, decode_key
    from ..kernels.tuning import search as autotune

    q_len = args.q_len
    tuner = autotune.autotuner()
    aot = not interpret
    if aot:
        try:
            from ..kernels.decode.aot import decode_compile_fn
        except ImportError:
            aot = False
    plans = []
    for shape in shapes:
        q, k, v, block_mask, mask_mod, score_mod = _decode_problem(shape, q_len, device)
        groups = q.shape[1] // k.shape[1]
        # Without the GPU (dry run, interpreter) the split count is planned for the target's SM count.
        plan = decode.plan_decode(q, k.shape[1], v.shape[3], block_mask,
                                  sm_count=None if device.type == "cuda" else arch.sm_count, target=arch)
        candidates = decode_candidates(arch, q, v.shape[3], block_mask, groups=groups)
        if args.max_configs:
            candidates = candidates[:args.max_configs]
        plans.append((shape, (q, k, v, block_mask, mask_mod, score_mod), plan, candidates))
    mode = "dry run (ahead-of-time pruning only)" if dry_run else ("interpreter" if interpret else str(device))
    print(f"triton-attn tune --kind decode: Lq={q_len} at the end of each cache, {arch.name}, {mode}")
    rows = []
    with Progress(sum(len(c) * (2 if aot else 1) for *_, c in plans), "tune decode",
                  enabled=not args.quiet) as progress:
        for shape, (q, k, v, block_mask, mask_mod, score_mod), plan, candidates in plans:
            compile_fn = decode_compile_fn(
                arch, dtype=q.dtype, head_dim=q.shape[3], head_dim_v=v.shape[3], q_heads=q.shape[1],
                kv_heads=k.shape[1], q_len=q_len, kv_len=k.shape[2], num_splits=plan.num_splits,
                block_size=block_mask.BLOCK_SIZE, mask_mod=mask_mod, score_mod=score_mod) if aot else None
            label = f"{shape.label} Lq={q_len} splits={plan.num_splits}"
            if dry_run:
                if compile_fn is None:
                    print(f"\n{label}: " + ", ".join(c.name for c in candidates))
                    continue
                result = autotune.prune(candidates, compile_fn, capability=arch,
                                        progress=lambda c, r: progress.advance(c.name))
                print(f"\n{label}: {len(result.kept)}/{len(candidates)} candidates survive")
                for config in candidates:
                    stats, reason = result.stats[config], result.dropped.get(config)
                    print(f"  {config.name:<18} {'keep' if reason is None else 'drop':<5} smem {stats.shared:>6} B, "
                          f"{stats.registers:>3} regs, spills {stats.spills}"
                          f"{'' if reason is None else f'  ({reason})'}")
                continue
            key = decode_key(q, k.shape[1], k.shape[2], v.shape[3], block_mask, plan.num_splits, paged=False,
                             score=score_mod is not None,
                             structure=decode.decode_mods(block_mask, score_mod, dtype=q.dtype, interpret=interpret,
                                                          target=arch)[2].key)
            if tuner.lookup(key) is not None and not args.force:
                print(f"{label}: already tuned ({tuner.lookup(key).name}); --force re-tunes")
                continue
            scale = 1.0 / math.sqrt(q.shape[3])

            def run(config, q=q, k=k, v=v, block_mask=block_mask, score_mod=score_mod, splits=plan.num_splits):
                return decode.decode_attention(q, k, v, block_mask, score_mod=score_mod, scale=scale,
                                               interpret=interpret, config=config, num_splits=splits)

            result = tuner.tune(key, candidates, run, device=device, compile_fn=compile_fn,
                                progress=lambda stage, c, ms: progress.advance(f"{stage} {c.name}"))
            default = default_decode_config(q.shape[3], v.shape[3], q.dtype, plan.packed_rows, target=arch)
            rows.append((label, result, default, result.timings.get(plan.config)))
    if dry_run:
        return 0
    print(f"\n{'shape':<64} {'winner':<18} {'ms':>9} {'default ms':>10}")
    for label, result, default, default_ms in rows:
        winner = result.best.name if result.best is not None else "(none ran)"
        print(f"{label:<64} {winner:<18} {result.best_ms:>9.4f} "
              f"{default_ms if default_ms is not None else float('nan'):>10.4f}")
    print(f"winners stored in {tuner.cache.path}")
    return 0 if all(r[1].best is not None for r in rows) else 1
