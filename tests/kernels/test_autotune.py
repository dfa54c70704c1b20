"""Autotuning: keys, search space, pruning (ahead-of-time for sm_80/sm_90, no GPU), call-time selection."""

from __future__ import annotations

import importlib
import json
import time
import warnings

import pytest
import torch

from tests.helpers.toolchain import nvidia_toolchain_available
from triton_attn.kernels.tuning import search as autotune
from triton_attn.kernels.tuning.cache import TuningCache, TuningCacheWarning
from triton_attn.kernels.tuning.search import Autotuner, KernelConfig, TuningKey
from triton_attn.masks import causal_mask, create_block_mask, sliding_window_mask


def _key(**overrides) -> TuningKey:
    fields = dict(kernel="fwd", device="NVIDIA H100 80GB HBM3", capability=90, dtype="bfloat16", head_dim=128,
                  value_dim=128, gqa=4, q_bucket=4096, kv_bucket=4096, sparsity="half")
    fields.update(overrides)
    return TuningKey(**fields)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_ATTN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TRITON_ATTN_AUTOTUNE", raising=False)
    return TuningCache(tmp_path / "autotune.json")


# -- keys ----------------------------------------------------------------------------------------------------

def test_key_string_roundtrip_and_fields():
    key = _key(variant="score")
    text = str(key)
    assert text == "fwd|NVIDIA H100 80GB HBM3|sm90|bfloat16|d128|dv128|gqa4|q4096|kv4096|half|score"
    assert TuningKey.parse(text) == key
    assert TuningKey.parse(str(_key())) == _key()
    with pytest.raises(ValueError, match="kernel"):
        _key(kernel="sideways")
    with pytest.raises(ValueError, match="not a tuning key"):
        TuningKey.parse("fwd|x")


def test_seq_buckets_and_sparsity_classes():
    assert [autotune.seq_bucket(n) for n in (1, 16, 17, 1000, 1024, 1025, 10**7)] == [
        16, 16, 32, 1024, 1024, 2048, 1 << 17]
    assert autotune.block_mask_sparsity_class(None) == "dense"
    causal = create_block_mask(causal_mask, None, None, 2048, 2048)
    window = create_block_mask(sliding_window_mask(128), None, None, 4096, 4096)
    assert autotune.block_mask_sparsity_class(causal) == "half"
    assert autotune.block_mask_sparsity_class(window) == "tiny"
    assert autotune.sparsity_class(0.2) == "sparse"


def test_make_key_from_tensors():
    q = torch.randn(2, 8, 300, 64)
    k = v = torch.randn(2, 2, 1000, 64)
    key = autotune.make_key(q, k, v, create_block_mask(causal_mask, None, None, 300, 1000))
    assert (key.device, key.capability, key.gqa, key.q_bucket, key.kv_bucket, key.dtype) == \
        ("cpu", 0, 4, 512, 1024, "float32")


# -- search space --------------------------------------------------------------------------------------------

def test_search_space_fits_block_mask_and_has_hopper_variants():
    ampere = autotune.search_space("fwd", 80, head_dim=128)
    hopper = autotune.search_space("fwd", 90, head_dim=128)
    assert len(set(ampere)) == len(ampere) and set(ampere) < set(hopper)
    assert {c.num_stages for c in hopper} - {c.num_stages for c in ampere} == {4, 5}
    for config in hopper:
        assert 128 % config.BLOCK_M == 0 and 128 % config.BLOCK_N == 0
    small = autotune.search_space("fwd", 90, block_size=(64, 32))
    assert all(c.BLOCK_M <= 64 and c.BLOCK_N <= 32 for c in small) and len(small) < len(hopper)
    assert all(c.BLOCK_M * c.BLOCK_N <= 128 * 64 for c in autotune.search_space("fwd", 90, head_dim=256))
    assert all(c.BLOCK_M == 16 for c in autotune.search_space("fwd", 80, q_len=1))
    assert autotune.search_space("bwd", 80) and autotune.search_space("bwd", 90)
    with pytest.raises(ValueError, match="kernel"):
        autotune.search_space("nope", 80)


# -- pruning (fake compiler) ---------------------------------------------------------------------------------

def test_prune_drops_over_shared_memory_spills_and_compile_errors():
    configs = [KernelConfig(64, 64, 4, 2), KernelConfig(128, 128, 8, 5), KernelConfig(128, 64, 4, 3),
               KernelConfig(64, 32, 4, 2)]

    def fake_compile(config):
        if config.BLOCK_N == 32:
            raise RuntimeError("PassManager::run failed\nmore detail")
        shared = config.num_stages * config.BLOCK_N * 288
        spills = 64 if config.num_warps == 4 and config.BLOCK_M == 128 else 0
        return {"shared_mem": shared, "n_regs": 200, "n_spills": spills}

    seen = []
    result = autotune.prune(configs, fake_compile, capability=80, progress=lambda c, r: seen.append(c))
    assert result.kept == [KernelConfig(64, 64, 4, 2)]
    assert "shared memory" in result.dropped[KernelConfig(128, 128, 8, 5)]
    assert "spills" in result.dropped[KernelConfig(128, 64, 4, 3)]
    assert result.dropped[KernelConfig(64, 32, 4, 2)] == "does not compile: RuntimeError: PassManager::run failed"
    assert seen == configs
    # sm_90 has more shared memory: the 5-stage 128x128 tile (184320 B) fits there
    assert KernelConfig(128, 128, 8, 5) in autotune.prune(configs, fake_compile, capability=90).kept


def test_shared_memory_limits():
    assert autotune.shared_memory_limit(80) == 166912
    assert autotune.shared_memory_limit(90) == 232448
    assert autotune.shared_memory_limit(89) == 101376
    assert autotune.shared_memory_limit(95) == 232448  # unknown: the closest older architecture


# -- call-time selection -------------------------------------------------------------------------------------

def test_no_entry_returns_default_at_once_without_running(cache):
    tuner = Autotuner(cache)
    default = KernelConfig(128, 64, 8, 3)
    runs = []
    start = time.perf_counter()
    chosen = tuner.select(_key(), default, candidates=lambda: [KernelConfig(64, 64, 4, 2)], run=runs.append)
    assert chosen == default and runs == [] and time.perf_counter() - start < 0.5
    assert tuner.lookup(_key()) is None


def test_opt_in_tuning_picks_fastest_and_persists(cache, monkeypatch):
    speeds = {KernelConfig(64, 64, 4, 2): 3.0, KernelConfig(128, 64, 8, 3): 1.0, KernelConfig(128, 128, 8, 3): 2.0}
    current = {}

    def run(config):
        if config == KernelConfig(128, 128, 8, 3):
            raise RuntimeError("out of resources: shared memory")
        current["config"] = config

    monkeypatch.setattr(autotune, "time_ms", lambda fn, device=None: (fn(), speeds[current["config"]])[1])
    tuner = Autotuner(cache)
    chosen = tuner.select(_key(), KernelConfig(64, 64, 4, 2), autotune=True, candidates=lambda: list(speeds), run=run)
    assert chosen == KernelConfig(128, 64, 8, 3)
    record = cache.get(str(_key()))
    assert {k: record["config"][k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")} == \
        {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    assert record["ms"] == 1.0 and record["candidates"] == 2 and "torch" in record["versions"]
    # a new process (fresh tuner) uses the winner with no search
    fresh = Autotuner(TuningCache(cache.path))
    assert fresh.select(_key(), KernelConfig(64, 64, 4, 2), autotune=True, run=lambda c: pytest.fail("searched")) \
        == KernelConfig(128, 64, 8, 3)
    # other keys are untouched
    assert fresh.lookup(_key(dtype="float16")) is None


def test_env_var_turns_tuning_on(cache, monkeypatch):
    monkeypatch.setenv("TRITON_ATTN_AUTOTUNE", "1")
    monkeypatch.setattr(autotune, "time_ms", lambda fn, device=None: 1.0)
    tuner = Autotuner(cache)
    ran = []
    assert tuner.select(_key(), KernelConfig(64, 64, 4, 2), candidates=lambda: [KernelConfig(32, 64, 4, 2)],
                        run=ran.append) == KernelConfig(32, 64, 4, 2)
    assert ran


def test_corrupt_cache_means_default_with_warning_not_crash(cache):
    cache.path.write_text("{{{ not json")
    tuner = Autotuner(TuningCache(cache.path))
    with pytest.warns(TuningCacheWarning, match="corrupt"):
        assert tuner.select(_key(), KernelConfig(64, 64, 4, 2)) == KernelConfig(64, 64, 4, 2)
    # an entry whose config no longer matches KernelConfig's fields is skipped with a warning
    cache.path.write_text(json.dumps({"format": "triton-attn-autotune", "version": 1,
                                      "entries": {str(_key()): {"config": {"BLOCK_M": 64}, "ms": 1.0}}}))
    with pytest.warns(RuntimeWarning, match="lacks"):
        assert Autotuner(TuningCache(cache.path)).lookup(_key()) is None


def test_tuning_with_the_interpreter_end_to_end(cache):
    """The real launcher as ``run``: every candidate launches under the Triton interpreter on CPU."""
    pytest.importorskip("triton")
    launch = importlib.import_module("triton_attn.kernels.attention.forward_launch")
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    block_mask = create_block_mask(causal_mask, None, None, 64, 64, BLOCK_SIZE=32)
    key = autotune.make_key(q, k, v, block_mask)
    candidates = [KernelConfig(32, 32, 4, 2), KernelConfig(16, 32, 4, 2)]
    outputs = []

    def run(config):
        out, _ = launch.attention_forward(q, k, v, block_mask, score_mod=None, scale=0.25, interpret=True,
                                          config=config)
        outputs.append(out)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = Autotuner(cache).tune(key, candidates, run)
    assert result.best in candidates and set(result.timings) == set(candidates) and not result.failures
    torch.testing.assert_close(outputs[0], outputs[-1])
    assert Autotuner(TuningCache(cache.path)).lookup(key) == result.best


# -- ahead-of-time pruning for real targets (no GPU needed) -------------------------------------------------

def _aot_or_skip():
    pytest.importorskip("triton")
    if not nvidia_toolchain_available(80, 90):
        pytest.skip("Triton's NVIDIA backend is not installed: AOT pruning untested")


@pytest.mark.parametrize("arch, too_big, reason", [
    (80, KernelConfig(128, 128, 8, 5), "shared memory"),   # 5 stages of 128x128 K/V tiles: ~288 KB > 163 KB
    (90, KernelConfig(128, 128, 4, 3), "spills"),          # fits 227 KB, but 4 warps cannot hold the tile
])
def test_aot_pruning_for_sm80_and_sm90(arch, too_big, reason):
    _aot_or_skip()
    from triton_attn.kernels.attention.aot import aot_compile_fn

    fits = KernelConfig(64, 64, 4, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compile_fn = aot_compile_fn(arch, head_dim=128, dtype=torch.bfloat16, mask_mod=causal_mask)
        result = autotune.prune([fits, too_big], compile_fn, capability=arch)
    assert result.kept == [fits], result.dropped
    assert reason in result.dropped[too_big]
    stats = result.stats[fits]
    assert 0 < stats.shared <= autotune.shared_memory_limit(arch) and stats.spills == 0 and 0 < stats.registers <= 255


def test_aot_pruning_of_the_backward_kernels():
    """The bwd search space is pruned the same way: both backward kernels compiled per candidate."""
    _aot_or_skip()
    from triton_attn.kernels.attention.aot import aot_compile_fn
    from triton_attn.kernels.attention.backward_launch import backward_pair

    fits = KernelConfig(32, 64, 8, 2)       # the D <= 128 main config: dK/dV holds 64 keys, dQ 64 rows
    too_big = KernelConfig(64, 128, 4, 2)   # 128 keys x D=128 K, V and two fp32 accumulators on 4 warps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compile_fn = aot_compile_fn(80, head_dim=128, dtype=torch.bfloat16, mask_mod=causal_mask, kernel="bwd")
        result = autotune.prune([fits, too_big], compile_fn, capability=80)
    assert result.kept == [fits], result.dropped
    assert "spills" in result.dropped[too_big] or "shared memory" in result.dropped[too_big]
    stats = result.stats[fits]
    assert 0 < stats.shared <= autotune.shared_memory_limit(80) and stats.spills == 0 and 0 < stats.registers <= 255
    assert backward_pair(fits).dq == KernelConfig(64, 32, 8, 2)


def test_backward_launch_searches_the_two_kernels_independently_and_only_when_asked(cache):
    from triton_attn.kernels.attention.configs import default_backward_config
    from triton_attn.kernels.tuned import tuned_backward_config

    q = torch.randn(1, 4, 256, 64, dtype=torch.float16)
    k, v = torch.randn(1, 2, 256, 64, dtype=torch.float16), torch.randn(1, 2, 256, 64, dtype=torch.float16)
    block_mask = create_block_mask(causal_mask, None, None, 256, 256)
    default = default_backward_config(64, 64, torch.float16, (128, 128), 256, 256)
    runs, timed = [], []

    def run(pair):
        runs.append(pair)
        return {"dkdv": lambda: timed.append(("dkdv", pair)), "dq": lambda: timed.append(("dq", pair))}

    # Nothing cached, tuning off: the heuristic config at once, nothing run.
    assert tuned_backward_config(q, k, v, block_mask, None, default, False, run=run) is default and not runs
    # Tuning on: dK/dV candidates run with the default dQ tiles and only the dK/dV launch is timed, and
    # the other way round; each kernel's winner is stored under its own key.
    chosen = tuned_backward_config(q, k, v, block_mask, None, default, True, run=run)
    assert runs and all(pair.dq == default.dq or pair.dkdv == default.dkdv for pair in runs)
    assert {name for name, _ in timed} == {"dkdv", "dq"}
    assert all((pair.dq == default.dq) if name == "dkdv" else (pair.dkdv == default.dkdv) for name, pair in timed)
    assert chosen.dkdv in {pair.dkdv for pair in runs} and chosen.dq in {pair.dq for pair in runs}
    # ...and the next call (a fresh process, same cache file) uses them with no search.
    count = len(runs)
    autotune.autotuner().forget_memory()
    assert tuned_backward_config(q, k, v, block_mask, None, default, False, run=run) == chosen
    assert len(runs) == count


def test_backward_search_times_both_launches_of_a_split_dkdv_kernel(cache):
    """A default that splits dK/dV (the Hopper head_dim 128 one) keeps splitting: each dK/dV candidate is timed
    on its dV and dK launches together, and its winner is cached under a key of its own ("split")."""
    from dataclasses import replace

    from triton_attn.kernels.attention.configs import default_backward_config
    from triton_attn.kernels.tuned import tuned_backward_config

    q = torch.randn(1, 4, 256, 64, dtype=torch.float16)
    k, v = torch.randn(1, 2, 256, 64, dtype=torch.float16), torch.randn(1, 2, 256, 64, dtype=torch.float16)
    block_mask = create_block_mask(causal_mask, None, None, 256, 256)
    fused = default_backward_config(64, 64, torch.float16, (128, 128), 256, 256)
    split = replace(fused, split_dkdv=True)
    timed = []

    def run(pair):
        assert pair.split_dkdv
        return {"dv": lambda: timed.append("dv"), "dk": lambda: timed.append("dk"), "dq": lambda: timed.append("dq")}

    chosen = tuned_backward_config(q, k, v, block_mask, None, split, True, run=run)
    assert chosen.split_dkdv and {"dv", "dk", "dq"} == set(timed)
    assert timed.count("dv") == timed.count("dk")  # the two launches of one candidate run together
    keys = list(autotune.autotuner().cache.entries())
    assert any(key.startswith("bwd_dkdv|") and key.endswith("|split") for key in keys), keys
    # The fused kernel's tiles are a separate search: nothing cached for it yet.
    autotune.autotuner().forget_memory()
    assert tuned_backward_config(q, k, v, block_mask, None, fused, False, run=run).dkdv == fused.dkdv

def test_key_separates_occupancy_block_size_ragged_tail_and_structure():
    q = torch.randn(2, 4, 300, 64)
    k, v = torch.randn(2, 4, 300, 64), torch.randn(2, 4, 300, 64)
    key = autotune.make_key(q, k, v, create_block_mask(causal_mask, None, None, 300, 300, BLOCK_SIZE=64),
                            structure="abcd1234")
    assert (key.occupancy, key.block, key.ragged, key.structure) == (8, "64x64", True, "abcd1234")
    assert TuningKey.parse(str(key)) == key
    even = autotune.make_key(q[:, :, :256], k[:, :, :256], v[:, :, :256],
                             create_block_mask(causal_mask, None, None, 256, 256, BLOCK_SIZE=64), structure="abcd1234")
    assert not even.ragged and str(even) != str(key)
    wide = autotune.make_key(q[:1].expand(64, 4, 300, 64), k, v, create_block_mask(causal_mask, None, None, 300, 300))
    assert wide.occupancy == 256 and wide.block == "128x128" and str(wide) != str(key)
    # Keys written before these fields existed still parse (and simply never match a new key).
    assert TuningKey.parse(str(_key())).occupancy == 0


def test_tune_times_the_prepared_launch_alone(cache):
    """``run`` may prepare the call (tracing, layouts, allocation) and hand back the launch: only the
    launch is timed, the host work runs once per candidate."""
    counts = {"prepared": 0, "launched": 0}

    def run(config):
        counts["prepared"] += 1
        return lambda: counts.__setitem__("launched", counts["launched"] + 1)

    result = Autotuner().tune(_key(capability=0, device="cpu"), [KernelConfig(64, 64, 4, 2)], run, store=False)
    assert result.best == KernelConfig(64, 64, 4, 2)
    assert counts["prepared"] == 1 and counts["launched"] > 1
