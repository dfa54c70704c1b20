"""Autotuning of the attention kernels: search space, ahead-of-time pruning, and call-time lookup.

Three pieces, each usable without a GPU except the timing itself:

- **Key** (``TuningKey``): what a winner is valid for -- kernel (``fwd``/``bwd``/``decode``, and ``bwd_dkdv`` /
  ``bwd_dq`` for the backward pair's kernels searched one at a time), device name and
  compute capability, dtype, head dims (D, Dv), GQA ratio, a sequence-length bucket (next power of two of
  Lq and of Lkv), the mask's sparsity class (share of blocks computed: dense / half / sparse / tiny),
  the B * H occupancy bucket, the BlockMask's block size, whether the last block is ragged, and the
  (mask_mod, score_mod) structure class (they change register pressure and bounds checks).
- **Search space** (``search_space``): tile sizes x num_warps x num_stages per kernel and target
  (``kernels.targets``): on targets with large shared memory (sm_90, sm_100) the variants that pay off
  there (deeper pipelines, 128x128 tiles on two warpgroups); on AMD shallower pipelines and the
  ``waves_per_eu`` occupancy hint. Every candidate is fitted to the BlockMask's block size with
  ``KernelConfig.fitted``.
- **Pruning** (``prune``): each candidate is compiled ahead of time for the target (works on a machine
  without a GPU) and dropped when its shared memory (LDS) exceeds the target's limit, when it spills
  registers, or when it fails to compile. Nothing runs before this.

At call time ``select_config`` returns, in order: a winner already in this process's memory, a winner from
the JSON cache on disk (``cache``), or -- only when tuning was asked for (``autotune=True`` or
``TRITON_ATTN_AUTOTUNE=1``) and the caller passed a way to run the kernel -- the winner of a search run now.
Otherwise it returns the default config immediately: a first call never stalls.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from ... import settings
from .. import targets
from ..attention.configs import KernelConfig, next_power_of_two
from .cache import TuningCache, default_cache

KERNELS = ("fwd", "bwd", "bwd_dkdv", "bwd_dq", "decode")
MAX_REGISTERS_PER_THREAD = 255  # NVIDIA; a target's own limit is ``Target.max_registers``


def known_target(arch) -> targets.Target:
    """The target ``arch`` names (80, "sm_90", "gfx942", a ``Target``), or for an unknown capability the
    nearest known one (no warning: this is planning, not a launch)."""
    try:
        return targets.get(arch)
    except ValueError:
        text = str(arch).lower()
        if text.startswith("gfx"):
            return targets.nearest("hip", text)
        return targets.nearest("cuda", int(text.replace("sm_", "").replace("sm", "")))

SPARSITY_CLASSES = ("dense", "half", "sparse", "tiny")


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def seq_bucket(length: int) -> int:
    """The bucket of a sequence length: the next power of two, at least 16 and at most 2**17."""
    return min(1 << 17, max(16, next_power_of_two(max(1, int(length)))))


def sparsity_class(computed_fraction: float) -> str:
    """dense (>= 90% of blocks computed), half (>= 35%: causal, prefix-LM), sparse (>= 8%), tiny."""
    if computed_fraction >= 0.90:
        return "dense"
    if computed_fraction >= 0.35:
        return "half"
    if computed_fraction >= 0.08:
        return "sparse"
    return "tiny"


def block_mask_sparsity_class(block_mask) -> str:
    """The sparsity class of a BlockMask (``None``: no mask, dense).

    Counting blocks reads the mask's tensors (a device sync on CUDA), so the class is remembered on the
    BlockMask object after the first call."""
    if block_mask is None:
        return "dense"
    cached = getattr(block_mask, "_tuning_sparsity_class", None)
    if cached is not None:
        return cached
    result = sparsity_class(1.0 - float(block_mask.sparsity()) / 100.0)
    try:
        block_mask._tuning_sparsity_class = result
    except AttributeError:  # a class with __slots__: recompute next time
        pass
    return result


@dataclass(frozen=True)
class TuningKey:
    """What a tuned winner is valid for. ``str(key)`` is the cache key."""

    kernel: str
    device: str
    capability: int          # 80, 90, ... (major * 10 + minor); 0 for the CPU interpreter
    dtype: str
    head_dim: int
    value_dim: int
    gqa: int
    q_bucket: int
    kv_bucket: int
    sparsity: str
    variant: str = ""        # free-form extra specialization the launcher wants separate (e.g. "score_mod")
    # What changes the best tiles beyond the shapes above (register pressure, waves, bounds checks):
    occupancy: int = 0       # B * H bucket (``occupancy_bucket``): how many programs fill the GPU's SMs
    block: str = ""          # the BlockMask's block size, "128x128"
    ragged: bool = False     # the last KV (or query) block is partial: bounds checks compiled in
    structure: str = ""      # structure class of the (mask_mod, score_mod) pair (generated functions' key)

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"TuningKey.kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        if self.sparsity not in SPARSITY_CLASSES:
            raise ValueError(f"TuningKey.sparsity must be one of {', '.join(SPARSITY_CLASSES)}, got {self.sparsity!r}")

    def __str__(self) -> str:
        parts = [self.kernel, self.device, f"sm{self.capability}", self.dtype, f"d{self.head_dim}",
                 f"dv{self.value_dim}", f"gqa{self.gqa}", f"q{self.q_bucket}", f"kv{self.kv_bucket}", self.sparsity]
        if self.occupancy or self.block or self.ragged or self.structure:
            parts += [f"bh{self.occupancy}", f"bs{self.block}", "ragged" if self.ragged else "even",
                      f"st{self.structure}"]
        if self.variant:
            parts.append(self.variant)
        return "|".join(parts)

    @classmethod
    def parse(cls, text: str) -> "TuningKey":
        parts = text.split("|")
        if len(parts) not in (10, 11, 14, 15):
            raise ValueError(f"not a tuning key: {text!r}")
        extra = {}
        if len(parts) >= 14:
            occupancy, block, ragged, structure = parts[10:14]
            if not (occupancy.startswith("bh") and block.startswith("bs") and ragged in ("ragged", "even")
                    and structure.startswith("st")):
                raise ValueError(f"not a tuning key: {text!r}")
            extra = dict(occupancy=int(occupancy[2:]), block=block[2:], ragged=ragged == "ragged",
                         structure=structure[2:])
            parts = parts[:10] + parts[14:]

        def number(part, prefix):
            if not part.startswith(prefix):
                raise ValueError(f"not a tuning key: {text!r} ({part!r} should start with {prefix!r})")
            return int(part[len(prefix):])

        return cls(kernel=parts[0], device=parts[1], capability=number(parts[2], "sm"), dtype=parts[3],
                   head_dim=number(parts[4], "d"), value_dim=number(parts[5], "dv"), gqa=number(parts[6], "gqa"),
                   q_bucket=number(parts[7], "q"), kv_bucket=number(parts[8], "kv"), sparsity=parts[9],
                   variant=parts[10] if len(parts) == 11 else "", **extra)


def device_identity(device) -> Tuple[str, int]:
    """(name, capability) of a torch device; ("cpu", 0) for CPU tensors (the interpreter)."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu", 0
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), major * 10 + minor


def call_target(key: "TuningKey", device=None) -> targets.Target:
    """The target a tuning search runs for: the GPU's (``targets.device_target``), else the key's capability
    (the interpreter: sm_80's tables). On ROCm the key's capability is torch's (94 for gfx942), not a target."""
    if device is not None and torch.device(device).type == "cuda":
        return targets.device_target(device)
    return known_target(key.capability or 80)


def occupancy_bucket(batch_heads: int) -> int:
    """B * H rounded up to a power of two, at most 1024: few (batch, head) pairs leave SMs idle unless
    the tiles are small; many fill every SM several times over with any tile."""
    return min(1024, next_power_of_two(max(1, int(batch_heads))))


def make_key(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask=None, *, kernel: str = "fwd",
             variant: str = "", structure: str = "") -> TuningKey:
    """The tuning key of one ``attention`` call (q [B, Hq, Lq, D], k [B, Hkv, Lkv, D], v [B, Hkv, Lkv, Dv]).

    structure: the (mask_mod, score_mod) structure class (``ModFunctions.key``; "" when unknown)."""
    name, capability = device_identity(query.device)
    q_len, kv_len = int(query.shape[2]), int(key.shape[2])
    q_block, kv_block = tuple(block_mask.BLOCK_SIZE) if block_mask is not None else (128, 128)
    return TuningKey(kernel=kernel, device=name, capability=capability, dtype=_dtype_name(query.dtype),
                     head_dim=int(query.shape[-1]), value_dim=int(value.shape[-1]),
                     gqa=int(query.shape[1]) // max(1, int(key.shape[1])), q_bucket=seq_bucket(q_len),
                     kv_bucket=seq_bucket(kv_len), sparsity=block_mask_sparsity_class(block_mask),
                     variant=variant, occupancy=occupancy_bucket(query.shape[0] * query.shape[1]),
                     block=f"{q_block}x{kv_block}", ragged=bool(kv_len % kv_block or q_len % q_block),
                     structure=structure)


# -- search space -------------------------------------------------------------------------------------------

def _grid(block_m: Iterable[int], block_n: Iterable[int], warps: Iterable[int], stages: Iterable[int]):
    return [KernelConfig(m, n, w, s) for m in block_m for n in block_n for w in warps for s in stages]


def search_space(kernel: str = "fwd", capability=80, *, head_dim: int = 128, value_dim: Optional[int] = None,
                 dtype=torch.bfloat16, block_size: Tuple[int, int] = (128, 128),
                 q_len: Optional[int] = None) -> List[KernelConfig]:
    """Every candidate config for one kernel on one target (``capability``: 80, "sm_120", "gfx942", a
    ``Target``), fitted to ``block_size`` (deduplicated).

    Forward: BLOCK_M {64, 128} x BLOCK_N {32, 64, 128} x warps {4, 8} x stages {2, 3}; on targets with
    ``deep_pipelines`` (sm_90, sm_100) stages {2, 3, 4} plus 128x128 and 128x64 tiles on 8 warps (two
    warpgroups of wgmma) with 5-stage pipelines that TMA-less loads still profit from on 228 KB of shared
    memory. AMD: stages {1, 2} (its stream pipeliner double-buffers in LDS), each with ``waves_per_eu``
    {0, 2} (the compiler's choice, or two waves per SIMD).
    Backward: smaller query tiles (BLOCK_M {32, 64}), BLOCK_N {64, 128}. Decode (``kernels/decode/``):
    BLOCK_M {16, 64} is the most packed rows per program (the launcher shrinks it to the rows there are),
    BLOCK_N {32, 64, 128} x warps {4, 8} x stages {2, 3} (and 4 on sm_90+); pass ``q_len=None``.
    Large head dims (> 128) and float32 drop the 128x128 tiles, which cannot fit in registers there.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    value_dim = head_dim if value_dim is None else value_dim
    width = max(next_power_of_two(max(16, head_dim)), next_power_of_two(max(16, value_dim)))
    target = known_target(capability)
    deep = target.deep_pipelines
    if target.is_amd:
        stages = (1, 2)
        if kernel == "fwd":
            space = _grid((64, 128), (32, 64, 128), (4, 8), stages)
        elif kernel == "decode":
            space = _grid((16, 64), (32, 64, 128), (4, 8), stages)
        else:
            space = _grid((32, 64), (32, 64, 128), (4, 8), stages)
        space = [dataclasses.replace(config, waves_per_eu=waves) for config in space for waves in (0, 2)]
    elif kernel == "fwd":
        space = _grid((64, 128), (32, 64, 128), (4, 8), (2, 3, 4) if deep else (2, 3))
        if deep:
            space += _grid((128,), (64, 128), (8,), (5,))
    elif kernel == "decode":
        space = _grid((16, 64), (32, 64, 128), (4, 8), (2, 3, 4) if deep else (2, 3))
    else:
        space = _grid((32, 64), (64, 128), (4, 8), (1, 2, 3) if deep else (1, 2))
    if width > 128 or dtype == torch.float32:
        space = [c for c in space if c.BLOCK_M * c.BLOCK_N <= 128 * 64]
    seen, fitted = set(), []
    for config in space:
        config = config.fitted(block_size[0], block_size[1], q_len)
        if config not in seen:
            seen.add(config)
            fitted.append(config)
    return fitted


# -- ahead-of-time pruning ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class CompileStats:
    """What the ahead-of-time compile reports for one config: bytes of shared memory, registers per thread,
    bytes spilled (ptxas ``spill stores`` + ``spill loads``), and the error when it did not compile."""

    shared: int = 0
    registers: int = 0
    spills: int = 0
    error: Optional[str] = None


def shared_memory_limit(capability, device=None) -> int:
    """Opt-in shared memory (LDS) per block: asked of the GPU when ``device`` is given, else the target's
    (``capability``: 80, "gfx942", a ``Target``; an unknown capability: the nearest known target's)."""
    if device is not None and torch.device(device).type == "cuda":
        try:
            from triton.runtime import driver

            index = torch.device(device).index
            index = torch.cuda.current_device() if index is None else index
            return int(driver.active.utils.get_device_properties(index)["max_shared_mem"])
        except Exception:  # an older Triton without this helper: the table is right for released GPUs
            pass
    return known_target(capability).shared_memory


def stats_from(result: Any) -> CompileStats:
    """Reads a CompileStats out of whatever the AOT helper returned (attributes or dict keys named
    shared / shared_mem, registers / n_regs, spills / n_spills; error)."""
    if isinstance(result, CompileStats):
        return result

    def read(*names, default=0):
        for name in names:
            if isinstance(result, Mapping) and name in result:
                return result[name]
            if hasattr(result, name):
                return getattr(result, name)
        metadata = getattr(result, "metadata", None)
        for name in names:
            if metadata is not None and hasattr(metadata, name):
                return getattr(metadata, name)
        return default

    return CompileStats(shared=int(read("shared", "shared_mem", "shared_memory") or 0),
                        registers=int(read("registers", "n_regs", "num_regs") or 0),
                        spills=int(read("spills", "n_spills", "spill_bytes") or 0),
                        error=read("error", default=None))


def rejection(stats: CompileStats, shared_limit: int, max_registers: int = MAX_REGISTERS_PER_THREAD) -> Optional[str]:
    """Why a config cannot run (None when it can)."""
    if stats.error:
        return f"does not compile: {stats.error}"
    if stats.shared > shared_limit:
        return f"shared memory {stats.shared} B > limit {shared_limit} B"
    if stats.spills > 0:
        return f"spills {stats.spills} B of registers"
    if stats.registers > max_registers:
        return f"{stats.registers} registers per thread > {max_registers}"
    return None


@dataclass
class PruneResult:
    kept: List[KernelConfig]
    dropped: Dict[KernelConfig, str]
    stats: Dict[KernelConfig, CompileStats]


def prune(configs: Sequence[KernelConfig], compile_fn: Callable[[KernelConfig], Any], *, capability,
          shared_limit: Optional[int] = None, progress: Optional[Callable[[KernelConfig, Optional[str]], None]] = None
          ) -> PruneResult:
    """Compile each config ahead of time with ``compile_fn(config)`` and keep those that fit.

    ``compile_fn`` returns a ``CompileStats`` (or anything ``stats_from`` reads) and may raise: a config
    that raises is dropped with the error's first line. ``capability``: the target (80, "gfx942", a
    ``Target``); ``shared_limit`` defaults to its limit. ``progress(config, reason_or_None)`` is called
    after each compile.
    """
    limit = shared_memory_limit(capability) if shared_limit is None else shared_limit
    max_registers = known_target(capability).max_registers
    kept, dropped, all_stats = [], {}, {}
    for config in configs:
        try:
            stats = stats_from(compile_fn(config))
        except Exception as error:  # a config the compiler rejects is simply not a candidate
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            stats = CompileStats(error=f"{type(error).__name__}: {first_line}"[:300])
        all_stats[config] = stats
        reason = rejection(stats, limit, max_registers)
        if reason is None:
            kept.append(config)
        else:
            dropped[config] = reason
        if progress is not None:
            progress(config, reason)
    return PruneResult(kept, dropped, all_stats)


# -- timing and the search ----------------------------------------------------------------------------------

def time_ms(fn: Callable[[], Any], device=None, *, warmup: int = 1, repeats: int = 5) -> float:
    """Median time of ``fn()`` in ms: ``triton.testing.do_bench`` on CUDA, a perf_counter loop elsewhere."""
    if device is not None and torch.device(device).type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


@dataclass
class TuneResult:
    key: TuningKey
    best: Optional[KernelConfig]
    best_ms: float
    timings: Dict[KernelConfig, float]
    failures: Dict[KernelConfig, str]
    pruned: Dict[KernelConfig, str]


def config_to_dict(config: KernelConfig) -> Dict[str, int]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def config_from_dict(data: Mapping[str, Any]) -> KernelConfig:
    """A KernelConfig from a cache record: required fields must be there, fields with defaults may be
    missing, unknown keys (from another version) are ignored."""
    fields = dataclasses.fields(KernelConfig)
    required = {f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = required - set(data)
    if missing:
        raise ValueError(f"tuned config lacks {', '.join(sorted(missing))}: {dict(data)}")
    return KernelConfig(**{f.name: int(data[f.name]) for f in fields if f.name in data})


def autotune_requested(autotune: Optional[bool]) -> bool:
    """``autotune`` when given, else whether ``TRITON_ATTN_AUTOTUNE`` asks for searches."""
    if autotune is None:
        return settings.autotune()
    return bool(autotune)


class Autotuner:
    """Holds winners in memory in front of the on-disk cache; runs searches when asked."""

    def __init__(self, cache: Optional[TuningCache] = None):
        self._cache = cache
        self._memory: Dict[Tuple[str, str], KernelConfig] = {}  # (cache file, key) -> winner

    @property
    def cache(self) -> TuningCache:
        return self._cache if self._cache is not None else default_cache()

    def lookup(self, key: TuningKey) -> Optional[KernelConfig]:
        """The tuned winner for ``key`` (memory, then disk), or None. Never searches, never raises."""
        text = str(key)
        cache = self.cache
        memo = (str(cache.path), text)
        hit = self._memory.get(memo)
        if hit is not None:
            return hit
        record = cache.get(text)
        if record is None:
            return None
        try:
            config = config_from_dict(record["config"])
        except (ValueError, TypeError) as error:
            warnings.warn(f"triton-attn: ignoring tuned config for {text}: {error}", RuntimeWarning, stacklevel=2)
            return None
        self._memory[memo] = config
        return config

    def tune(self, key: TuningKey, candidates: Sequence[KernelConfig], run: Callable[[KernelConfig], Any], *,
             device=None, compile_fn: Optional[Callable[[KernelConfig], Any]] = None,
             progress: Optional[Callable[[str, KernelConfig, Optional[float]], None]] = None,
             store: bool = True) -> TuneResult:
        """Search ``candidates`` for ``key``: prune by AOT compile (when ``compile_fn`` is given), then time
        each survivor; store and return the fastest.

        ``run(config)`` either runs the kernel (then that call is timed) or prepares it and returns the
        launch as a callable (then only the launch is timed: ``do_bench`` on the kernel, no host work).

        ``progress(stage, config, ms_or_None)`` with stage "prune" or "time" reports each step.
        """
        pruned: Dict[KernelConfig, str] = {}
        if compile_fn is not None:
            target = call_target(key, device)
            result = prune(candidates, compile_fn, capability=target,
                           shared_limit=shared_memory_limit(target, device),
                           progress=(lambda c, r: progress("prune", c, None)) if progress else None)
            candidates, pruned = result.kept, result.dropped
        timings: Dict[KernelConfig, float] = {}
        failures: Dict[KernelConfig, str] = {}
        for config in candidates:
            try:
                prepared = run(config)  # compile and warm up outside the timing
                if callable(prepared):
                    prepared()
                    ms = time_ms(prepared, device)
                else:
                    ms = time_ms(lambda: run(config), device)
            except Exception as error:  # out of resources at launch, a compiler error: not a candidate
                failures[config] = f"{type(error).__name__}: {str(error).strip()[:200]}"
                ms = None
            else:
                if math.isfinite(ms):
                    timings[config] = ms
            if progress is not None:
                progress("time", config, ms)
        best = min(timings, key=timings.get) if timings else None
        best_ms = timings[best] if best is not None else float("nan")
        if best is not None:
            self._memory[(str(self.cache.path), str(key))] = best
            if store:
                ranked = sorted(timings.items(), key=lambda item: item[1])
                self.cache.put(str(key), config_to_dict(best), ms=best_ms, candidates=len(timings),
                               runner_up={c.name: round(ms, 5) for c, ms in ranked[1:4]}, versions=_versions())
        return TuneResult(key, best, best_ms, timings, failures, pruned)

    def select(self, key: TuningKey, default: KernelConfig, *, autotune: Optional[bool] = None,
               candidates: Optional[Callable[[], Sequence[KernelConfig]]] = None,
               run: Optional[Callable[[KernelConfig], Any]] = None, device=None,
               compile_fn: Optional[Callable[[KernelConfig], Any]] = None) -> KernelConfig:
        """The config to launch with: a tuned winner, else (when tuning is on and ``run`` is given) the
        winner of a search run now, else ``default`` at once."""
        hit = self.lookup(key)
        if hit is not None:
            return hit
        if autotune_requested(autotune) and run is not None:
            space = list(candidates()) if candidates is not None else [default]
            result = self.tune(key, space, run, device=device, compile_fn=compile_fn)
            if result.best is not None:
                return result.best
        return default

    def forget_memory(self) -> None:
        self._memory.clear()


def _versions() -> Dict[str, str]:
    versions = {"torch": torch.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:  # pragma: no cover
        pass
    return versions


_AUTOTUNER: Optional[Autotuner] = None


def autotuner() -> Autotuner:
    """The process-wide autotuner (backed by the default cache file)."""
    global _AUTOTUNER
    if _AUTOTUNER is None:
        _AUTOTUNER = Autotuner()
    return _AUTOTUNER


def lookup(key: TuningKey) -> Optional[KernelConfig]:
    """Module-level shortcut: ``autotuner().lookup(key)``."""
    return autotuner().lookup(key)


def select_config(key: TuningKey, default: KernelConfig, **kwargs) -> KernelConfig:
    """Module-level shortcut: ``autotuner().select(key, default, ...)`` (see ``Autotuner.select``)."""
    return autotuner().select(key, default, **kwargs)
