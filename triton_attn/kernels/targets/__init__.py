"""The supported GPU targets as data, and which one a device is.

``TARGETS``: every target the kernels are built and proven for ahead of time (``nvidia.py``,
``amd.py``), by name. ``get("sm_90")`` / ``get(90)`` / ``get("gfx942")`` names one;
``device_target(device)`` resolves a CUDA or ROCm device (compute capability; on ROCm the device's
``gcnArchName``) and falls back to the nearest known target, with a one-time warning naming both,
when the device is not in the table. CPU tensors (the interpreter) have no target: the launchers then
read sm_80's tables, the library's base tables.
"""

from __future__ import annotations

import functools
import re
import warnings
from typing import Dict, Optional, Tuple, Union

import torch

from .amd import AMD_TARGETS
from .nvidia import NVIDIA_TARGETS
from .target import Arch, KernelTables, KnownSpill, Target

__all__ = ["TARGETS", "Target", "KernelTables", "KnownSpill", "get", "device_target", "device_arch", "nearest",
           "parse_names", "REFERENCE"]

TARGETS: Dict[str, Target] = {target.name: target for target in NVIDIA_TARGETS + AMD_TARGETS}
REFERENCE = TARGETS["sm_80"]  # whose tables the interpreter and the plain ``default_*`` pickers read


def _gfx_key(name: str) -> Tuple[int, int, int]:
    """``gfx942`` -> (9, 4, 2), ``gfx90a`` -> (9, 0, 10): the generation, then the variant."""
    digits = name[3:]
    return int(digits[:-2] or 0, 16), int(digits[-2], 16), int(digits[-1], 16)


def get(name: Union[str, int, Target]) -> Target:
    """The target named ``name``: "sm_90" (or "sm90", "90", 90), "gfx942". Raises ValueError naming the
    known targets for anything else."""
    if isinstance(name, Target):
        return name
    text = str(name).strip().lower()
    if re.fullmatch(r"(sm_?)?\d+", text):
        text = "sm_" + re.sub(r"^sm_?", "", text)
    if text not in TARGETS:
        raise ValueError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)}")
    return TARGETS[text]


def parse_names(text: str) -> Tuple[Target, ...]:
    """``"all"`` or a comma-separated list of target names (``--targets``)."""
    if text.strip().lower() == "all":
        return tuple(TARGETS.values())
    return tuple(get(part) for part in text.split(",") if part.strip())


def nearest(backend: str, arch: Arch) -> Target:
    """The known target closest to an unknown ``arch`` of ``backend`` ("cuda": a capability; "hip": a gfx
    name): the newest known one not newer than it, else the oldest known one."""
    if backend == "hip":
        known = sorted((t for t in AMD_TARGETS), key=lambda t: _gfx_key(t.name))
        key = _gfx_key(str(arch)) if re.fullmatch(r"gfx[0-9a-f]{3,4}", str(arch)) else (0, 0, 0)
        older = [t for t in known if _gfx_key(t.name) <= key]
    else:
        known = sorted(NVIDIA_TARGETS, key=lambda t: t.capability)
        older = [t for t in known if t.capability <= int(arch)]
    return older[-1] if older else known[0]


_WARNED = set()


def _resolve(backend: str, arch: Arch, device_name: str) -> Target:
    name = f"sm_{arch}" if backend == "cuda" else str(arch)
    if name in TARGETS:
        return TARGETS[name]
    fallback = nearest(backend, arch)
    if name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(f"triton-attn: {device_name} ({name}) is not a target the kernels are proven for "
                      f"(known: {', '.join(TARGETS)}); using the configs of the nearest one, {fallback.name}. "
                      "Tune with `triton-attn tune` and check with `triton-attn check`.", RuntimeWarning, stacklevel=3)
    return fallback


def device_arch(index: int) -> Tuple[str, Arch, str]:
    """(backend, arch, device name) of CUDA device ``index``: ("cuda", 90, ...) or, on ROCm, ("hip", "gfx942", ...)
    from the device's ``gcnArchName`` ("gfx942:sramecc+:xnack-")."""
    props = torch.cuda.get_device_properties(index)
    if torch.version.hip is not None:
        arch = str(getattr(props, "gcnArchName", "") or "").split(":")[0]
        return "hip", arch or "unknown", props.name
    return "cuda", props.major * 10 + props.minor, props.name


@functools.lru_cache(maxsize=None)
def _device_target(index: int) -> Target:
    return _resolve(*device_arch(index))


def device_target(device) -> Optional[Target]:
    """The target of a torch device: a ``Target`` for a CUDA (or ROCm) device, None for anything else
    (CPU tensors run under the interpreter). Unknown GPUs get the nearest known target and one warning."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_target(index)
