"""The targets table (``kernels.targets``): limits, resolution of a device, per-target configs, dot precision and
the search space. No compiler here (``test_targets_aot.py`` builds the kernels)."""

from __future__ import annotations

import dataclasses
import warnings
from types import SimpleNamespace

import pytest
import torch

from triton_attn.kernels import targets
from triton_attn.kernels.attention.configs import (
    FLOAT32_BACKWARD_CONFIGS,
    FLOAT32_CONFIGS,
    HOPPER_BACKWARD_CONFIGS,
    MAIN_BACKWARD_CONFIGS,
    MAIN_CONFIGS,
    KernelConfig,
    default_backward_config,
    default_config,
)
from triton_attn.kernels.attention.tiling import kernel_constexprs
from triton_attn.kernels.decode.configs import DECODE_PICKS, default_decode_config
from triton_attn.kernels.host import fast_tanh
from triton_attn.kernels.tuning import search

EXPECTED = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120", "gfx90a", "gfx942", "gfx950")


def test_the_table_lists_every_supported_target_with_its_limits():
    assert tuple(targets.TARGETS) == EXPECTED
    for target in targets.TARGETS.values():
        assert target.warp_size == (64 if target.is_amd else 32), target
        assert target.float32_dot in target.dot_precisions, target
        assert target.dot_precision(torch.bfloat16) in target.dot_precisions, target
        assert target.max_registers == (512 if target.is_amd else 255), target
        assert target.tensor_instructions == ("mfma" if target.is_amd else target.tensor_instructions)
        for table in (target.tables.forward, target.tables.forward_float32, target.tables.backward,
                      target.tables.backward_float32):
            assert sorted(table) == [64, 128, 256], target
        assert set(target.tables.decode) == set(DECODE_PICKS), target
    limits = {name: t.shared_memory for name, t in targets.TARGETS.items()}
    assert limits == {"sm_80": 166912, "sm_86": 101376, "sm_89": 101376, "sm_90": 232448, "sm_100": 232448,
                      "sm_120": 101376, "gfx90a": 65536, "gfx942": 65536, "gfx950": 163840}
    assert {t.name: t.tensor_instructions for t in targets.TARGETS.values() if not t.is_amd} == {
        "sm_80": "mma.sync", "sm_86": "mma.sync", "sm_89": "mma.sync", "sm_90": "wgmma", "sm_100": "tcgen05",
        "sm_120": "mma.sync"}


def test_names_resolve_in_every_spelling_and_unknown_names_are_refused():
    assert targets.get(90) is targets.get("sm_90") is targets.get("SM90") is targets.get("90")
    assert targets.get("gfx942").backend == "hip"
    assert targets.parse_names("all") == tuple(targets.TARGETS.values())
    assert [t.name for t in targets.parse_names("sm_120, gfx950")] == ["sm_120", "gfx950"]
    with pytest.raises(ValueError, match="unknown target 'sm_75'.*known targets: sm_80"):
        targets.get("sm_75")


def test_nearest_known_target_for_unknown_architectures():
    assert targets.nearest("cuda", 87).name == "sm_86"
    assert targets.nearest("cuda", 103).name == "sm_100"
    assert targets.nearest("cuda", 121).name == "sm_120"
    assert targets.nearest("cuda", 75).name == "sm_80"     # older than every known one: the oldest
    assert targets.nearest("hip", "gfx941").name == "gfx90a"
    assert targets.nearest("hip", "gfx908").name == "gfx90a"


def _fake_device(monkeypatch, *, name: str, major: int = 9, minor: int = 0, gcn: str = "", hip: str = None):
    props = SimpleNamespace(name=name, major=major, minor=minor, gcnArchName=gcn, multi_processor_count=1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: props)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.version, "hip", hip)
    targets._device_target.cache_clear()
    targets._WARNED.clear()


@pytest.fixture
def clean_resolution():
    yield
    targets._device_target.cache_clear()
    targets._WARNED.clear()


def test_device_resolution_cuda_rocm_and_cpu(monkeypatch, clean_resolution):
    assert targets.device_target("cpu") is None  # the interpreter
    _fake_device(monkeypatch, name="NVIDIA GeForce RTX 5090", major=12, minor=0)
    assert targets.device_target("cuda:0").name == "sm_120"
    _fake_device(monkeypatch, name="AMD Instinct MI300X", gcn="gfx942:sramecc+:xnack-", hip="6.4")
    assert targets.device_target("cuda").name == "gfx942"
    _fake_device(monkeypatch, name="AMD Instinct MI355X", gcn="gfx950", hip="7.0")
    assert targets.device_target("cuda").name == "gfx950"


def test_an_unknown_gpu_gets_the_nearest_target_and_one_warning_naming_both(monkeypatch, clean_resolution):
    _fake_device(monkeypatch, name="NVIDIA Jetson AGX Orin", major=8, minor=7)
    with pytest.warns(RuntimeWarning, match=r"NVIDIA Jetson AGX Orin \(sm_87\) is not a target.*nearest one, sm_86"):
        assert targets.device_target("cuda").name == "sm_86"
    targets._device_target.cache_clear()  # a second resolution (another device index, say) warns no more
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert targets.device_target("cuda").name == "sm_86"


# -- configs per target --------------------------------------------------------------------------------------

def test_sm80_and_sm90_keep_the_library_tables_exactly():
    """Nothing changes for the two targets measured so far: same tables, same dot precision."""
    for name in ("sm_80", "sm_90"):
        tables = targets.get(name).tables
        assert tables.forward is MAIN_CONFIGS and tables.forward_float32 is FLOAT32_CONFIGS
        assert tables.backward_float32 is FLOAT32_BACKWARD_CONFIGS and tables.decode is DECODE_PICKS
        assert (tables.combine_warps, tables.preprocess_warps) == ((2, 4), 4)
    assert targets.get("sm_80").tables.backward is MAIN_BACKWARD_CONFIGS
    assert targets.get("sm_90").tables.backward is HOPPER_BACKWARD_CONFIGS
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for head_dim in (64, 128, 256):
            assert default_config(head_dim, head_dim, dtype, (128, 128), 4096, target=targets.get("sm_80")) == \
                default_config(head_dim, head_dim, dtype, (128, 128), 4096)


def test_sm120_backward_is_not_hoppers():
    """Regression: sm_120 (101,376 B of shared memory, no wgmma) was given the Hopper backward table
    (``capability >= 90``), whose dK kernel needs 132,608 B at D = 128."""
    config = default_backward_config(128, 128, torch.bfloat16, (128, 128), 4096, 4096, target=targets.get("sm_120"))
    assert config != HOPPER_BACKWARD_CONFIGS[128].fitted(128, 128, 4096, 4096)
    assert not config.split_dkdv


def test_every_target_has_a_default_for_every_shape():
    for target in targets.TARGETS.values():
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for head_dim in (16, 64, 80, 128, 256):
                forward = default_config(head_dim, head_dim, dtype, (128, 128), 4096, target=target)
                backward = default_backward_config(head_dim, head_dim, dtype, (128, 128), 4096, 4096, target=target)
                decode = default_decode_config(head_dim, head_dim, dtype, 32, target=target)
                assert isinstance(forward, KernelConfig) and isinstance(decode, KernelConfig)
                assert backward.dkdv.BLOCK_N >= 16 and backward.dq.BLOCK_M >= 16


def test_dot_precision_per_target_and_dtype():
    """AMD accepts neither "tf32x3" (anywhere) nor "tf32" (gfx90a, gfx950): their kernels failed to compile.
    float32 there runs the exact float32 MFMA; NVIDIA keeps 3xTF32 for float32 and "tf32" (no effect on 16-bit
    operands) for 16-bit inputs, so its compiled code is unchanged."""
    shapes = dict(head_dim=64, head_dim_v=64, block_size=(128, 128), config=KernelConfig(64, 64, 4, 2),
                  kv_len=4096, interpret=False)
    for target in targets.TARGETS.values():
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            precision = kernel_constexprs(dtype=dtype, target=target, **shapes)["DOT_PRECISION"]
            assert precision in target.dot_precisions
            if target.is_amd:
                assert precision == "ieee"
            else:
                assert precision == ("tf32x3" if dtype == torch.float32 else "tf32")
    assert kernel_constexprs(dtype=torch.float32, **shapes)["DOT_PRECISION"] == "tf32x3"  # no target: NVIDIA's


def test_fast_tanh_is_inline_ptx_so_nvidia_only():
    assert fast_tanh(torch.bfloat16, interpret=False, target=targets.get("sm_90"))
    assert not fast_tanh(torch.bfloat16, interpret=False, target=targets.get("gfx942"))
    assert not fast_tanh(torch.float32, interpret=False, target=targets.get("sm_90"))
    assert not fast_tanh(torch.bfloat16, interpret=True, target=targets.get("sm_90"))


def test_amd_compile_options_on_configs():
    plain = KernelConfig(128, 64, 4, 2)
    assert plain.amd_options == {} and plain.name == "m128_n64_w4_s2"
    amd = KernelConfig(128, 64, 4, 2, waves_per_eu=2, matrix_instr_nonkdim=16, kpack=2)
    assert amd.amd_options == {"waves_per_eu": 2, "matrix_instr_nonkdim": 16, "kpack": 2}
    assert amd.name == "m128_n64_w4_s2_wpe2_nk16_kp2"
    assert amd.fitted(64, 64).amd_options == amd.amd_options  # fitting keeps the options
    assert search.config_from_dict(search.config_to_dict(amd)) == amd  # the tuning cache round-trips them
    assert search.config_from_dict({"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}) == \
        KernelConfig(64, 32, 4, 2)  # records written before the AMD fields still read
    with pytest.raises(ValueError, match="matrix_instr_nonkdim"):
        KernelConfig(64, 64, 4, 2, matrix_instr_nonkdim=8)


def test_combine_and_preprocess_warps_follow_the_wavefront_width():
    """AMD wavefronts are 64 lanes: the decode combine and the delta kernel use half the warps for the same
    number of threads."""
    for target in targets.TARGETS.values():
        threads = target.tables.combine_num_warps(128) * target.warp_size
        assert threads == 128, target
        assert target.tables.preprocess_warps * target.warp_size == 128, target


def test_search_space_per_target():
    def names(target, kernel="fwd"):
        return {c.name for c in search.search_space(kernel, target, head_dim=64, dtype=torch.float16)}

    assert "m128_n128_w8_s5" in names("sm_90") and "m128_n128_w8_s5" in names("sm_100")
    assert not any(name.endswith("_s5") or "_s4" in name for name in names("sm_120"))
    amd = search.search_space("fwd", "gfx942", head_dim=64, dtype=torch.float16)
    assert {c.num_stages for c in amd} == {1, 2} and {c.waves_per_eu for c in amd} == {0, 2}
    assert search.search_space("fwd", 90, head_dim=64) == search.search_space("fwd", targets.get("sm_90"), head_dim=64)
    assert search.shared_memory_limit("gfx942") == 65536 and search.shared_memory_limit(120) == 101376
    assert search.shared_memory_limit(95) == 232448  # unknown capability: the nearest older target's


def test_prune_rejects_over_the_amd_register_file_not_over_nvidias():
    stats = {KernelConfig(64, 64, 4, 2): search.CompileStats(shared=1000, registers=300)}
    kept = search.prune(list(stats), stats.__getitem__, capability="gfx942").kept
    assert kept == list(stats)  # 300 VGPRs of 512
    assert search.prune(list(stats), stats.__getitem__, capability=80).kept == []
    lds = {KernelConfig(64, 64, 4, 2): search.CompileStats(shared=81920, registers=200)}
    assert "81920 B > limit 65536 B" in search.prune(list(lds), lds.__getitem__, capability="gfx942").dropped[
        next(iter(lds))]


def test_the_target_dataclasses_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        targets.get("sm_90").shared_memory = 1


def test_the_readme_table_names_every_target_with_its_limits():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    block = text.split("<!-- supported-gpus:begin -->")[1].split("<!-- supported-gpus:end -->")[0]
    for target in targets.TARGETS.values():
        row = next(line for line in block.splitlines() if line.startswith(f"| {target.name} |"))
        assert target.devices in row and f"| {target.tensor_instructions} |" in row, row
        assert f"{target.shared_memory:,} B" in row and f"| {target.warp_size} |" in row, row
