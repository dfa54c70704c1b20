"""``no_host_reads()``: a context in which triton_attn reading a tensor's value on the host raises.

What a CUDA graph capture (or ``torch.cuda.set_sync_debug_mode("error")``) would reject on a GPU, checked
on CPU: ``Tensor.item``, ``tolist``, ``numpy``, ``__bool__``, ``__int__``, ``__float__`` and ``__index__``
raise ``HostReadError`` when called from a ``triton_attn`` module (the Triton interpreter, torch itself and
the test keep working: they read values by design).
"""

from __future__ import annotations

import contextlib
import sys

import torch

METHODS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")


class HostReadError(AssertionError):
    """triton_attn read a tensor value on the host inside ``no_host_reads``."""


def _caller_is_library(depth: int = 2) -> str:
    frame = sys._getframe(depth)
    name = frame.f_globals.get("__name__", "")
    return f"{name}:{frame.f_lineno}" if name == "triton_attn" or name.startswith("triton_attn.") else ""


@contextlib.contextmanager
def no_host_reads():
    """Raise on every host read of a tensor value made directly by triton_attn code."""
    originals = {name: getattr(torch.Tensor, name) for name in METHODS}

    def guarded(name, original):
        def method(self, *args, **kwargs):
            where = _caller_is_library()
            if where:
                raise HostReadError(f"host read Tensor.{name} of a {tuple(self.shape)} tensor at {where}")
            return original(self, *args, **kwargs)
        return method

    for name, original in originals.items():
        setattr(torch.Tensor, name, guarded(name, original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
