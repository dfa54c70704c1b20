"""Vendor peak numbers of the GPUs triton-attn targets, looked up by the name torch reports.

``lookup(name, multiprocessors=None)`` returns a ``DevicePeaks``: the peak dense 16-bit tensor-core
rate (bf16/fp16 inputs, float32 accumulation, no 2:4 sparsity; TFLOP/s) and the peak memory
bandwidth (GB/s, 1e9 bytes per second), or None for a name it does not know. ``device_peaks(device)``
does the same for a torch device (name and SM / CU count from ``torch.cuda``). ``bench/gpu_check.py``
divides measured TFLOP/s and GB/s by them (its ``pct_peak`` column).

Names are matched as CUDA and ROCm report them (``torch.cuda.get_device_name``): "NVIDIA H100 80GB HBM3",
"NVIDIA H100 PCIe", "NVIDIA GeForce RTX 4090", "NVIDIA A100-SXM4-40GB", "AMD Instinct MI300X",
"AMD Instinct MI300X OAM", "AMD Instinct MI300X VF", "AMD Instinct MI250X/MI250", ... : case, dashes,
slashes and extra words do not matter, the model's words do. Never a guess: a name that fits no entry,
or fits several that disagree, gives None; an entry whose variant the name does not settle (an
"A100" without its memory size) knows only the number that variant does not change (the other is
None). When the SM / CU count is given and differs from the entry's (a MIG slice, an MI300X compute
partition, a cut-down part), the entry does not apply: its peaks are for the whole device. The count
also settles the one name ROCm shares between two parts ("MI250X/MI250": 110 or 104 CUs per die).

Numbers are the vendors' (the datasheet or whitepaper named with each entry); where a sheet gives only
the 2:4-sparse rate, the dense rate is half of it. GeForce cards run float32 accumulation at half their
16-bit-accumulation rate, so theirs are the "FP32 accumulate" column of the architecture whitepapers:
the kernels accumulate in float32. MI250 and MI250X are two dies each, which torch (and every kernel)
sees as two devices: their entries are per die, half the package's datasheet numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

__all__ = ["DevicePeaks", "PEAKS", "candidates", "lookup", "device_peaks", "normalize", "format_table"]


@dataclass(frozen=True)
class DevicePeaks:
    """The vendor peaks of one device model.

    model: the model in words ("H100 SXM5 80GB"); tflops: dense 16-bit tensor-core TFLOP/s with float32
    accumulation, None when the name does not settle it; gb_s: peak memory bandwidth in GB/s, None
    likewise; multiprocessors: the SMs (NVIDIA) or CUs (AMD) torch reports for the whole device, None
    when not checked; source: the vendor document the numbers come from."""

    model: str
    tflops: Optional[float]
    gb_s: Optional[float]
    multiprocessors: Optional[int]
    source: str


def normalize(name: str) -> str:
    """Upper case, every run of characters other than letters and digits one space:
    "NVIDIA A100-SXM4-80GB" -> "NVIDIA A100 SXM4 80GB", "AMD Instinct MI250X/MI250" -> "AMD INSTINCT MI250X MI250"."""
    return " ".join(re.sub(r"[^A-Z0-9]+", " ", str(name).upper()).split())


def _pattern(words: Sequence[str], without: Sequence[str] = ()) -> "re.Pattern[str]":
    """A regex over a normalized name: every one of ``words`` present as a whole word, none of ``without``.
    A word may be an alternation ("SXM\\d?|HBM3")."""
    present = "".join(rf"(?=.*\b(?:{word})\b)" for word in words)
    absent = "".join(rf"(?!.*\b(?:{word})\b)" for word in without)
    return re.compile(present + absent)


_A100 = "NVIDIA A100 Tensor Core GPU datasheet"
_GA102 = "NVIDIA Ampere GA102 GPU architecture whitepaper"
_ADA = "NVIDIA Ada GPU architecture whitepaper"
_H100 = "NVIDIA H100 Tensor Core GPU datasheet"
_H200 = "NVIDIA H200 Tensor Core GPU datasheet"
_GH200 = "NVIDIA GH200 Grace Hopper Superchip datasheet"
_RTX_PRO_6000 = "NVIDIA RTX PRO 6000 Blackwell datasheet"

# (words the normalized name must hold, words it must not hold, peaks). Entries are written so that no
# real name fits two of them that disagree (tests/test_gpu_peaks.py checks the reported names).
_ENTRIES: Tuple[Tuple[Tuple[str, ...], Tuple[str, ...], DevicePeaks], ...] = (
    # -- sm_80: Ampere data center. A100 312 TFLOPS bf16 dense on every form factor; bandwidth by memory.
    (("A100", r"SXM\d?", "40GB"), ("PCIE",), DevicePeaks("A100 SXM4 40GB", 312.0, 1555.0, 108, _A100)),
    (("A100", r"SXM\d?", "80GB"), ("PCIE",), DevicePeaks("A100 SXM4 80GB", 312.0, 2039.0, 108, _A100)),
    (("A100", "PCIE", "40GB"), (), DevicePeaks("A100 PCIe 40GB", 312.0, 1555.0, 108, _A100)),
    (("A100", "PCIE", "80GB"), (), DevicePeaks("A100 PCIe 80GB", 312.0, 1935.0, 108, _A100)),
    (("A100",), ("40GB", "80GB"), DevicePeaks("A100 (memory size not in the name)", 312.0, None, 108, _A100)),
    (("A30",), (), DevicePeaks("A30", 165.0, 933.0, 56, "NVIDIA A30 Tensor Core GPU datasheet")),
    # -- sm_86: Ampere consumer and workstation.
    (("RTX", "3090"), ("TI", "LAPTOP"), DevicePeaks("GeForce RTX 3090", 71.0, 936.0, 82, _GA102)),
    (("RTX", "A6000"), (), DevicePeaks("RTX A6000", 154.8, 768.0, 84, "NVIDIA RTX A6000 datasheet; " + _GA102)),
    (("A10",), (), DevicePeaks("A10", 125.0, 600.0, 72, "NVIDIA A10 Tensor Core GPU datasheet")),
    (("A40",), (), DevicePeaks("A40", 149.7, 696.0, 84, "NVIDIA A40 datasheet")),
    # -- sm_89: Ada Lovelace.
    (("RTX", "4090"), ("D", "LAPTOP"), DevicePeaks("GeForce RTX 4090", 165.2, 1008.0, 128, _ADA)),
    (("RTX", "6000", "ADA"), (), DevicePeaks("RTX 6000 Ada Generation", 364.2, 960.0, 142,
                                             "NVIDIA RTX 6000 Ada Generation datasheet; " + _ADA)),
    (("L40S",), (), DevicePeaks("L40S", 362.05, 864.0, 142, "NVIDIA L40S datasheet")),
    (("L40",), (), DevicePeaks("L40", 181.05, 864.0, 142, "NVIDIA L40 datasheet")),
    (("L4",), (), DevicePeaks("L4", 121.0, 300.0, 58, "NVIDIA L4 Tensor Core GPU datasheet")),
    # -- sm_90: Hopper. The SXM part reports "NVIDIA H100 80GB HBM3".
    (("H100", "80GB", r"SXM\d?|HBM3"), ("PCIE", "NVL", "HBM2E"),
     DevicePeaks("H100 SXM5 80GB", 989.5, 3350.0, 132, _H100)),
    (("H100", "PCIE"), (), DevicePeaks("H100 PCIe", 756.5, 2000.0, 114, _H100)),
    (("H100", "NVL"), (), DevicePeaks("H100 NVL", 835.5, 3900.0, 132, _H100)),
    (("H200",), ("NVL",), DevicePeaks("H200 SXM", 989.5, 4800.0, 132, _H200)),
    (("H200", "NVL"), (), DevicePeaks("H200 NVL", 835.5, 4800.0, 132, _H200)),
    # "GH200 480GB" names the module by its 480 GB of LPDDR5X: the 96 GB HBM3 GPU; the HBM3e one says so.
    (("GH200", "HBM3E|144GB?"), (), DevicePeaks("GH200 144GB HBM3e", 989.5, 4900.0, 132, _GH200)),
    (("GH200", "480GB|96GB"), ("HBM3E|144GB?",), DevicePeaks("GH200 96GB HBM3", 989.5, 4000.0, 132, _GH200)),
    # -- sm_100: Blackwell data center (per GPU).
    (("B200",), (), DevicePeaks("B200", 2250.0, 7700.0, 148, "NVIDIA HGX B200 datasheet (per GPU)")),
    (("GB200",), (), DevicePeaks("GB200", 2500.0, 8000.0, None, "NVIDIA GB200 NVL72 datasheet (per GPU)")),
    # -- sm_120: Blackwell consumer and workstation.
    (("RTX", "5090"), ("D", "LAPTOP"), DevicePeaks("GeForce RTX 5090", 209.5, 1792.0, 170,
                                                   "NVIDIA RTX Blackwell GPU architecture whitepaper")),
    # Its 4 PFLOPS FP4 with sparsity is 503.8 dense 16-bit, at full rate with float32 accumulation as on
    # every RTX professional card; the Max-Q (300 W) and Server editions run other clocks: bandwidth only.
    (("RTX", "PRO", "6000", "BLACKWELL", "WORKSTATION"), ("MAX",),
     DevicePeaks("RTX PRO 6000 Blackwell Workstation Edition", 503.8, 1792.0, 188, _RTX_PRO_6000)),
    (("RTX", "PRO", "6000", "BLACKWELL", "MAX"), (),
     DevicePeaks("RTX PRO 6000 Blackwell Max-Q Workstation Edition", None, 1792.0, 188, _RTX_PRO_6000)),
    (("RTX", "PRO", "6000", "BLACKWELL", "SERVER"), (),
     DevicePeaks("RTX PRO 6000 Blackwell Server Edition", None, 1792.0, 188, _RTX_PRO_6000)),
    # -- gfx90a: CDNA2. MI250X 383 TFLOPS / 3.2768 TB/s and MI250 362.1 / 3.2768 for two dies: halved.
    (("MI210",), (), DevicePeaks("Instinct MI210", 181.0, 1638.4, 104, "AMD Instinct MI210 data sheet")),
    (("MI250X",), (), DevicePeaks("Instinct MI250X (one die)", 191.5, 1638.4, 110,
                                  "AMD Instinct MI250X data sheet (per die: half of the package)")),
    (("MI250",), (), DevicePeaks("Instinct MI250 (one die)", 181.05, 1638.4, 104,
                                 "AMD Instinct MI250 data sheet (per die: half of the package)")),
    # -- gfx942: CDNA3.
    (("MI300X",), (), DevicePeaks("Instinct MI300X", 1307.4, 5300.0, 304, "AMD Instinct MI300X data sheet")),
    (("MI300A",), (), DevicePeaks("Instinct MI300A", 980.6, 5300.0, 228, "AMD Instinct MI300A data sheet")),
    (("MI325X",), (), DevicePeaks("Instinct MI325X", 1307.4, 6000.0, 304, "AMD Instinct MI325X data sheet")),
    # -- gfx950: CDNA4.
    (("MI350X",), (), DevicePeaks("Instinct MI350X", 2306.9, 8000.0, 256, "AMD Instinct MI350X data sheet")),
    (("MI355X",), (), DevicePeaks("Instinct MI355X", 2516.6, 8000.0, 256, "AMD Instinct MI355X data sheet")),
)

PEAKS: Tuple[Tuple["re.Pattern[str]", DevicePeaks], ...] = tuple(
    (_pattern(words, without), peaks) for words, without, peaks in _ENTRIES)


def candidates(name: str) -> Tuple[DevicePeaks, ...]:
    """Every entry whose words ``name`` holds (for tests and diagnostics; ``lookup`` decides)."""
    text = normalize(name)
    return tuple(peaks for pattern, peaks in PEAKS if pattern.match(text))


def lookup(name: str, multiprocessors: Optional[int] = None) -> Optional[DevicePeaks]:
    """The ``DevicePeaks`` of the device torch calls ``name``, or None when no entry (or more than one)
    fits. multiprocessors: the device's SM / CU count (``multi_processor_count``), if known: an entry
    for another count does not fit (a partition or another part; also settles "MI250X/MI250")."""
    found = candidates(name)
    if multiprocessors is not None:
        found = tuple(peaks for peaks in found
                      if peaks.multiprocessors is None or peaks.multiprocessors == int(multiprocessors))
    return found[0] if len(found) == 1 else None


def device_peaks(device) -> Optional[DevicePeaks]:
    """``lookup`` for a torch device: None off CUDA / ROCm (CPU, the interpreter)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    properties = torch.cuda.get_device_properties(device)
    return lookup(properties.name, properties.multi_processor_count)


def _cell(value) -> str:
    return "?" if value is None else f"{value:g}"


def format_table() -> str:
    """The table as text: model, TFLOP/s, GB/s, SMs / CUs, source ("?": not known)."""
    lines = [f"{'model':<50}{'TFLOP/s':>9}{'GB/s':>8}{'SM/CU':>7}  source"]
    for _, peaks in PEAKS:
        lines.append(f"{peaks.model:<50}{_cell(peaks.tflops):>9}{_cell(peaks.gb_s):>8}"
                     f"{_cell(peaks.multiprocessors):>7}  {peaks.source}")
    return "\n".join(lines)


if __name__ == "__main__":
    import torch

    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        found = device_peaks("cuda:0")
        print(f"this device: {properties.name} ({properties.multi_processor_count} SMs / CUs): "
              + ("not in the table" if found is None else
                 f"{found.model}, {_cell(found.tflops)} TFLOP/s, {_cell(found.gb_s)} GB/s"))
    print(format_table())
