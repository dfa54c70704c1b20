"""Every ``TRITON_ATTN_*`` environment variable in one place, read at call time (never cached at import).

- ``TRITON_ATTN_BACKEND``: ``torch`` | ``triton`` | ``interpret``; overrides the default backend choice
  of ``attention()`` (``backend()``).
- ``TRITON_ATTN_AUTOTUNE``: ``1``/``true``/``yes``/``on`` lets a call with no tuned config search the
  config table now (``autotune()``; default off).
- ``TRITON_ATTN_GPU_REFINE``: ``0`` keeps the mask compiler's eager refinement of undecided tiles on CUDA
  instead of the Triton kernel (``gpu_refine()``; default on).
- ``TRITON_ATTN_LOG``: a comma-separated list of what to print to stderr; ``route`` prints each distinct
  route a call takes, with its reasons (``log_routes()``; ``dispatch.py``).
- ``TRITON_ATTN_CACHE_DIR``: where generated modules (``<dir>/kernels``) and the tuning cache
  (``<dir>/autotune.json``) live. One rule for both (``cache_dir()``): ``$TRITON_ATTN_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/triton_attn``, else ``~/.cache/triton_attn``.

A cache directory that cannot be used (read-only, or a path that is a file) must not make the Triton
backends unusable: ``writable_cache_dir()`` then falls back to a private temporary directory for this
process, with one warning naming the variable. Files are written with the process's umask (as ``open``
does), so a cache directory can be shared between users.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Dict, Optional

BACKEND = "TRITON_ATTN_BACKEND"
AUTOTUNE = "TRITON_ATTN_AUTOTUNE"
GPU_REFINE = "TRITON_ATTN_GPU_REFINE"
CACHE_DIR = "TRITON_ATTN_CACHE_DIR"
LOG = "TRITON_ATTN_LOG"
VARIABLES = (BACKEND, AUTOTUNE, GPU_REFINE, CACHE_DIR, LOG)

_TRUE = ("1", "true", "yes", "on")


class CacheDirWarning(UserWarning):
    """The configured cache directory cannot be written; a private temporary one is used instead."""


def backend() -> Optional[str]:
    """``$TRITON_ATTN_BACKEND`` (None when unset or empty); validated by the caller."""
    return os.environ.get(BACKEND) or None


def autotune() -> bool:
    """Whether ``$TRITON_ATTN_AUTOTUNE`` asks for searches."""
    return os.environ.get(AUTOTUNE, "").strip().lower() in _TRUE


def gpu_refine() -> bool:
    """Whether the mask compiler may refine tiles with the Triton kernel on CUDA (``$TRITON_ATTN_GPU_REFINE`` != 0)."""
    return os.environ.get(GPU_REFINE, "1").strip() != "0"


def log_routes() -> bool:
    """Whether ``$TRITON_ATTN_LOG`` names ``route``."""
    value = os.environ.get(LOG)
    return bool(value) and "route" in (part.strip().lower() for part in value.split(","))


def cache_dir() -> Path:
    """The configured cache directory (not created): the variable, else the XDG rule."""
    override = os.environ.get(CACHE_DIR)
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "triton_attn"


_USABLE: Dict[str, Path] = {}
_LOCK = threading.Lock()
_PRIVATE: Optional[Path] = None


def _usable(path: Path) -> Optional[str]:
    """None when ``path`` is (or can be made) a directory this process can write; else why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not path.is_dir():
            return "it is not a directory"
        handle, probe = tempfile.mkstemp(dir=path, prefix=".write-test.")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        return f"{type(error).__name__}: {error}"
    return None


def writable_cache_dir(sub: str = "") -> Path:
    """``cache_dir() / sub``, created; a private temporary directory (one warning) when that fails."""
    global _PRIVATE
    wanted = cache_dir() / sub if sub else cache_dir()
    key = str(wanted)
    with _LOCK:
        if key in _USABLE:
            return _USABLE[key]
        problem = _usable(wanted)
        if problem is None:
            _USABLE[key] = wanted
            return wanted
        if _PRIVATE is None:
            _PRIVATE = Path(tempfile.mkdtemp(prefix="triton_attn-"))
            atexit.register(shutil.rmtree, _PRIVATE, True)
        fallback = _PRIVATE / sub if sub else _PRIVATE
        fallback.mkdir(parents=True, exist_ok=True)
        source = f"${CACHE_DIR}" if os.environ.get(CACHE_DIR) else "the default cache directory (XDG rule)"
        warnings.warn(f"triton-attn: cannot write the cache directory {wanted} from {source} ({problem}); using "
                      f"the private temporary directory {fallback} for this process. Set {CACHE_DIR} to a "
                      "writable directory to keep compiled kernels and tuning results.", CacheDirWarning,
                      stacklevel=3)
        _USABLE[key] = fallback
        return fallback
