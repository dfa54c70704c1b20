"""bench/gpu_check.py on CPU: the plan and its budget, --quick's coverage, --out, failures as rows, the flex guard,
and the CUDA-graph and flash sections' steps run eagerly (no GPU here: what needs one is checked by reading)."""

from __future__ import annotations

import csv
import importlib
import importlib.util
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import triton_attn as ta

BENCH = Path(__file__).resolve().parent.parent / "bench"
if str(BENCH) not in sys.path:  # gpu_check imports its section modules by name
    sys.path.insert(0, str(BENCH))

spec = importlib.util.spec_from_file_location("gpu_check_for_tests", BENCH / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)
plan_module = importlib.import_module("gpu_check_plan")
quick = importlib.import_module("gpu_check_quick")
backward = importlib.import_module("gpu_check_backward")
flex = importlib.import_module("gpu_check_flex")
graphs = importlib.import_module("gpu_check_graphs")
flash = importlib.import_module("gpu_check_flash")


def _plan(argv):
    args = gpu_check.parse_args(argv, gpu_sizes=True)
    return args, plan_module.build_plan(args, args.sections)


# -- the plan and the budget -----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, sections, budget", [
    (["--dry-run"], gpu_check.DEFAULT_SECTIONS, 480.0),
    (["--dry-run", "--quick"], gpu_check.QUICK_SECTIONS, 180.0),
], ids=["default", "quick"])
def test_plan_lists_every_section_with_an_estimate_within_the_budget(argv, sections, budget, capsys):
    args, plan = _plan(argv)
    assert args.budget_seconds == budget
    assert [entry.section for entry in plan] == ["setup", *sections]
    assert all(entry.seconds > 0 for entry in plan), plan
    assert sum(entry.seconds for entry in plan) <= budget
    assert gpu_check.main([*argv, "--plan"]) == 0  # what --dry-run prints first, then exits
    printed = capsys.readouterr().out
    for entry in plan:
        assert f"  {entry.section} " in printed and f"{entry.seconds:.0f} s" in printed
    assert f"(budget {budget:.0f} s)" in printed and "OVER" not in printed


def test_a_dry_run_prints_the_gpu_runs_plan(capsys):
    """The dry run's own sizes are tiny; the plan it prints is the GPU run's, the same as without --dry-run."""
    printed = {}
    for argv in ([], ["--quick"]):
        gpu_check.main([*argv, "--plan"])
        printed[tuple(argv)] = capsys.readouterr().out
        gpu_check.main([*argv, "--plan", "--dry-run"])
        assert capsys.readouterr().out == printed[tuple(argv)]
    assert "decode step of 4 layers, 8 replays; prefill forward + backward at 1024" in printed[()]


def test_the_default_run_is_not_timed_with_flexattention_but_flex_shows_its_cost():
    _, plan = _plan(["--dry-run"])
    args, with_flex = _plan(["--dry-run", "--flex"])
    assert args.with_flex and not gpu_check.parse_args(["--dry-run"], gpu_sizes=True).with_flex
    cost = {entry.section: entry.seconds for entry in plan}
    cost_flex = {entry.section: entry.seconds for entry in with_flex}
    assert cost_flex["efficiency"] > cost["efficiency"] + 10 * plan_module.COSTS["flex_backward_compile"]
    assert "OVER" in plan_module.format_plan(with_flex, args.budget_seconds)


def test_the_ledger_charges_each_kernel_variant_once():
    ledger = plan_module.Ledger()
    first = plan_module.kernel_cost(ledger, ("causal",), 128, training=True)
    assert first == plan_module.COSTS["forward_compile"] + plan_module.COSTS["backward_compile"]
    assert plan_module.kernel_cost(ledger, ("causal",), 128, training=True) == 0
    assert plan_module.kernel_cost(ledger, ("causal",), 64, training=True) == first  # another head_dim
    assert plan_module.kernel_cost(ledger, ("causal",), 128, inference=True) == plan_module.COSTS["forward_compile"]


def test_budget_admits_a_step_only_when_it_ends_within_it():
    assert plan_module.admits(100.0, 380.0, 480.0)
    assert not plan_module.admits(100.0, 381.0, 480.0)
    assert not plan_module.admits(481.0, 0.0, 480.0)  # past the budget: nothing starts
    assert plan_module.admits(1e9, 1e9, None)
    now = [0.0]
    clock = plan_module.Budget(480.0, clock=lambda: now[0])
    now[0] = 400.0
    assert clock.remaining() == 80.0 and clock.admits(80.0) and not clock.admits(81.0)
    assert "480 s budget" in clock.skip_note(95.0) and "400 s spent" in clock.skip_note(95.0)


def test_a_section_that_no_longer_fits_becomes_a_skipped_row_and_the_rest_run(monkeypatch):
    now, ran, rows = [0.0], [], []

    def section(name, seconds, ok=True):
        def run(args, device, dtype, write_row):
            ran.append(name)
            now[0] += seconds
            return ok
        return run

    monkeypatch.setattr(gpu_check, "SECTIONS", {"a": section("a", 300.0), "b": section("b", 10.0),
                                                "c": section("c", 10.0, ok=False), "d": section("d", 1.0)})
    args = gpu_check.parse_args(["--dry-run"])
    args.sections = ["a", "b", "c", "d"]
    clock = plan_module.Budget(480.0, clock=lambda: now[0])
    plan = {"a": 250.0, "b": 200.0, "c": 100.0, "d": 50.0}
    ok = gpu_check.run_sections(args, plan, torch.device("cpu"), torch.float32, rows.append, clock, log=lambda _: None)
    assert ran == ["a", "c", "d"] and not ok  # b (300 s in, ~200 s more > 480) skipped; c's failure reported
    (row,) = rows
    assert (row["section"], row["impl"], row["ok"]) == ("b", "all", "")
    assert row["note"] == "skipped: over the 480 s budget (300 s spent, ~200 s needed; --budget raises it)"


def test_the_efficiency_table_starts_when_a_slice_of_it_fits(monkeypatch):
    now, ran = [0.0], []
    monkeypatch.setattr(gpu_check, "SECTIONS", {"efficiency": lambda *args: ran.append("efficiency") or True,
                                                "decode": lambda *args: ran.append("decode") or True})
    args = gpu_check.parse_args(["--dry-run", "--sections", "decode", "efficiency"])
    clock = plan_module.Budget(480.0, clock=lambda: now[0])
    now[0] = 440.0  # 40 s left: not the table's 109 s estimate, but its first cases
    rows = []
    gpu_check.run_sections(args, {"decode": 50.0, "efficiency": 109.0}, torch.device("cpu"), torch.float32,
                           rows.append, clock, log=lambda _: None)
    assert ran == ["efficiency"] and [row["section"] for row in rows] == ["decode"]


def test_a_section_that_raises_is_a_fail_row_and_the_next_runs(monkeypatch):
    def broken(args, device, dtype, write_row):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(gpu_check, "SECTIONS", {"a": broken, "b": lambda *args: True})
    args = gpu_check.parse_args(["--dry-run"])
    args.sections = ["a", "b"]
    rows = []
    ok = gpu_check.run_sections(args, {}, torch.device("cpu"), torch.float32, rows.append, plan_module.Budget(None),
                                log=lambda _: None)
    assert not ok and rows[0]["ok"] is False and "RuntimeError: kernel exploded" in rows[0]["note"]


def test_a_zero_budget_skips_every_section_with_a_row_under_out(tmp_path, capsys):
    out = tmp_path / "new" / "folder"  # created by the run
    assert gpu_check.main(["--dry-run", "--budget", "0", "--out", str(out)]) == 0
    (written,) = out.iterdir()
    rows = list(csv.DictReader(written.open()))
    assert [row["section"] for row in rows] == gpu_check.DEFAULT_SECTIONS
    assert all(row["ok"] == "" and row["note"].startswith("skipped: over the 0 s budget") for row in rows)
    assert capsys.readouterr().out.count("SKIP ") == len(rows)


# -- --out and the results' names ------------------------------------------------------------------------------

def test_results_path_is_under_out_and_names_date_device_and_versions(tmp_path):
    path = gpu_check.results_path(tmp_path / "x", "20261207-120000", "NVIDIA H100 80GB HBM3",
                                  (("torch", "2.11.0+cu128"), ("triton", "3.6.0")), mode="quick")
    assert path.parent == tmp_path / "x"
    assert path.name == "gpu_check_quick_20261207-120000_NVIDIA_H100_80GB_HBM3_torch2.11.0+cu128_triton3.6.0.csv"


def test_no_gpu_check_module_writes_under_a_path_of_its_own():
    """Every file goes under --out: only gpu_check.py opens a file (``results_path`` under --out), and the only
    results folder its sources name is --out's default."""
    for path in sorted(BENCH.glob("gpu_check*.py")):
        code = path.read_text().replace("``bench/results``", "")  # the docstrings' mentions of the default
        assert "bench/results" not in code, path
        if path.name == "gpu_check.py":
            assert code.count('"results"') == 1 and code.count("open(") == 1, "ROOT / 'bench' / 'results': --out"
        else:
            assert '"results"' not in code and "open(" not in code and "write_text" not in code, path


def test_no_section_hard_codes_a_peak():
    """Peaks come from bench/gpu_peaks.py by device name: no H100 number is written into a section."""
    peaks = importlib.import_module("gpu_peaks")
    numbers = {f"{value:g}" for _, entry in peaks.PEAKS if "H100" in entry.model
               for value in (entry.tflops, entry.gb_s) if value}
    for path in sorted(BENCH.glob("gpu_check*.py")):
        words = set(re.findall(r"\d+(?:\.\d+)?", path.read_text()))
        assert not words & numbers, (path.name, words & numbers)


# -- failures become rows --------------------------------------------------------------------------------------

def test_a_backward_comparison_that_raises_is_a_fail_row():
    label = dict(mask="causal", seq_len=64, dtype="bfloat16", batch=1, q_heads=2, kv_heads=2, head_dim=16)
    (row,) = backward.guarded_rows(label, lambda: [][0])
    assert row["ok"] is False and row["impl"] == "ours" and "IndexError" in row["note"]
    csv_row = gpu_check.backward_csv_row(row, 16)
    assert csv_row["ok"] is False and "IndexError" in csv_row["note"] and csv_row["ms"] == ""
    assert gpu_check.row_status(csv_row) == "FAIL"

    def out_of_memory():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\ndetail")

    (skipped,) = backward.guarded_rows(label, out_of_memory)
    assert skipped["ok"] is None and skipped["note"].startswith("skipped: out of GPU memory")


def test_backward_section_goes_on_after_a_failing_mask_and_the_run_fails(monkeypatch):
    def compare_case(*, mask, seq_len, head_dim, **rest):
        if mask == "document":
            raise AssertionError("dK mismatch")
        return [dict(mask=mask, seq_len=seq_len, impl="ours", ms=1.0, tflops=2.0, max_grad_error=0.01, bound=0.02,
                     ok=True, deterministic=True)]

    monkeypatch.setattr(backward, "compare_case", compare_case)
    args = gpu_check.parse_args(["--dry-run", "--head-dims", "16"])
    rows = []
    assert gpu_check.run_backward(args, torch.device("cpu"), torch.bfloat16, rows.append) is False
    assert [row["mask"] for row in rows] == list(backward.shared_masks(64, "cpu"))
    (failed,) = [row for row in rows if row["ok"] is False]
    assert failed["mask"] == "document" and "AssertionError: dK mismatch" in failed["note"]


def test_a_quick_check_that_raises_is_a_fail_row(monkeypatch):
    def broken(context):
        raise ValueError("bad launch")

    good = quick.QuickCheck("good", ("x",), torch.float32, (), 1, lambda context: dict(ok=True, note="fine"))
    bad = quick.QuickCheck("bad", ("y",), torch.float32, (), 1, broken)
    monkeypatch.setattr(quick, "quick_checks", lambda args: [bad, good])
    rows = []
    assert not quick.run_quick(gpu_check.parse_args(["--dry-run", "--quick"]), torch.device("cpu"), torch.float32,
                               rows.append)
    assert [(row["mask"], row["ok"]) for row in rows] == [("bad", False), ("good", True)]
    assert "ValueError: bad launch" in rows[0]["note"]


def test_the_numerics_rule_of_the_quick_checks():
    golden = torch.randn(4, 8, dtype=torch.float64)
    baseline = golden + 1e-3
    fine = quick.rule([("out", golden + 1.9e-3, baseline, golden, 2.0)], torch.float32)
    assert fine["ok"] and float(fine["max_error"]) == pytest.approx(1.9e-3)
    off = quick.rule([("out", golden, baseline, golden, 2.0), ("dq", golden + 5e-3, baseline, golden, 3.0)],
                     torch.float32)
    assert not off["ok"] and off["note"] == "worst: dq"
    nan = quick.rule([("out", golden * float("nan"), baseline, golden, 2.0)], torch.float32)
    assert not nan["ok"]


# -- --quick covers every kernel family ------------------------------------------------------------------------

def test_quick_checks_every_kernel_family_in_bf16_and_float32():
    args = gpu_check.parse_args(["--quick"])
    assert args.sections == ["quick", "cuda_graph"]
    found = quick.covered(quick.quick_checks(args))
    assert set(found) == set(quick.FAMILIES)
    for family, dtypes in found.items():
        assert dtypes == ({"-"} if family == "refiner" else {"bf16", "fp32"}), family
    decode, prefill = graphs.graph_shapes(args)
    assert prefill is None and decode["layers"] >= 4  # --quick captures the decode step only


# -- the FlexAttention guard -----------------------------------------------------------------------------------

def test_flex_verdict_flags_calls_that_ran_eagerly():
    assert flex.flex_verdict(3, 3, 1) == (True, "compiled (3 calls, 1 compile)")
    assert flex.flex_verdict(5, 5, 0).ok
    eager = flex.flex_verdict(3, 0, 0)
    assert not eager.ok and "EAGER" in eager.note and "none of 3" in eager.note
    partial = flex.flex_verdict(3, 1, 1)
    assert not partial.ok and "EAGER on 2 of 3" in partial.note
    assert not flex.flex_verdict(0, 0, 0).ok


def test_counting_backend_sees_dynamos_fallback_and_fullgraph_refuses_it():
    """Past the recompile limit dynamo runs the function eagerly: the counter says so; with fullgraph it raises."""
    def double(x):
        return x * 2 + 1

    torch._dynamo.reset()
    backend = flex.CountingBackend("eager")
    compiled = torch.compile(double, backend=backend, dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=1):
        for n in (3, 4, 5):
            compiled(torch.randn(n))
    assert (backend.compiles, backend.runs) == (1, 1)
    assert not flex.flex_verdict(3, backend.runs, backend.compiles).ok
    torch._dynamo.reset()
    guarded = flex.CompiledFlex(double, inner="eager")
    with torch._dynamo.config.patch(recompile_limit=1):
        since = guarded.snapshot()
        guarded(torch.randn(3))
        assert guarded.verdict(since).ok
        with pytest.raises(Exception, match="fullgraph"):
            guarded(torch.randn(4))
        with flex.flex_limits(16):  # raised for the run: every shape compiles, and runs compiled
            assert torch._dynamo.config.recompile_limit == 16
            since = guarded.snapshot()
            for n in (4, 5, 6):
                guarded(torch.randn(n))
            assert guarded.verdict(since) == (True, "compiled (3 calls, 3 compiles)")
        assert torch._dynamo.config.recompile_limit == 1
    torch._dynamo.reset()


# -- the CUDA-graph section's steps, eagerly on CPU --------------------------------------------------------------

def _decode_shape():
    args = gpu_check.parse_args(["--dry-run"])
    return graphs.graph_shapes(args)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_steps_match_the_golden_result_as_pages_grow(dtype):
    shape = _decode_shape()
    rows = graphs.decode_step_rows(shape, torch.device("cpu"), dtype, "torch")
    assert len(rows) == shape["steps"] and all(row["ok"] is True for row in rows), rows
    assert "pages appended so far 3" in rows[-1]["note"]  # sequences crossed into new pages in place


def test_decode_steps_catch_a_plan_that_misses_the_update(monkeypatch):
    """A captured graph reads the plan's buffers: a plan not refreshed each step must fail the check."""
    real = ta.plan_paged

    class Stale:
        def __init__(self, *args, **kwargs):
            self.plan = real(*args, **kwargs)

        def update(self, page_table, kv_lens):
            pass  # the step's lengths and pages never reach the plan

        def run(self, *args, **kwargs):
            return self.plan.run(*args, **kwargs)

    monkeypatch.setattr(ta, "plan_paged", Stale)
    rows = graphs.decode_step_rows(_decode_shape(), torch.device("cpu"), torch.float32, "torch")
    assert rows[0]["ok"] is True and all(row["ok"] is False for row in rows[1:]), rows


def test_decode_steps_skip_without_the_plan_api(monkeypatch):
    monkeypatch.setattr(graphs, "ta", SimpleNamespace(paged_attention=ta.paged_attention))  # an older checkout
    (row,) = graphs.decode_step_rows(_decode_shape(), torch.device("cpu"), torch.float32, "torch")
    assert row["ok"] == "" and row["note"] == "SKIP: this checkout has no plan_paged / write_paged_kv"


def test_prefill_steps_and_family_forwards_run_eagerly_through_the_interpreter():
    args = gpu_check.parse_args(["--dry-run"])
    prefill = graphs.graph_shapes(args)[1]
    rows = graphs.prefill_step_rows(prefill, torch.device("cpu"), torch.bfloat16, "interpret")
    assert len(rows) == prefill["steps"] and all(row["ok"] is True for row in rows), rows
    assert all("bit-identical to the eager step" in row["note"] for row in rows)
    rows = graphs.family_forward_rows(args, torch.device("cpu"), torch.bfloat16, "interpret")
    assert [row["mask"] for row in rows] == list(gpu_check.mask_families(1, args.check_seq, "cpu"))
    assert all(row["ok"] is True for row in rows), rows


# -- the flash section's correctness steps, eagerly on CPU -------------------------------------------------------

FLASH_ROWS = ["func_causal_gqa_alibi", "func_window_softcap", "varlen_causal", "kvcache_decode", "kvcache_chunk",
              "dropout"]


def _flash_rows(backend, dtype=torch.bfloat16):
    shape = flash.flash_shapes(gpu_check.parse_args(["--dry-run"]))
    return [row for _, step in flash.correctness_steps(shape, torch.device("cpu"), dtype, backend) for row in step()]


@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_flash_correctness_steps_pass_against_float64(backend):
    rows = _flash_rows(backend)
    assert [row["mask"] for row in rows] == FLASH_ROWS  # one head_dim in the dry run
    assert all(row["ok"] is True for row in rows), [row for row in rows if row["ok"] is not True]
    assert all(float(row["max_error"]) <= float(row["bound"]) for row in rows)
    notes = {row["mask"]: row["note"] for row in rows}
    assert "pages equal the reference copy after the append" in notes["kvcache_chunk"]
    assert "same seed bitwise equal" in notes["dropout"]


class _Wrong:
    """``triton_attn`` with one FlashAttention-2 semantic broken: the checks must fail the rows it touches."""

    def __init__(self, drop: str):
        self.drop = drop

    def flash_attn_func(self, *args, **kwargs):
        if self.drop in kwargs and self.drop != "dropout_p":
            kwargs.pop(self.drop)
        out = ta.flash_attn_func(*args, **kwargs)
        if self.drop == "dropout_p" and kwargs.get("return_dropout_mask"):
            return out[0], ~out[1]  # a mask that is not the one the call used
        return out

    def flash_attn_varlen_func(self, q, k, v, *args, **kwargs):
        if self.drop == "causal":
            kwargs["causal"] = False
        return ta.flash_attn_varlen_func(q, k, v, *args, **kwargs)

    def flash_attn_with_kvcache(self, q, k_cache, v_cache, k=None, v=None, **kwargs):
        if self.drop == "append":  # attends over the new tokens written to a copy: the caller's cache is unchanged
            k_cache, v_cache = k_cache.clone(), v_cache.clone()
        return ta.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, **kwargs)


@pytest.mark.parametrize("drop, failing", [
    ("alibi_slopes", {"func_causal_gqa_alibi"}), ("softcap", {"func_window_softcap"}),
    ("causal", {"func_causal_gqa_alibi", "varlen_causal", "dropout"}), ("append", {"kvcache_decode", "kvcache_chunk"}),
    ("dropout_p", {"dropout"})])
def test_flash_checks_fail_a_broken_semantic(monkeypatch, drop, failing):
    monkeypatch.setattr(flash, "ta", _Wrong(drop))
    rows = _flash_rows("torch")
    assert {row["mask"] for row in rows if row["ok"] is not True} == failing, rows


def test_a_flash_step_that_raises_is_a_fail_row_and_the_rest_run(monkeypatch):
    def broken():
        raise RuntimeError("varlen kernel exploded")

    steps = [("func", lambda: [dict(section="flash", mask="func_x", ok=True)]), ("varlen", broken),
             ("dropout", lambda: [dict(section="flash", mask="dropout", ok=True)])]
    monkeypatch.setattr(flash, "correctness_steps", lambda *args: steps)
    rows = []
    assert flash.run_flash(gpu_check.parse_args(["--dry-run"]), torch.device("cpu"), torch.bfloat16,
                           rows.append) is False
    assert [(row["mask"], row["ok"]) for row in rows] == [("func_x", True), ("varlen", False), ("dropout", True)]
    assert "RuntimeError: varlen kernel exploded" in rows[1]["note"]


@pytest.mark.parametrize("argv, budget", [([], 480.0), (["--quick"], 180.0)], ids=["default", "quick"])
def test_flash_is_in_a_run_only_when_its_budget_holds_it(argv, budget):
    """The flash section alone fits the default budget; it joins a run's sections exactly when the plan with
    it still fits that run's budget."""
    args, alone = _plan(["--sections", "flash"])
    assert "flash" in gpu_check.SECTIONS and sum(entry.seconds for entry in alone) <= args.budget_seconds
    args, plan = _plan(argv)
    sections = [name for name in args.sections if name != "flash"] + ["flash"]
    with_flash = plan_module.build_plan(args, sections)
    fits = sum(entry.seconds for entry in with_flash) <= budget
    assert ("flash" in args.sections) == fits


# -- end to end, through the interpreter -----------------------------------------------------------------------

def test_quick_dry_run_passes_every_check(tmp_path, capsys):
    assert gpu_check.main(["--dry-run", "--quick", "--out", str(tmp_path)]) == 0
    (written,) = tmp_path.glob("gpu_check_quick_*_cpu-interpreter_torch*_triton*.csv")
    rows = list(csv.DictReader(written.open()))
    checks = quick.quick_checks(gpu_check.parse_args(["--dry-run", "--quick"]))
    assert [(row["mask"], row["dtype"]) for row in rows if row["section"] == "quick"] == [
        (item.name, item.dtype_name) for item in checks]
    steps = [row for row in rows if row["section"] == "cuda_graph"]
    assert len(steps) == _decode_shape()["steps"]
    assert all(row["ok"] == "True" for row in rows), [row for row in rows if row["ok"] != "True"]
    printed = capsys.readouterr().out
    assert printed.startswith("plan (estimated seconds") and printed.count("PASS ") == len(rows)
