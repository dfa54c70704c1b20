"""The autotune cache file: atomic writes, locking, corrupt and foreign files, concurrent writers."""

from __future__ import annotations

import json
import multiprocessing
import os
import warnings

import pytest

from triton_attn.kernels.tuning import cache as tuning_cache
from triton_attn.kernels.tuning.cache import FORMAT, VERSION, TuningCache, TuningCacheWarning

CONFIG = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_ATTN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_dir_follows_env_var(cache_dir, monkeypatch):
    assert TuningCache().path == cache_dir / "autotune.json"
    monkeypatch.delenv("TRITON_ATTN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_dir.parent / "xdg"))
    assert tuning_cache.default_path() == cache_dir.parent / "xdg" / "triton_attn" / "autotune.json"


def test_put_get_roundtrip_and_file_format(cache_dir):
    cache = TuningCache()
    assert cache.get("k") is None and len(cache) == 0  # no file yet: empty, no warning
    cache.put("k", CONFIG, ms=0.5, triton="3.9.0")
    assert cache.get("k")["config"] == CONFIG
    data = json.loads((cache_dir / "autotune.json").read_text())
    assert data["format"] == FORMAT and data["version"] == VERSION
    assert data["entries"]["k"]["ms"] == 0.5 and data["entries"]["k"]["triton"] == "3.9.0"
    # another process's view (a fresh object) sees it, and sees later changes without a restart
    other = TuningCache()
    assert other.get("k")["config"] == CONFIG
    cache.put("k2", CONFIG, ms=1.0)
    assert other.get("k2") is not None


def test_write_is_atomic_replace_and_leaves_no_temp_files(cache_dir, monkeypatch):
    cache = TuningCache()
    cache.put("a", CONFIG, ms=1.0)
    before = (cache_dir / "autotune.json").read_text()
    calls = []
    real_replace = os.replace

    def failing_replace(src, dst):
        calls.append((src, dst))
        raise OSError("disk full")

    monkeypatch.setattr(tuning_cache.os, "replace", failing_replace)
    with pytest.warns(TuningCacheWarning, match="cannot write"):
        cache.put("b", CONFIG, ms=2.0)
    monkeypatch.setattr(tuning_cache.os, "replace", real_replace)
    # the replace was attempted from a temp file in the same folder; the old file is intact, the temp is gone
    assert calls and os.path.dirname(calls[0][0]) == str(cache_dir)
    assert (cache_dir / "autotune.json").read_text() == before
    assert sorted(p.name for p in cache_dir.iterdir()) == ["autotune.json", "autotune.json.lock"]
    assert cache.get("b") is not None  # kept in memory for this process


@pytest.mark.parametrize("content, reason", [
    ("{not json", "not valid JSON"),
    ("[1, 2, 3]", "not a triton-attn-autotune file"),
    ("\x00\x01binary", "not valid JSON"),
    (json.dumps({"format": FORMAT, "version": 99, "entries": {"x": {"config": CONFIG}}}), "foreign version 99"),
])
def test_corrupt_or_foreign_file_is_ignored_with_one_warning(cache_dir, content, reason):
    cache_dir.mkdir(parents=True)
    (cache_dir / "autotune.json").write_text(content)
    cache = TuningCache()
    with pytest.warns(TuningCacheWarning, match=reason):
        assert cache.get("x") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.get("x") is None  # warned once, not on every call
        assert cache.entries() == {}
    # the next write sets the bad file aside and starts afresh
    cache.put("fresh", CONFIG, ms=1.0)
    assert TuningCache().entries().keys() == {"fresh"}
    aside = [p.name for p in cache_dir.iterdir() if p.name.endswith((".corrupt", ".foreign"))]
    assert len(aside) == 1


def test_malformed_entries_are_dropped_and_good_ones_kept(cache_dir):
    cache_dir.mkdir(parents=True)
    entries = {"good": {"config": CONFIG, "ms": 1.0}, "no_config": {"ms": 1.0},
               "bad_value": {"config": {"BLOCK_M": [1]}}, "nan_ms": {"config": CONFIG, "ms": "x"}}
    (cache_dir / "autotune.json").write_text(json.dumps({"format": FORMAT, "version": VERSION, "entries": entries}))
    with pytest.warns(TuningCacheWarning, match="dropped 3 malformed entries"):
        assert TuningCache().entries().keys() == {"good"}


def test_update_rejects_malformed_records(cache_dir):
    with pytest.raises(ValueError, match="config"):
        TuningCache().update({"k": {"ms": 1.0}})


def test_no_pickle_anywhere():
    source = open(tuning_cache.__file__, encoding="utf-8").read()
    assert "pickle" not in source.replace("never pickled", "").replace("unpickled", "")


def _writer(path: str, worker: int, count: int) -> None:
    cache = TuningCache(path)
    for i in range(count):
        cache.put(f"w{worker}-{i}", dict(CONFIG, BLOCK_N=16 * (i + 1)), ms=float(i), worker=worker)


def test_concurrent_processes_lose_no_entries(tmp_path):
    path = tmp_path / "shared" / "autotune.json"
    workers, per_worker = 4, 15
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_writer, args=(str(path), w, per_worker)) for w in range(workers)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(60)
        assert p.exitcode == 0
    entries = TuningCache(path).entries()
    assert len(entries) == workers * per_worker
    assert entries["w3-14"]["config"]["BLOCK_N"] == 16 * 15 and entries["w3-14"]["worker"] == 3
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
