"""Generated modules (cache directory, atomic writes, import, memo) and running kernels.

Triton's JIT reads a function's source through ``inspect``, so generated source is written to a
module file in the cache directory, atomically (a temp file and ``os.replace``, so concurrent
processes never see half a file), and imported from there. ``launch`` runs a ``@triton.jit``
kernel compiled (CUDA) or under the interpreter (CPU tensors) in the same process:
``interpreter_scope`` keeps the interpreter's patches of ``triton.language`` from leaking into
later compiled launches.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import threading
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

# ---------------------------------------------------------------------------------------------
# Cache directory, module loading, kernel objects
# ---------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """Where generated modules live: ``<settings.cache_dir()>/kernels``, created (a private temporary
    directory, with one warning, when that cannot be written)."""
    from ... import settings

    return settings.writable_cache_dir("kernels")


def write_atomically(path: Path, text: str, *, fsync: bool = False) -> None:
    """Write ``text`` (UTF-8) via a temporary file and ``os.replace``: another process never sees half a file.

    A file that already holds exactly these bytes is left alone; anything else -- other text,
    undecodable bytes, an unreadable file -- is replaced. The file is created like ``open()`` creates
    files, so its mode follows the umask (a cache shared between users stays readable).
    """
    data = text.encode("utf-8")
    try:
        if path.read_bytes() == data:
            return
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.{os.urandom(4).hex()}.tmp")
    handle = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            if fsync:
                stream.flush()
                os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def import_file(module_name: str, path: Path):
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # inspect.getsource finds the file through the module
    spec.loader.exec_module(module)
    return module


def load_module(file_stem: str, source: str) -> Tuple[object, Path]:
    """Write ``source`` to ``<cache_dir>/<file_stem>.py`` (atomically; a stale or corrupt file is
    rewritten) and import it: (module, path)."""
    path = cache_dir() / f"{file_stem}.py"
    write_atomically(path, source)
    return import_file(f"triton_attn_generated_{file_stem}", path), path


class KernelMemo:
    """Process-wide memo of generated objects (function modules) by structure key; ``make()`` runs
    once per key. A lock makes concurrent first calls generate once. ``generated`` counts the
    objects made, which the recompilation tests read."""

    def __init__(self):
        self._items: Dict[str, object] = {}
        self._lock = threading.Lock()
        self.generated = 0

    def get(self, key: str, make: Callable[[], object]):
        with self._lock:
            item = self._items.get(key)
            if item is None:
                item = self._items[key] = make()
                self.generated += 1
            return item


# ---------------------------------------------------------------------------------------------
# The interpreter inside a process that also compiles
# ---------------------------------------------------------------------------------------------

_INTERPRETER_LOCK = threading.RLock()
_NESTED_INTERPRETED: Dict[int, Tuple[object, object]] = {}


def _interpret_nested_call(jit_function, *args, **kwargs):
    """``JITFunction.__call__`` while an interpreted kernel runs: interpret the callee too.

    Triton's standard library (``tl.zeros``, ``tl.max``, ``tl.sum``, ...) is made of
    ``@triton.jit`` functions. Imported without ``TRITON_INTERPRET=1`` they are ``JITFunction``s,
    whose ``__call__`` refuses to run outside a compiled kernel; the interpreter needs them as
    ``InterpretedFunction``s, which is what they would have been under the environment variable.
    """
    from triton.runtime.interpreter import InterpretedFunction

    entry = _NESTED_INTERPRETED.get(id(jit_function))
    if entry is None or entry[0] is not jit_function:
        entry = (jit_function, InterpretedFunction(jit_function.fn))
        _NESTED_INTERPRETED[id(jit_function)] = entry
    return entry[1](*args, **kwargs)


@contextlib.contextmanager
def interpreter_scope():
    """Run Triton's interpreter in a process whose ``triton.language`` is set up for compiling.

    The interpreter patches ``triton.language`` (and, for nested standard-library calls,
    ``triton.language.core``) while a kernel runs and does not undo every nested patch. This
    scope routes nested ``JITFunction`` calls to the interpreter and afterwards restores the
    namespaces exactly, so later compiled launches in the same process see an untouched Triton.
    """
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    with _INTERPRETER_LOCK:
        owners = [tl, tl.core, tl.math, tl.core.tensor, tl.standard]
        saved = [(owner, dict(vars(owner))) for owner in owners]
        original_call = JITFunction.__call__
        JITFunction.__call__ = _interpret_nested_call
        try:
            yield
        finally:
            JITFunction.__call__ = original_call
            for owner, before in saved:
                if isinstance(owner, type):  # e.g. the tensor class's interpreter-only __index__
                    for name in set(vars(owner)) - set(before):
                        delattr(owner, name)
                # Names the interpreter *added* to a module are its own helpers, injected into
                # the globals of every function it rewrites (and cached with them): they shadow
                # nothing, and rewritten functions still need them, so they stay.
                for name, value in before.items():
                    if vars(owner).get(name, _MISSING) is not value:
                        setattr(owner, name, value)


_MISSING = object()


class InterpretedKernel:
    """``kernel[grid](*args, **constexprs)`` under the Triton interpreter, on CPU tensors.

    ``function``: a ``@triton.jit`` kernel (its plain Python function is interpreted) or a plain
    function.
    """

    def __init__(self, function: Callable):
        from triton.runtime.interpreter import InterpretedFunction

        self.function = InterpretedFunction(getattr(function, "fn", function))

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            with interpreter_scope():
                return self.function[grid](*args, **kwargs)
        return launch


_INTERPRETED: Dict[int, Tuple[object, InterpretedKernel]] = {}


def interpreted(kernel) -> InterpretedKernel:
    """The interpreted twin of a ``@triton.jit`` kernel (built once per kernel)."""
    entry = _INTERPRETED.get(id(kernel))
    if entry is None or entry[0] is not kernel:
        entry = _INTERPRETED[id(kernel)] = (kernel, InterpretedKernel(kernel))
    return entry[1]


# Passed explicitly to every compile: Triton 3.10 flips its default to off, and the softmax wants
# ``scores * scale - shift`` as one FMA per score.
ENABLE_FP_FUSION = True


def launch(kernel, grid, arguments: Dict[str, object], *, interpret: bool, device, num_warps: Optional[int] = None,
           num_stages: Optional[int] = None, options: Optional[Dict[str, int]] = None) -> None:
    """Run a ``@triton.jit`` kernel with named ``arguments`` (runtime and constexpr): compiled on
    ``device`` (CUDA) with these compile options, or under the interpreter (CPU tensors).
    ``options``: further compile options (a config's ``amd_options``)."""
    if interpret:
        interpreted(kernel)[grid](**arguments)
        return
    import torch

    # FP fusion stated explicitly: Triton 3.9 warns that its default flips in 3.10.
    compile_options = {name: value for name, value in (("num_warps", num_warps), ("num_stages", num_stages))
                       if value is not None}
    compile_options.update(options or {})
    compile_options["enable_fp_fusion"] = ENABLE_FP_FUSION
    with torch.cuda.device(device):
        kernel[grid](**arguments, **compile_options)
