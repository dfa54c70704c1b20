"""bench/gpu_peaks.py (vendor peaks by device name) and how bench/gpu_check.py uses them (``pct_peak``)."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import triton_attn as ta
from triton_attn.kernels.targets import TARGETS
from triton_attn.masks import causal_mask

BENCH = Path(__file__).resolve().parent.parent / "bench"


if str(BENCH) not in sys.path:  # gpu_check imports gpu_peaks and its section modules by name
    sys.path.insert(0, str(BENCH))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


peaks_module = importlib.import_module("gpu_peaks")  # the very module gpu_check looks peaks up in

# (name as torch.cuda.get_device_name reports it, SMs / CUs it reports, target, dense 16-bit TFLOP/s, GB/s):
# every device the supported targets list, with the form-factor variants whose peaks differ.
REPORTED = [
    ("NVIDIA A100-SXM4-40GB", 108, "sm_80", 312.0, 1555.0),
    ("NVIDIA A100-SXM4-80GB", 108, "sm_80", 312.0, 2039.0),
    ("NVIDIA A100-PCIE-40GB", 108, "sm_80", 312.0, 1555.0),
    ("NVIDIA A100 80GB PCIe", 108, "sm_80", 312.0, 1935.0),
    ("NVIDIA A30", 56, "sm_80", 165.0, 933.0),
    ("NVIDIA GeForce RTX 3090", 82, "sm_86", 71.0, 936.0),
    ("NVIDIA RTX A6000", 84, "sm_86", 154.8, 768.0),
    ("NVIDIA A10", 72, "sm_86", 125.0, 600.0),
    ("NVIDIA A40", 84, "sm_86", 149.7, 696.0),
    ("NVIDIA GeForce RTX 4090", 128, "sm_89", 165.2, 1008.0),
    ("NVIDIA RTX 6000 Ada Generation", 142, "sm_89", 364.2, 960.0),
    ("NVIDIA L40S", 142, "sm_89", 362.05, 864.0),
    ("NVIDIA L40", 142, "sm_89", 181.05, 864.0),
    ("NVIDIA L4", 58, "sm_89", 121.0, 300.0),
    ("NVIDIA H100 80GB HBM3", 132, "sm_90", 989.5, 3350.0),
    ("NVIDIA H100 PCIe", 114, "sm_90", 756.5, 2000.0),
    ("NVIDIA H100 NVL", 132, "sm_90", 835.5, 3900.0),
    ("NVIDIA H200", 132, "sm_90", 989.5, 4800.0),
    ("NVIDIA H200 NVL", 132, "sm_90", 835.5, 4800.0),
    ("NVIDIA GH200 480GB", 132, "sm_90", 989.5, 4000.0),
    ("NVIDIA GH200 144G HBM3e", 132, "sm_90", 989.5, 4900.0),
    ("NVIDIA B200", 148, "sm_100", 2250.0, 7700.0),
    ("NVIDIA GB200", None, "sm_100", 2500.0, 8000.0),  # its SM count is not checked
    ("NVIDIA GeForce RTX 5090", 170, "sm_120", 209.5, 1792.0),
    ("NVIDIA RTX PRO 6000 Blackwell Workstation Edition", 188, "sm_120", 503.8, 1792.0),
    ("AMD Instinct MI210", 104, "gfx90a", 181.0, 1638.4),
    ("AMD Instinct MI250X", 110, "gfx90a", 191.5, 1638.4),
    ("AMD Instinct MI250", 104, "gfx90a", 181.05, 1638.4),
    ("AMD Instinct MI300X", 304, "gfx942", 1307.4, 5300.0),
    ("AMD Instinct MI300A", 228, "gfx942", 980.6, 5300.0),
    ("AMD Instinct MI325X", 304, "gfx942", 1307.4, 6000.0),
    ("AMD Instinct MI350X", 256, "gfx950", 2306.9, 8000.0),
    ("AMD Instinct MI355X", 256, "gfx950", 2516.6, 8000.0),
]
# Names whose entries know one of the two peaks only: the other is not settled by the name.
PARTIAL = [
    ("NVIDIA A100", 108, 312.0, None),
    ("NVIDIA RTX PRO 6000 Blackwell Max-Q Workstation Edition", 188, None, 1792.0),
    ("NVIDIA RTX PRO 6000 Blackwell Server Edition", 188, None, 1792.0),
]


@pytest.mark.parametrize("name, multiprocessors, target, tflops, gb_s", REPORTED, ids=[r[0] for r in REPORTED])
def test_every_supported_device_resolves_with_or_without_its_sm_count(name, multiprocessors, target, tflops, gb_s):
    for count in (None, multiprocessors):
        peaks = peaks_module.lookup(name, count)
        assert peaks is not None, (name, count)
        assert (peaks.tflops, peaks.gb_s) == (tflops, gb_s), peaks
        assert peaks.source, "every entry names the vendor document its numbers come from"


def test_the_reported_names_cover_every_target():
    assert {target for _, _, target, _, _ in REPORTED} == set(TARGETS)


def test_datasheet_anchors():
    h100 = peaks_module.lookup("NVIDIA H100 80GB HBM3")
    assert h100.model == "H100 SXM5 80GB" and h100.tflops == pytest.approx(989, abs=1) and h100.gb_s == 3350
    mi300x = peaks_module.lookup("AMD Instinct MI300X")
    assert mi300x.tflops == pytest.approx(1307, abs=1) and mi300x.gb_s == 5300


@pytest.mark.parametrize("name, multiprocessors, target, tflops, gb_s", REPORTED, ids=[r[0] for r in REPORTED])
def test_values_are_plausible(name, multiprocessors, target, tflops, gb_s):
    peaks = peaks_module.lookup(name)
    assert 50 <= peaks.tflops <= 3000, "dense 16-bit TFLOP/s of one device (not sparse, not a node)"
    assert 250 <= peaks.gb_s <= 9000, "GB/s (not TB/s) of one device"
    # FLOP per byte of memory traffic: every GPU here lies between ~70 (RTX 3090) and ~400 (L4); a peak
    # entered with sparsity, per package or in the wrong unit leaves this band.
    assert 50 <= peaks.tflops * 1e3 / peaks.gb_s <= 600
    assert peaks.multiprocessors in (None, multiprocessors)


@pytest.mark.parametrize("name, canonical", [
    ("AMD Instinct MI300X OAM", "AMD Instinct MI300X"),
    ("AMD Instinct MI300X VF", "AMD Instinct MI300X"),
    ("amd instinct mi300x", "AMD Instinct MI300X"),
    ("AMD Instinct MI325X OAM", "AMD Instinct MI325X"),
    ("AMD Instinct MI355X OAM", "AMD Instinct MI355X"),
    ("  NVIDIA   H100 80GB HBM3 ", "NVIDIA H100 80GB HBM3"),
    ("NVIDIA H100 SXM5 80GB", "NVIDIA H100 80GB HBM3"),
    ("NVIDIA A100-SXM-80GB", "NVIDIA A100-SXM4-80GB"),
    ("NVIDIA A100 PCIe 40GB", "NVIDIA A100-PCIE-40GB"),
    ("NVIDIA H200 141GB HBM3e", "NVIDIA H200"),
    ("NVIDIA GH200 96GB HBM3", "NVIDIA GH200 480GB"),
])
def test_name_variants_match(name, canonical):
    assert peaks_module.lookup(name) == peaks_module.lookup(canonical) is not None


def test_rocm_shared_mi250_name_is_settled_by_the_cu_count_only():
    shared = "AMD Instinct MI250X/MI250"
    assert peaks_module.lookup(shared) is None  # two parts, two peaks: no guess
    assert peaks_module.lookup(shared, 110) == peaks_module.lookup("AMD Instinct MI250X")
    assert peaks_module.lookup(shared, 104) == peaks_module.lookup("AMD Instinct MI250")


@pytest.mark.parametrize("name, multiprocessors", [
    ("NVIDIA GeForce GTX 1080", None),
    ("Tesla V100-SXM2-16GB", None),
    ("NVIDIA A10G", None),  # not the A10 (nor the A100)
    ("NVIDIA H20", None),  # not the H200
    ("NVIDIA H100", None),  # SXM, PCIe or NVL: three peaks
    ("NVIDIA GeForce RTX 4090 D", None),
    ("NVIDIA GeForce RTX 3090 Ti", None),
    ("Quadro RTX 6000", None),  # Turing, not the RTX 6000 Ada
    ("AMD Radeon Graphics", None),
    ("", None),
    ("NVIDIA A100-SXM4-40GB", 14),  # a MIG slice: the whole device's peak would be wrong
    ("AMD Instinct MI300X", 38),  # one CPX compute partition
])
def test_unknown_devices_and_partitions_give_none(name, multiprocessors):
    assert peaks_module.lookup(name, multiprocessors) is None


@pytest.mark.parametrize("name, multiprocessors, tflops, gb_s", PARTIAL, ids=[r[0] for r in PARTIAL])
def test_an_unsettled_variant_knows_only_what_it_shares(name, multiprocessors, tflops, gb_s):
    peaks = peaks_module.lookup(name, multiprocessors)
    assert (peaks.tflops, peaks.gb_s) == (tflops, gb_s)


def test_each_reported_name_fits_one_entry_and_every_entry_is_reached():
    names = [row[0] for row in REPORTED] + [row[0] for row in PARTIAL]
    for name in names:
        assert len(peaks_module.candidates(name)) == 1, (name, peaks_module.candidates(name))
    reached = {peaks_module.lookup(name).model for name in names}
    assert reached == {peaks.model for _, peaks in peaks_module.PEAKS}


def test_device_peaks_is_none_off_the_gpu():
    assert peaks_module.device_peaks("cpu") is None


# -- bench/gpu_check.py ------------------------------------------------------------------------------------

gpu_check = _load("gpu_check")


def test_percent_of_peak_divides_the_rate_by_the_peak():
    assert gpu_check.percent_of_peak({"tflops": 494.75}, 989.5, 3350.0) == "50"
    assert gpu_check.percent_of_peak({"gb_s": 2680.0}, 989.5, 3350.0) == "80"
    assert gpu_check.percent_of_peak({"tflops": "123.4"}, 1234.0, None) == "10"
    assert gpu_check.percent_of_peak({"tflops": 500.0}, None, 3350.0) == ""  # peak not known: left empty
    assert gpu_check.percent_of_peak({"max_error": "1e-3"}, 989.5, 3350.0) == ""  # a correctness row


def test_settle_peaks_override_wins_then_the_table_then_nothing():
    h100 = peaks_module.lookup("NVIDIA H100 80GB HBM3")
    args = argparse.Namespace(peak_tflops=None, copy_bandwidth=None)
    lines = gpu_check.settle_peaks(args, h100)
    assert (args.peak_tflops, args.peak_gb_s) == (989.5, 3350.0)
    assert "H100 SXM5 80GB" in lines[0] and h100.source in lines[1]
    args = argparse.Namespace(peak_tflops=700.0, copy_bandwidth=3000.0)
    lines = gpu_check.settle_peaks(args, h100)
    assert (args.peak_tflops, args.peak_gb_s) == (700.0, 3000.0)
    assert "--peak-tflops" in lines[0] and "--copy-bandwidth" in lines[1]
    args = argparse.Namespace(peak_tflops=None, copy_bandwidth=None)
    lines = gpu_check.settle_peaks(args, None)
    assert (args.peak_tflops, args.peak_gb_s) == (None, None)
    assert all("not known" in line for line in lines)


def test_results_path_stays_one_file_for_rocm_names(tmp_path):
    """ROCm reports "AMD Instinct MI250X/MI250": the old ``name.replace(' ', '_')`` made that a subfolder."""
    path = gpu_check.results_path(tmp_path, "20260101-000000", "AMD Instinct MI250X/MI250")
    assert path.parent == tmp_path
    assert path.name == "gpu_check_20260101-000000_AMD_Instinct_MI250X_MI250.csv"


def test_cpu_device_is_the_interpreter_target():
    assert gpu_check.identify_device(torch.device("cpu")) == ("cpu-interpreter", "interpreter", None, None)


def test_a_rocm_device_is_named_with_its_target_and_its_peaks(monkeypatch):
    """The GPU path of ``identify_device`` (no GPU here): ROCm's shared MI250 name, settled by the CU count."""
    import triton_attn.kernels.targets as targets

    name = "AMD Instinct MI250X/MI250"
    monkeypatch.setattr(targets, "device_target", lambda device: TARGETS["gfx90a"])
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(name=name, multi_processor_count=110))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: name)
    found_name, target, multiprocessors, peaks = gpu_check.identify_device(torch.device("cuda"))
    assert (found_name, target, multiprocessors) == (name, "gfx90a", 110)
    assert peaks == peaks_module.lookup("AMD Instinct MI250X")


def test_dry_run_rows_name_the_target_and_carry_pct_peak(tmp_path):
    peak_tflops, peak_gb_s = 1e-6, 1e-4  # the interpreter's rates are tiny: peaks near them give readable percents
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--sections", "forward", "decode",
                           "--perf-masks", "causal", "--peak-tflops", str(peak_tflops),
                           "--copy-bandwidth", str(peak_gb_s)]) == 0
    (written,) = tmp_path.glob("gpu_check_*.csv")
    rows = list(csv.DictReader(written.open()))
    assert {(row["device"], row["target"]) for row in rows} == {("cpu-interpreter", "interpreter")}
    speed = [row for row in rows if row["section"] == "forward_speed"]
    assert {row["impl"] for row in speed} == {"triton_attn", "sdpa"}
    heads, head_dim, length = 2, 16, 64  # the dry run's sizes
    attended = float(ta.create_mask(causal_mask, 1, 1, length, length).sum()) * heads
    for row in speed:  # pct_peak is the unrounded TFLOP/s over the peak: recompute it from the time
        assert float(row["pct_peak"]) > 0, row
        if float(row["ms"]) >= 1.0:  # (the CSV rounds ms to 1 us)
            tflops = 4.0 * attended * head_dim / float(row["ms"]) / 1e9
            assert float(row["pct_peak"]) == pytest.approx(100 * tflops / peak_tflops, rel=0.01), row
    decode = [row for row in rows if row["section"] == "decode_speed"]
    assert decode and all(float(row["pct_peak"]) > 0 and f"of {peak_gb_s:g} GB/s" in row["note"] for row in decode)
    assert all(row["pct_peak"] == "" for row in rows if row["section"].endswith("correctness"))


def test_a_decode_shape_out_of_memory_is_a_skipped_row_and_the_rest_run():
    decode = _load("gpu_check_decode")
    rows = []

    def too_big(out):
        out.append(dict(batch=16, seq=32768, head_dim=128, impl="triton_attn", check="correctness", ok=True))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB\nmore detail")

    shape = dict(batch=16, seq=32768, head_dim=128)
    decode.run_shape(rows, shape, "triton_attn", too_big)
    decode.run_shape(rows, dict(shape, batch=1), "triton_attn", lambda out: out.append(dict(shape, ok=True)))
    assert [row.get("ok") for row in rows] == [True, None, True]
    assert rows[1]["note"] == "skipped: out of GPU memory (CUDA out of memory. Tried to allocate 8.00 GiB)"
    written = []
    assert gpu_check._decode_rows("decode", rows[1:2], written.append)  # a skip is not a failure
    assert written[0]["section"] == "decode_correctness" and written[0]["ok"] == ""
