"""``triton-attn info``: device, versions, backends available, the autotune cache."""

from __future__ import annotations

import importlib.util
import os
import platform
from pathlib import Path

from ..versions import MIN_TORCH, MIN_TRITON, interpreter_problem, triton_problem, triton_version
from .common import CommandError, available_backends


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        try:
            return importlib.import_module(module).__version__
        except Exception:
            return "not installed"


def target_coverage(backend: str, arch) -> str:
    """One line on whether the kernels are proven for this GPU's target (``kernels.targets``)."""
    from ..kernels import targets

    name = f"sm_{arch}" if backend == "cuda" else str(arch)
    if name in targets.TARGETS:
        target = targets.TARGETS[name]
        return (f"{name} ({target.generation}): covered -- built and checked ahead of time for every kernel family; "
                f"{target.tensor_instructions} tensor cores, {target.shared_memory} B shared memory per block")
    fallback = targets.nearest(backend, arch)
    return (f"{name}: not covered -- the kernels run with the configs of the nearest target, {fallback.name} "
            f"({fallback.generation}); check it with `triton-attn check` and tune it with `triton-attn tune`")


def info_command(args) -> int:
    if isinstance(args.limit, bool) or not isinstance(args.limit, int) or args.limit < 0:
        raise CommandError(f"--limit must be a non-negative integer, got {args.limit!r}")
    import torch

    from .. import __version__
    from ..kernels.tuning.cache import default_cache

    print(f"triton-attn {__version__} ({Path(__file__).resolve().parent.parent})")
    print(f"python {platform.python_version()}, torch {torch.__version__}, "
          f"triton {triton_version() or 'not installed'}, "
          f"numpy {_version('numpy')}, transformers {_version('transformers')}, flash-attn {_version('flash-attn')}")
    print(f"supported: torch>={'.'.join(map(str, MIN_TORCH))}, triton>={'.'.join(map(str, MIN_TRITON))}")
    for problem in (triton_problem(), interpreter_problem()):
        if problem:
            print(f"warning: {problem}")
    from ..kernels import targets

    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            backend, arch, _ = targets.device_arch(index)
            name = f"sm_{arch}" if backend == "cuda" else str(arch)
            units = "SMs" if backend == "cuda" else "CUs"
            print(f"device cuda:{index}: {props.name}, {name}, {props.total_memory / 2**30:.0f} GiB, "
                  f"{props.multi_processor_count} {units}")
            print(f"  target: {target_coverage(backend, arch)}")
    else:
        print(f"device: cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"torch threads {torch.get_num_threads()}); no CUDA GPU")
    print(f"GPU targets proven ahead of time: {', '.join(targets.TARGETS)} (`triton-attn check --targets all`)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    default = "triton" if device.type == "cuda" else "torch"
    from .. import settings

    env = settings.backend()
    print(f"backends on {device.type} (default {env or default}{' from TRITON_ATTN_BACKEND' if env else ''}):")
    for name, ok, why in available_backends(device):
        print(f"  {name:<10} {'yes' if ok else 'no'}{'' if ok else f'  ({why})'}")
    cache = default_cache()
    entries = cache.entries()
    print(f"autotune cache: {cache.path} ({len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"
          f"{', file not created yet' if not cache.path.exists() else ''})")
    shown = sorted(entries.items())[:args.limit]
    for key, record in shown:
        config = record.get("config", {})
        text = ", ".join(f"{k}={v}" for k, v in config.items())
        ms = record.get("ms")
        print(f"  {key}: {text}" + (f"  ({ms:.4f} ms)" if isinstance(ms, (int, float)) else ""))
    if len(entries) > len(shown):
        print(f"  ... {len(entries) - len(shown)} more (--limit)")
    return 0
