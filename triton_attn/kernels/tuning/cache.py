"""The on-disk cache of autotuning winners: one JSON file, shared by every process of a user.

Where: ``settings.cache_dir()`` -- ``$TRITON_ATTN_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/triton_attn``
(``~/.cache/triton_attn``), the folder that also holds the generated modules (``<dir>/kernels``).
File: ``autotune.json``::

    {"format": "triton-attn-autotune", "version": 1,
     "entries": {"<key string>": {"config": {"BLOCK_M": 128, ...}, "ms": 0.42, ...}, ...}}

Rules:

- Writes are atomic: the new content goes to a temporary file in the same folder, is flushed to
  disk, then ``os.replace``-d over the old file. A reader sees the old file or the new one, never a
  half-written one.
- Writers take an exclusive ``filelock.FileLock`` on a sidecar ``autotune.json.lock`` and *read, merge,
  write* under it, so concurrent tuning processes lose no entries. Readers need no lock.
- Files are created with the process's umask, so a cache directory shared between users works.
- A corrupt file (not JSON, not the expected shape) or one of another format version is ignored
  with one warning, never an exception; the next write moves it aside (``autotune.json.corrupt`` /
  ``autotune.json.v<N>``) and starts afresh. Malformed entries are dropped one by one.
- JSON only: nothing is ever unpickled, so a cache file cannot run code.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

import filelock

from ... import settings
from ..jit.modules import write_atomically

FORMAT = "triton-attn-autotune"
VERSION = 1
FILE_NAME = "autotune.json"
# Seconds a writer waits for another process's lock before giving up (with a warning).
LOCK_TIMEOUT = 60.0


class TuningCacheWarning(UserWarning):
    """The cache file could not be used (corrupt, foreign version, unwritable); tuning results are not lost
    from memory, and calls go on with defaults."""


def default_path() -> Path:
    """``autotune.json`` in ``settings.cache_dir()`` (read at call time)."""
    return settings.cache_dir() / FILE_NAME


def _valid_entry(value: Any) -> bool:
    if not isinstance(value, dict):
        return False
    config = value.get("config")
    if not isinstance(config, dict) or not config:
        return False
    if not all(isinstance(k, str) and isinstance(v, (int, str, bool)) for k, v in config.items()):
        return False
    ms = value.get("ms")
    return ms is None or (isinstance(ms, (int, float)) and not isinstance(ms, bool) and math.isfinite(ms))


class TuningCache:
    """A JSON file of ``key string -> record`` with atomic, locked, merging writes.

    ``get`` is cheap on the call path: the parsed file is kept in memory and re-read only when the file's
    (mtime, size, inode) changes.
    """

    def __init__(self, path: Optional[os.PathLike] = None):
        self._explicit = Path(path) if path is not None else None
        self._memory: Dict[str, dict] = {}
        self._stamp: Optional[Tuple] = None
        self._loaded_path: Optional[Path] = None
        self._warned: set = set()
        self._thread_lock = threading.Lock()

    # -- location -----------------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        """The cache file; follows ``settings.cache_dir()`` at call time unless a path was given."""
        return self._explicit if self._explicit is not None else default_path()

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    # -- reading ------------------------------------------------------------------------------------------
    def _warn(self, path: Path, reason: str) -> None:
        token = (str(path), reason)
        if token in self._warned:
            return
        self._warned.add(token)
        warnings.warn(f"triton-attn: ignoring autotune cache {path}: {reason}; default kernel configs are used "
                      f"and the next tuning run rewrites it", TuningCacheWarning, stacklevel=3)

    def _parse(self, path: Path) -> Tuple[Dict[str, dict], Optional[str]]:
        """(entries, problem): problem is None for a good file, else a short reason ('corrupt: ...', 'v2')."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}, None
        except (OSError, UnicodeDecodeError) as error:
            return {}, f"corrupt: cannot read it ({error})"
        try:
            data = json.loads(text)
        except ValueError as error:
            return {}, f"corrupt: not valid JSON ({error})"
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
            return {}, f"corrupt: not a {FORMAT} file"
        if data.get("version") != VERSION:
            return {}, f"foreign version {data.get('version')!r} (this triton-attn reads version {VERSION})"
        entries = {}
        dropped = 0
        for key, value in data["entries"].items():
            if isinstance(key, str) and _valid_entry(value):
                entries[key] = value
            else:
                dropped += 1
        if dropped:
            self._warn(path, f"dropped {dropped} malformed entr{'y' if dropped == 1 else 'ies'}")
        return entries, None

    @staticmethod
    def _stat(path: Path) -> Optional[Tuple]:
        try:
            st = path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _refresh(self) -> None:
        path = self.path
        stamp = self._stat(path)
        if path == self._loaded_path and stamp == self._stamp:
            return
        entries, problem = self._parse(path)
        if problem:
            self._warn(path, problem)
        self._memory, self._stamp, self._loaded_path = entries, stamp, path

    def entries(self) -> Dict[str, dict]:
        """A copy of every usable entry in the file."""
        with self._thread_lock:
            self._refresh()
            return dict(self._memory)

    def get(self, key: str) -> Optional[dict]:
        with self._thread_lock:
            self._refresh()
            record = self._memory.get(key)
            return dict(record) if record is not None else None

    def __len__(self) -> int:
        return len(self.entries())

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    # -- writing ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock_path = self.lock_path
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with filelock.FileLock(str(lock_path), timeout=LOCK_TIMEOUT):
            yield

    def _write_atomic(self, path: Path, entries: Mapping[str, dict]) -> None:
        payload = {"format": FORMAT, "version": VERSION, "entries": dict(sorted(entries.items()))}
        write_atomically(path, json.dumps(payload, indent=1, sort_keys=False, allow_nan=False), fsync=True)

    def update(self, new_entries: Mapping[str, dict]) -> None:
        """Merge ``new_entries`` into the file (read-merge-write under the lock; later writes win per key).

        Raises ``ValueError`` for a malformed record; an unwritable cache folder gives a warning, and the
        entries stay in this process's memory.
        """
        for key, value in new_entries.items():
            if not isinstance(key, str) or not _valid_entry(value):
                raise ValueError(f"autotune cache record for {key!r} must be {{'config': {{name: int}}, 'ms': float}}, "
                                 f"got {value!r}")
        path = self.path
        with self._thread_lock:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with self._locked():
                    current, problem = self._parse(path)
                    if problem:
                        self._warn(path, problem)
                        suffix = ".corrupt" if problem.startswith("corrupt") else ".foreign"
                        with contextlib.suppress(OSError):
                            os.replace(path, path.with_name(path.name + suffix))
                    current.update({k: dict(v) for k, v in new_entries.items()})
                    self._write_atomic(path, current)
                    self._memory, self._stamp, self._loaded_path = current, self._stat(path), path
            except OSError as error:
                self._warn(path, f"cannot write it ({error})")
                self._memory.update({k: dict(v) for k, v in new_entries.items()})

    def put(self, key: str, config: Mapping[str, Any], ms: Optional[float] = None, **extra: Any) -> None:
        """Store one winner: ``config`` (field -> int), its time in ms, and any JSON-able metadata."""
        record = {"config": dict(config), "ms": None if ms is None else float(ms),
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        record.update(extra)
        self.update({key: record})

    def clear(self) -> None:
        """Remove every entry (the file is rewritten empty, under the lock)."""
        path = self.path
        with self._thread_lock:
            path.parent.mkdir(parents=True, exist_ok=True)
            with self._locked():
                self._write_atomic(path, {})
                self._memory, self._stamp, self._loaded_path = {}, self._stat(path), path


_DEFAULT: Optional[TuningCache] = None


def default_cache() -> TuningCache:
    """The process-wide cache object (its path follows ``settings.cache_dir()`` at call time)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = TuningCache()
    return _DEFAULT
