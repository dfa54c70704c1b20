"""``triton-attn tune``: search kernel configs for shapes and masks; store the winners in the tuning cache."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .common import DTYPES, LIBRARY_MASKS, CommandError, Progress, library_mask, mask_kwargs, parse_dtype, positive_int
from .show import parse_block_size


@dataclass
class TuneShape:
    mask: str
    seq_len: int
    head_dim: int
    dtype: str
    batch: int = 1
    heads: int = 16
    kv_heads: Optional[int] = None
    kv_len: Optional[int] = None
    value_dim: Optional[int] = None
    block_size: Tuple[int, int] = (128, 128)
    mask_args: Dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        gqa = f", Hkv={self.kv_heads}" if self.kv_heads and self.kv_heads != self.heads else ""
        return (f"{self.mask} L={self.seq_len}{'' if not self.kv_len else f'x{self.kv_len}'} D={self.head_dim} "
                f"{self.dtype} B={self.batch} H={self.heads}{gqa}")


SHAPE_FIELDS = {"mask", "seq_len", "head_dim", "dtype", "batch", "heads", "kv_heads", "kv_len", "value_dim",
                "block_size", "window", "chunk", "prefix", "documents", "cap"}


def _load_spec(path: Path) -> List[Dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise CommandError(f"cannot read {path}: {error.strerror or error}") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise CommandError(f"{path} is YAML but PyYAML is not installed; pip install pyyaml or use JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise CommandError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    else:
        try:
            data = json.loads(text)
        except ValueError as error:
            raise CommandError(f"{path} is not valid JSON: {error}") from None
    if isinstance(data, dict):
        data = data.get("shapes", data.get("problems"))
    if not isinstance(data, list) or not data or not all(isinstance(item, dict) for item in data):
        raise CommandError(f"{path} must hold a non-empty list of shapes (or {{\"shapes\": [...]}}), each an object "
                           f"with keys among {', '.join(sorted(SHAPE_FIELDS))}")
    return data


def _expand(spec: Dict[str, Any], defaults: Dict[str, Any], where: str) -> List[TuneShape]:
    unknown = set(spec) - SHAPE_FIELDS
    if unknown:
        raise CommandError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
                           f"allowed: {', '.join(sorted(SHAPE_FIELDS))}")
    merged = dict(defaults)
    merged.update(spec)
    list_keys = [k for k, v in merged.items() if isinstance(v, list) and k != "block_size"]
    shapes = []
    for values in itertools.product(*(merged[k] for k in list_keys)):
        item = dict(merged)
        item.update(zip(list_keys, values))
        for name in ("seq_len", "head_dim", "batch", "heads"):
            positive_int(item.get(name), f"{where}: {name}")
        for name in ("kv_heads", "kv_len", "value_dim", "window", "chunk", "prefix", "documents"):
            if item.get(name) is not None:
                positive_int(item[name], f"{where}: {name}")
        if item["mask"] not in LIBRARY_MASKS:
            raise CommandError(f"{where}: unknown mask {item['mask']!r}; "
                               f"the library masks are {', '.join(LIBRARY_MASKS)}")
        block = item.get("block_size", 128)
        block = parse_block_size(",".join(str(b) for b in block) if isinstance(block, (list, tuple)) else str(block))
        kv_heads = item.get("kv_heads")
        if kv_heads and item["heads"] % kv_heads:
            raise CommandError(f"{where}: heads={item['heads']} is not a multiple of kv_heads={kv_heads}")
        shapes.append(TuneShape(mask=item["mask"], seq_len=item["seq_len"], head_dim=item["head_dim"],
                                dtype=DTYPES.get(str(item["dtype"]).lower()) or str(parse_dtype(item["dtype"])),
                                batch=item["batch"], heads=item["heads"], kv_heads=kv_heads,
                                kv_len=item.get("kv_len"), value_dim=item.get("value_dim"), block_size=block,
                                mask_args={k: item[k] for k in ("window", "chunk", "prefix", "documents", "cap")
                                           if item.get(k) is not None}))
    return shapes


def tune_shapes(args) -> List[TuneShape]:
    """The shapes to tune: the cross product of the flags, or each entry of --config (flags as defaults)."""
    defaults = dict(mask=args.mask, seq_len=args.seq_len, head_dim=args.head_dim, dtype=args.dtype,
                    batch=args.batch, heads=args.heads, kv_heads=args.kv_heads, block_size=args.block_size)
    defaults.update({k: v for k, v in mask_kwargs(args).items() if v is not None and k != "cap"})
    if args.cap != 20.0:
        defaults["cap"] = args.cap
    if args.config:
        shapes = []
        for index, spec in enumerate(_load_spec(Path(args.config))):
            shapes += _expand(spec, defaults, f"{args.config} shape {index + 1}")
        return shapes
    return _expand({}, defaults, "flags")


def _parse_arch(text: Optional[str]):
    """The ``kernels.targets.Target`` that ``--arch`` names (None when not given)."""
    if text is None:
        return None
    from ..kernels import targets

    try:
        return targets.get(str(text).replace(".", ""))
    except ValueError:
        raise CommandError(f"--arch must be one of {', '.join(targets.TARGETS)}, got {text!r}") from None


def tune_command(args) -> int:
    import torch

    shapes = tune_shapes(args)
    have_gpu = torch.cuda.is_available()
    if not args.dry_run and not args.interpret and not have_gpu:
        raise CommandError("tuning times the Triton kernels on a CUDA GPU and this machine has none "
                           "(torch.cuda.is_available() is False); `triton-attn tune --dry-run --arch sm_90` lists "
                           "the search space and prunes it by ahead-of-time compilation without a GPU")
    from ..kernels import targets

    arch = _parse_arch(args.arch)
    if arch is None:
        arch = targets.device_target(torch.device("cuda")) if have_gpu else targets.get("sm_90")
    if getattr(args, "kind", "fwd") == "decode":
        from .tune_decode import tune_decode

        device = torch.device("cpu" if args.dry_run or args.interpret else "cuda")
        return tune_decode(args, shapes, arch, device, interpret=args.interpret, dry_run=args.dry_run)
    if args.dry_run:
        return _tune_dry_run(args, shapes, arch)
    if args.interpret:
        return _tune_run(args, shapes, arch, torch.device("cpu"), interpret=True)
    local = targets.device_target(torch.device("cuda"))
    if arch != local:
        raise CommandError(f"--arch {arch.name} differs from this GPU's {local.name}; --arch is for --dry-run")
    return _tune_run(args, shapes, arch, torch.device("cuda"), interpret=False)


def _candidates(shape: TuneShape, arch, args):
    from ..kernels.tuning import search as autotune

    space = autotune.search_space("fwd", arch, head_dim=shape.head_dim, value_dim=shape.value_dim,
                                  dtype=parse_dtype(shape.dtype), block_size=shape.block_size,
                                  q_len=shape.seq_len)
    return space[:args.max_configs] if args.max_configs else space


def _tune_dry_run(args, shapes: List[TuneShape], arch) -> int:
    from ..kernels.attention.aot import aot_compile_fn
    from ..kernels.tuning import search as autotune

    print(f"triton-attn tune --dry-run: search space for {arch.name}, pruned by ahead-of-time compilation "
          f"(shared memory limit {autotune.shared_memory_limit(arch)} B, no register spills); nothing is timed")
    total = sum(len(_candidates(s, arch, args)) for s in shapes)
    aot_ok = True
    try:
        aot_compile_fn(arch)
    except ImportError as error:
        aot_ok = False
        print(f"note: ahead-of-time pruning unavailable ({error}); listing the search space only")
    kept_total = 0
    with Progress(total, "aot compile", enabled=aot_ok and not args.quiet) as progress:
        for shape in shapes:
            candidates = _candidates(shape, arch, args)
            print(f"\n{shape.label}: {len(candidates)} candidate configs")
            if not aot_ok:
                for config in candidates:
                    print(f"  {config.name}")
                continue
            named = library_mask(shape.mask, shape.seq_len, **shape.mask_args)
            compile_fn = aot_compile_fn(arch, head_dim=shape.head_dim, value_dim=shape.value_dim,
                                        dtype=parse_dtype(shape.dtype), block_size=shape.block_size,
                                        mask_mod=named.mask_mod, score_mod=named.score_mod)
            result = autotune.prune(candidates, compile_fn, capability=arch,
                                    progress=lambda c, r: progress.advance(c.name))
            kept_total += len(result.kept)
            for config in candidates:
                stats = result.stats[config]
                reason = result.dropped.get(config)
                detail = f"smem {stats.shared:>6} B, {stats.registers:>3} regs, spills {stats.spills}"
                print(f"  {config.name:<18} {'keep' if reason is None else 'drop':<5} "
                      f"{detail if not stats.error else ''}{'' if reason is None else f'  ({reason})'}")
    if aot_ok:
        print(f"\n{kept_total}/{total} configs survive pruning for {arch.name}")
    return 0


def _tune_run(args, shapes: List[TuneShape], arch, device, interpret: bool) -> int:
    """Tune each shape: AOT-prune the candidates for ``arch`` (on a GPU), time the survivors with the real
    launcher, store the winners. ``interpret``: the same flow under the Triton interpreter on CPU tensors
    (for testing the machinery: its timings say nothing about a GPU, and its entries are keyed to device cpu)."""
    import torch

    from ..kernels.attention.aot import aot_compile_fn
    from ..kernels.attention.configs import default_config
    from ..kernels.attention.forward_launch import attention_forward
    from ..kernels.tuned import forward_key
    from ..kernels.tuning import search as autotune
    from ..masks import create_block_mask

    tuner = autotune.autotuner()
    check_cache_writable(tuner.cache.path)
    aot = False
    if not interpret:
        try:
            aot_compile_fn(arch)
            aot = True
        except ImportError:
            aot = False
    plans = [(shape, _candidates(shape, arch, args)) for shape in shapes]
    winners = []
    with Progress(sum(len(c) * (2 if aot else 1) for _, c in plans), "tune", enabled=not args.quiet) as progress:
        for shape, candidates in plans:
            dtype = parse_dtype(shape.dtype)
            kv_len = shape.kv_len or shape.seq_len
            kv_heads = shape.kv_heads or shape.heads
            generator = torch.Generator(device=device).manual_seed(0)
            q = torch.randn(shape.batch, shape.heads, shape.seq_len, shape.head_dim, device=device, dtype=dtype,
                            generator=generator)
            k = torch.randn(shape.batch, kv_heads, kv_len, shape.head_dim, device=device, dtype=dtype,
                            generator=generator)
            v = torch.randn(shape.batch, kv_heads, kv_len, shape.value_dim or shape.head_dim, device=device,
                            dtype=dtype, generator=generator)
            named = library_mask(shape.mask, shape.seq_len, device=device, **shape.mask_args)
            if named.mask_mod is None:
                from ..masks.standard import full_block_mask

                block_mask = full_block_mask(1, 1, shape.seq_len, kv_len, device, shape.block_size)
            else:
                block_mask = create_block_mask(named.mask_mod, None, None, shape.seq_len, kv_len, device=device,
                                               BLOCK_SIZE=shape.block_size)
            scale = 1.0 / math.sqrt(shape.head_dim)
            # The key a compiled launch of this problem looks up (it names the mods' structure class).
            key = forward_key(q, k, v, block_mask, score_mod=named.score_mod, scale=scale)
            if tuner.lookup(key) is not None and not args.force:
                print(f"{shape.label}: already tuned ({tuner.lookup(key).name}); --force re-tunes")
                for _ in range(len(candidates) * (2 if aot else 1)):
                    progress.advance("cached")
                continue

            def run(config, q=q, k=k, v=v, block_mask=block_mask, named=named, scale=scale):
                return attention_forward(q, k, v, block_mask, score_mod=named.score_mod, scale=scale,
                                         interpret=interpret, config=config)

            compile_fn = aot_compile_fn(arch, head_dim=shape.head_dim, value_dim=shape.value_dim,
                                                 dtype=dtype, block_size=shape.block_size, mask_mod=named.mask_mod,
                                                 score_mod=named.score_mod) if aot else None
            result = tuner.tune(key, candidates, run, device=device, compile_fn=compile_fn,
                                progress=lambda stage, c, ms: progress.advance(f"{stage} {c.name}"))
            default = default_config(shape.head_dim, shape.value_dim or shape.head_dim, dtype, shape.block_size,
                                     shape.seq_len)
            default_ms = result.timings.get(default)
            if default_ms is None:
                with contextlib.suppress(Exception):
                    run(default)
                    default_ms = autotune.time_ms(lambda: run(default), device)
            winners.append((shape, key, result, default, default_ms))
    print(f"\n{'shape':<48} {'winner':<18} {'ms':>9} {'default':<18} {'ms':>9} {'speedup':>8}  pruned/failed")
    for shape, key, result, default, default_ms in winners:
        if result.best is None:
            print(f"{shape.label:<48} {'(none ran)':<18}")
            continue
        speedup = f"{default_ms / result.best_ms:.2f}x" if default_ms else "-"
        print(f"{shape.label:<48} {result.best.name:<18} {result.best_ms:>9.4f} {default.name:<18} "
              f"{default_ms if default_ms else float('nan'):>9.4f} {speedup:>8}  "
              f"{len(result.pruned)}/{len(result.failures)}")
    tuned = [str(key) for _, key, result, _, _ in winners if result.best is not None]
    stored = type(tuner.cache)(tuner.cache.path).entries()  # read back from disk, not from memory
    lost = [key for key in tuned if key not in stored]
    if lost:
        raise TuningNotStoredError(f"{len(lost)} of {len(tuned)} winners were not stored in {tuner.cache.path} "
                                   "(see the warning above); set TRITON_ATTN_CACHE_DIR to a writable folder")
    print(f"winners stored in {tuner.cache.path}")
    return 0 if all(w[2].best is not None for w in winners) else 1


class TuningNotStoredError(CommandError):
    """Tuning ran but its winners are not in the cache file (exit code 1: the work was done, the result lost)."""

    exit_code = 1


def check_cache_writable(path: Path) -> None:
    """Fail before tuning when the autotune cache file ``path`` cannot be written (read-only folder, a file in
    the way): otherwise the winners of a long search would be lost."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".write-check-"):
            pass
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is read-only")
    except OSError as error:
        raise CommandError(f"cannot write the autotune cache {path} ({error.strerror or error}); "
                           "set TRITON_ATTN_CACHE_DIR to a writable folder") from None
