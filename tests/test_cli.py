"""The ``triton-attn`` command: each subcommand's happy path at tiny sizes on CPU, and its error path
(one line on stderr, exit code 2)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from triton_attn import cli
from triton_attn.kernels.tuning.cache import TuningCache

ROOT = Path(__file__).resolve().parent.parent


def run(capsys, *argv):
    """(exit code, stdout, stderr) of ``triton-attn argv`` run in this process."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_:  # argparse usage errors
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "error" in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_ATTN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TRITON_ATTN_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_ATTN_AUTOTUNE", raising=False)


# -- show ---------------------------------------------------------------------------------------------------

def test_show_prints_block_picture(capsys):
    code, out, _ = run(capsys, "show", "sliding_window", "--window", "256", "--seq-len", "4096")
    assert code == 0
    assert "sliding window 256: Q_LEN=4096, KV_LEN=4096, BLOCK_SIZE=(128, 128), 32x32 blocks" in out
    assert "31 full, 62 partial" in out and "90.9% skipped" in out
    picture = [line for line in out.splitlines() if line.endswith("|")]
    assert len(picture) == 32 and picture[1].startswith("██░░")


def test_show_png_and_every_library_mask(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "pictures" / "doc.png"
    code, out, _ = run(capsys, "show", "document", "--seq-len", "1024", "--documents", "3", "--png", str(png))
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in cli.LIBRARY_MASKS:
        code, out, _ = run(capsys, "show", name, "--seq-len", "512", "--block-size", "64,128", "--grid", "0")
        assert code == 0 and "BLOCK_SIZE=(64, 128), 8x4 blocks" in out, out
    assert "score_mod: softcap" in out


@pytest.mark.parametrize("argv, fragment", [
    (("show", "diagonal"), "invalid choice"),
    (("show", "causal", "--grid", "-3"), "--grid must be an integer from 0"),
    (("show", "causal", "--grid", "100000"), "--grid must be an integer from 0"),
    (("show", "causal", "--seq-len", "99999999999"), "show builds at most"),
    (("show", "document", "--seq-len", "100000000", "--block-size", "16"), "show builds at most"),
    (("show", "causal", "--seq-len", "65536", "--grid", "0"), "--grid 0 prints one character per block"),
    (("show", "causal", "--seq-len", "0"), "--seq-len must be a positive integer"),
    (("show", "sliding_window", "--window", "-4"), "--window must be a positive integer"),
    (("show", "causal", "--block-size", "big"), "--block-size"),
    (("show", "causal", "--seq-len", "ten"), "invalid int value"),
])
def test_show_errors_are_one_line(capsys, argv, fragment):
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, fragment)


def test_show_png_unwritable_is_one_line(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run(capsys, "show", "causal", "--seq-len", "256", "--png", str(blocker / "x.png"))
    assert_one_line_error(code, err, "cannot write")


# -- info ---------------------------------------------------------------------------------------------------

def test_info_lists_versions_backends_and_cache(capsys, tmp_path):
    TuningCache().put("fwd|NVIDIA H100|sm90|bfloat16|d128|dv128|gqa1|q4096|kv4096|half",
                      {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}, ms=0.25)
    code, out, _ = run(capsys, "info")
    assert code == 0
    assert f"torch {torch.__version__}" in out and "triton " in out and "transformers " in out
    assert "torch      yes" in out
    assert str(tmp_path / "cache" / "autotune.json") in out and "(1 entry)" in out
    assert "BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3" in out
    if not torch.cuda.is_available():
        assert "triton     no  (needs a CUDA GPU)" in out


def test_info_with_corrupt_cache_warns_and_works(capsys, tmp_path):
    path = tmp_path / "cache" / "autotune.json"
    path.parent.mkdir(parents=True)
    path.write_text("garbage")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, _ = run(capsys, "info")
    assert code == 0 and "(0 entries)" in out
    assert any("corrupt" in str(w.message) for w in caught)


@pytest.mark.parametrize("value, fragment", [("many", "invalid int value"), ("-1", "non-negative")])
def test_info_bad_limit_is_one_line(capsys, value, fragment):
    code, _, err = run(capsys, "info", "--limit", value)
    assert_one_line_error(code, err, "--limit", fragment)


def test_info_and_check_say_when_the_interpreter_cannot_run(capsys, monkeypatch):
    """Triton < 3.7 with numpy >= 2.4: the interpreter fails on every kernel; info/check name the fix."""
    from triton_attn import versions

    fake = {"triton": "3.4.0", "numpy": "2.4.1"}
    monkeypatch.setattr(versions, "installed_version", lambda name: fake.get(name))
    versions.require_triton.cache_clear()
    try:
        code, out, _ = run(capsys, "info")
        assert code == 0 and "triton 3.4.0" in out and "numpy<2.4" in out
        assert "interpret  no" in out
        code, _, err = run(capsys, "check", "--backend", "interpret")
        assert_one_line_error(code, err, "numpy<2.4")
        fake["numpy"] = "2.3.5"
        assert versions.interpreter_problem() is None
        fake["triton"], fake["numpy"] = "3.3.1", "2.2.0"
        code, out, _ = run(capsys, "info")
        assert "Triton 3.3.1 is too old" in out and "triton>=3.4" in out
    finally:
        versions.require_triton.cache_clear()


# -- check --------------------------------------------------------------------------------------------------

def test_check_torch_backend(capsys):
    code, out, _ = run(capsys, "check", "--backend", "torch", "--seq-len", "40", "--quiet")
    assert code == 0, out
    assert "6/6 passed" in out
    for mask in ("none", "causal", "sliding_window", "document", "prefix_lm", "softcap"):
        assert f"torch      {mask}" in out


def test_check_every_available_backend(capsys):
    pytest.importorskip("triton")
    code, out, _ = run(capsys, "check", "--seq-len", "33", "--no-backward", "--quiet")
    assert code == 0, out
    backends = [name for name, ok, _ in cli.available_backends("cpu") if ok]
    assert f"{6 * len(backends)}/{6 * len(backends)} passed" in out
    assert "interpret" in backends or "kernels" in out


def test_check_reports_failures_with_exit_1(capsys, monkeypatch):
    import triton_attn.api as api

    real = api.attention

    def wrong(q, k, v, **kwargs):
        out, lse = real(q, k, v, **kwargs)
        return out + 1e-2, lse

    monkeypatch.setattr(api, "attention", wrong)
    code, out, _ = run(capsys, "check", "--backend", "torch", "--seq-len", "24", "--no-backward", "--quiet")
    assert code == 1 and "FAIL" in out and "0/6 passed" in out


@pytest.mark.parametrize("argv, fragment", [
    (("check", "--backend", "triton"), "triton"),
    (("check", "--dtype", "fp8"), "unknown dtype"),
    (("check", "--seq-len", "0"), "--seq-len"),
    (("check", "--device", "tpu:7"), "--device"),
])
def test_check_errors_are_one_line(capsys, argv, fragment):
    if torch.cuda.is_available() and "triton" in argv:
        pytest.skip("a GPU is present: the triton backend is available")
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, fragment)


# -- tune ---------------------------------------------------------------------------------------------------

def test_tune_without_gpu_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, _, err = run(capsys, "tune", "--mask", "causal", "--seq-len", "1024")
    assert_one_line_error(code, err, "CUDA GPU", "--dry-run")


def test_tune_dry_run_prunes_by_aot_compile(capsys):
    pytest.importorskip("triton")
    code, out, _ = run(capsys, "tune", "--dry-run", "--arch", "sm_80", "--mask", "causal", "--seq-len", "256",
                       "--head-dim", "64", "--dtype", "fp16", "--max-configs", "2", "--quiet")
    assert code == 0, out
    assert "search space for sm_80" in out and "causal L=256 D=64 float16" in out and "2 candidate configs" in out
    assert "survive pruning for sm_80" in out or "listing the search space only" in out
    if "survive" in out:
        assert "keep" in out and "smem" in out


def _tune_tiny_causal_under_the_interpreter(capsys):
    """``triton-attn tune --interpret`` on one tiny causal problem (L=64, D=16, fp32): (exit code, stdout)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code, out, _ = run(capsys, "tune", "--interpret", "--mask", "causal", "--seq-len", "64", "--head-dim", "16",
                           "--dtype", "fp32", "--heads", "2", "--block-size", "32", "--max-configs", "2", "--quiet")
    return code, out


def test_tune_flow_under_the_interpreter_stores_winners(capsys):
    """The GPU tuning flow end to end (real launcher, timing, cache), run by the Triton interpreter on CPU."""
    pytest.importorskip("triton")
    code, out = _tune_tiny_causal_under_the_interpreter(capsys)
    assert code == 0, out
    assert "causal L=64 D=16 float32" in out and "winners stored in" in out
    entries = TuningCache().entries()
    assert len(entries) == 1 and next(iter(entries)).startswith("fwd|cpu|sm0|float32|d16|dv16|gqa1|q64|kv64|half")
    code, out, _ = run(capsys, "tune", "--interpret", "--mask", "causal", "--seq-len", "64", "--head-dim", "16",
                       "--dtype", "fp32", "--heads", "2", "--block-size", "32", "--max-configs", "2", "--quiet")
    assert code == 0 and "already tuned" in out
    code, out, _ = run(capsys, "info")
    assert "(1 entry)" in out and "fwd|cpu|sm0|float32" in out


def test_tune_stores_winners_under_the_key_a_compiled_launch_looks_up(capsys, monkeypatch):
    """`triton-attn tune` must store its winner under the key the forward launch reads (which includes the
    mods' structure class), else a tuned config is never used."""
    pytest.importorskip("triton")
    import math

    import triton_attn as ta
    from triton_attn.kernels import entry
    from triton_attn.kernels.attention import forward_launch
    from triton_attn.kernels.tuning import search as tuning
    from triton_attn.masks import causal_mask

    code, out = _tune_tiny_causal_under_the_interpreter(capsys)
    assert code == 0, out
    stored = set(TuningCache().entries())
    looked_up = []
    original = tuning.select_config
    monkeypatch.setattr(tuning, "select_config", lambda key, default, **kw: looked_up.append(str(key)) or original(
        key, default, **kw))
    monkeypatch.setattr(forward_launch, "launch", lambda *args, **kwargs: None)  # no GPU: the lookup is the point
    generator = torch.Generator().manual_seed(0)  # the command's inputs
    q = torch.randn(1, 2, 64, 16, generator=generator)
    k, v = torch.randn(1, 2, 64, 16, generator=generator), torch.randn(1, 2, 64, 16, generator=generator)
    block_mask = ta.create_block_mask(causal_mask, None, None, 64, 64, BLOCK_SIZE=32)
    entry.prefill_forward(q, k, v, block_mask, score_mod=None, scale=1 / math.sqrt(16), interpret=False,
                          autotune=False)
    assert looked_up and looked_up[0] in stored, (looked_up, stored)


def test_tune_config_file_json_and_yaml(capsys, tmp_path):
    spec = {"shapes": [{"mask": ["causal", "sliding_window"], "seq_len": 512, "head_dim": [64, 128],
                        "dtype": "bf16", "heads": 8, "kv_heads": 2, "window": 128}]}
    path = tmp_path / "shapes.json"
    path.write_text(json.dumps(spec))
    args = cli.build_parser().parse_args(["tune", "--config", str(path)])
    shapes = cli.tune_shapes(args)
    assert [(s.mask, s.head_dim) for s in shapes] == [("causal", 64), ("causal", 128), ("sliding_window", 64),
                                                       ("sliding_window", 128)]
    assert all(s.kv_heads == 2 and s.dtype == "bfloat16" and s.mask_args == {"window": 128} for s in shapes)
    pytest.importorskip("yaml")
    yaml_path = tmp_path / "shapes.yaml"
    yaml_path.write_text("- mask: document\n  seq_len: [1024, 2048]\n  head_dim: 64\n  dtype: fp16\n")
    args = cli.build_parser().parse_args(["tune", "--config", str(yaml_path)])
    assert [(s.mask, s.seq_len, s.dtype) for s in cli.tune_shapes(args)] == [("document", 1024, "float16"),
                                                                            ("document", 2048, "float16")]


@pytest.mark.parametrize("content, fragment", [
    ("{broken", "not valid JSON"),
    ('{"shapes": []}', "non-empty list of shapes"),
    ('[{"mask": "causal", "seqlen": 4}]', "unknown key(s) seqlen"),
    ('[{"mask": "zigzag"}]', "unknown mask 'zigzag'"),
    ('[{"heads": 6, "kv_heads": 4}]', "not a multiple"),
    ('[{"dtype": "int8"}]', "unknown dtype"),
])
def test_tune_bad_config_file_is_one_line(capsys, tmp_path, content, fragment):
    path = tmp_path / "spec.json"
    path.write_text(content)
    code, _, err = run(capsys, "tune", "--dry-run", "--config", str(path))
    assert_one_line_error(code, err, fragment)


@pytest.mark.parametrize("argv, fragment", [
    (("tune", "--dry-run", "--config", "/nonexistent/spec.json"), "cannot read"),
    (("tune", "--dry-run", "--arch", "hopper"), "--arch"),
    (("tune", "--dry-run", "--seq-len", "-1"), "seq_len"),
    (("tune", "--mask", "nope"), "invalid choice"),
])
def test_tune_errors_are_one_line(capsys, argv, fragment):
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, fragment)


def test_tune_into_an_unwritable_cache_fails_before_tuning(capsys, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.setenv("TRITON_ATTN_CACHE_DIR", str(blocker / "cache"))
    code, out, err = run(capsys, "tune", "--interpret", "--mask", "causal", "--seq-len", "64", "--head-dim", "16",
                         "--dtype", "fp32", "--heads", "2", "--block-size", "32", "--max-configs", "1", "--quiet")
    assert_one_line_error(code, err, "cannot write the autotune cache", "TRITON_ATTN_CACHE_DIR")
    assert "winners stored" not in out


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root ignores permission bits")
def test_tune_into_a_read_only_cache_dir_fails(capsys, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o500)
    try:
        code, out, err = run(capsys, "tune", "--interpret", "--mask", "causal", "--seq-len", "64", "--head-dim", "16",
                             "--dtype", "fp32", "--heads", "2", "--block-size", "32", "--max-configs", "1", "--quiet")
    finally:
        cache.chmod(0o700)
    assert_one_line_error(code, err, "cannot write the autotune cache")
    assert "winners stored" not in out


def test_tune_whose_write_is_lost_exits_1(capsys, monkeypatch):
    """A write that fails after the up-front check (disk full, folder removed) is detected by reading back."""
    pytest.importorskip("triton")
    cache_type = type(TuningCache())

    def failing_write(self, path, entries):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_type, "_write_atomic", failing_write)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code, out, err = run(capsys, "tune", "--interpret", "--mask", "causal", "--seq-len", "64", "--head-dim", "16",
                             "--dtype", "fp32", "--heads", "2", "--block-size", "32", "--max-configs", "1", "--quiet")
    assert code == 1 and "winners stored" not in out
    assert err.strip().splitlines()[-1].startswith("triton-attn tune: error: 1 of 1 winners were not stored")


# -- bench --------------------------------------------------------------------------------------------------

def test_bench_tiny_run_writes_csv_png_and_summary(capsys, tmp_path):
    out_dir = tmp_path / "results"
    code, out, _ = run(capsys, "bench", "--impl", "ours", "sdpa", "--mask", "causal", "document", "softcap",
                       "--seq-len", "128", "--heads", "2", "--repeats", "1", "--out", str(out_dir), "--quiet")
    assert code == 0, out
    files = sorted(p.suffix for p in out_dir.iterdir())
    assert files == [".csv", ".md", ".png"] if _has_matplotlib() else [".csv", ".md"]
    csv_path = next(out_dir.glob("*.csv"))
    assert "torch" + torch.__version__.split("+")[0] in csv_path.name
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 3 * 2 * 2  # masks x implementations x (fwd, bwd)
    ok = [r for r in rows if r["status"] == "ok"]
    assert {(r["impl"], r["pass"]) for r in ok} == {("ours", "fwd"), ("ours", "bwd"), ("sdpa", "fwd"), ("sdpa", "bwd")}
    softcap_sdpa = [r for r in rows if r["mask"] == "softcap" and r["impl"] == "sdpa"]
    assert all(r["status"].startswith("n/a") for r in softcap_sdpa)
    causal = next(r for r in rows if r["mask"] == "causal" and r["impl"] == "ours" and r["pass"] == "fwd")
    assert abs(float(causal["density"]) - 129 / 256) < 1e-6 and float(causal["tflops"]) > 0
    assert all(r["device"] and r["date"] and r["torch"] for r in rows)
    assert "| causal | 128 |" in next(out_dir.glob("*.md")).read_text()


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401  (only whether it imports)
    except ImportError:
        return False
    return True


def test_bench_flex_timeout_is_recorded_not_fatal(capsys, tmp_path):
    code, out, _ = run(capsys, "bench", "--impl", "flex", "--mask", "causal", "--seq-len", "64", "--heads", "1",
                       "--repeats", "1", "--flex-timeout", "0.5", "--out", str(tmp_path), "--quiet")
    assert code == 0, out
    rows = list(csv.DictReader(next(tmp_path.glob("*.csv")).open()))
    assert rows and all("TimeoutError" in r["status"] for r in rows)


@pytest.mark.parametrize("argv, fragment", [
    (("bench", "--seq-len", "0"), "--seq-len must be positive"),
    (("bench", "--mask", "zigzag"), "invalid choice"),
    (("bench", "--dtype", "int4", "--impl", "ours"), "unknown dtype"),
])
def test_bench_errors_are_one_line(capsys, argv, fragment):
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, fragment)


def test_bench_out_under_a_file_fails_before_running(capsys, tmp_path, monkeypatch):
    import triton_attn.commands.bench as bench

    blocker = tmp_path / "file"
    blocker.write_text("x")
    ran = []
    monkeypatch.setattr(bench, "_run_in_process", lambda *a: ran.append(a) or 0)
    for argv in (("bench", "--quick", "--out", str(blocker / "results")), ("bench", f"--out={blocker}")):
        code, _, err = run(capsys, *argv)
        assert_one_line_error(code, err, "--out")
    assert not ran


def test_bench_lists_and_runs_any_script_by_name(capfd, tmp_path):
    (tmp_path / "bench_attention.py").write_text('"""The attention suite (stand-in)."""\n')
    (tmp_path / "bench_hello.py").write_text(
        '"""Say hello: a plain script run in a child process."""\n'
        "import sys\nprint('hello', sys.argv[1:])\nsys.exit(3 if '--fail' in sys.argv else 0)\n")
    (tmp_path / "_helper.py").write_text("raise SystemExit('never listed, never run')\n")
    code = cli.main(["bench", "--dir", str(tmp_path), "--list"])
    out = capfd.readouterr().out
    assert code == 0 and "hello" in out and "Say hello: a plain script" in out and "attention" in out
    assert "_helper" not in out
    assert cli.main(["bench", "--dir", str(tmp_path), "hello", "--n", "2"]) == 0
    assert "hello ['--n', '2']" in capfd.readouterr().out
    assert cli.main(["bench", "--dir", str(tmp_path), "bench_hello.py", "--fail"]) == 3
    assert cli.main(["bench", "--dir", str(tmp_path), "nope"]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "no benchmark script 'nope'" in err and "hello" in err


def test_bench_checkout_scripts_are_listed(capsys):
    code, out, _ = run(capsys, "bench", "--list")
    assert code == 0
    for name in ("attention", "block_mask", "gpu_check"):
        assert f"  {name} " in out


def test_bench_from_an_installed_wheel_says_what_to_do(capsys, monkeypatch, tmp_path):
    import triton_attn.commands.bench as bench

    monkeypatch.setattr(bench, "bench_dir", lambda explicit=None: None)
    code, _, err = run(capsys, "bench", "--quick")
    assert_one_line_error(code, err, "git clone", "pip install -e '.[bench]'", "--dir")
    code, out, _ = run(capsys, "bench", "--help")
    assert code == 0 and "git clone" in out


# -- help, version, defaults ---------------------------------------------------------------------------------

def test_version(capsys):
    import triton_attn

    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"triton-attn {triton_attn.__version__}"


def _subcommands():
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    return action.choices


def test_every_option_help_shows_its_default():
    for name, sub in _subcommands().items():
        for action in sub._actions:
            if not action.option_strings or action.nargs == 0 or action.help == __import__("argparse").SUPPRESS:
                continue  # positionals, flags (store_true), --help
            text = sub.formatter_class(prog="x")._get_help_string(action)
            assert "default" in text, f"triton-attn {name} {action.option_strings[0]}: {text!r}"


def run_python(code: str) -> subprocess.CompletedProcess:
    """``python -c code`` in a fresh interpreter that imports this checkout."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_import_is_lazy_and_public_names_resolve():
    result = run_python("import sys, triton_attn\n"
                        "assert 'torch' not in sys.modules and 'triton' not in sys.modules, 'import loaded torch'\n"
                        "assert callable(triton_attn.attention) and triton_attn.BlockMask.__name__ == 'BlockMask'\n"
                        "assert set(triton_attn.__all__) <= set(dir(triton_attn))\n"
                        "from triton_attn import CompactBlockMask, create_block_mask, create_mask\n"
                        "print('triton' in sys.modules)\n")
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stdout + result.stderr


def test_help_and_version_import_neither_torch_nor_triton():
    result = run_python("import sys\nfrom triton_attn import cli\n"
                        "for argv in (['--help'], ['--version'], *([c, '--help'] for c in ('demo', 'tune', 'show', "
                        "'info', 'check', 'bench')), ['bench', '--list']):\n"
                        "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n"
                        "print('\\nloaded:', sorted(m for m in ('torch', 'triton', 'numpy') if m in sys.modules))\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "loaded: []", result.stdout[-500:]
    assert "usage: triton-attn tune" in result.stdout and "(default: 4096)" in result.stdout


def test_demo_device_errors_are_one_line(capsys):
    if torch.cuda.is_available():
        argvs = [("demo", "--device", "xyz")]
    else:
        argvs = [("demo", "--device", "xyz"), ("demo", "--device", "cuda")]
    for argv in argvs:
        code, _, err = run(capsys, *argv)
        assert_one_line_error(code, err, "--device")


# -- the installed entry point ------------------------------------------------------------------------------

def test_module_entry_point_error_is_one_line_exit_2():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-m", "triton_attn.cli", "show", "causal", "--seq-len", "-1"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("triton-attn show: error:")


# -- check --targets (the ahead-of-time matrix) ---------------------------------------------------------------

def test_check_targets_builds_the_matrix_and_prints_it(capsys):
    pytest.importorskip("triton")
    from tests.helpers.toolchain import nvidia_toolchain_available

    if not nvidia_toolchain_available(80):
        pytest.skip("no Triton NVIDIA toolchain")
    code, out, _ = run(capsys, "check", "--targets", "sm_80", "--fast", "--families", "preprocess,combine", "--quiet")
    assert code == 0, out
    assert "2 ahead-of-time builds for sm_80" in out
    lines = [line for line in out.splitlines() if line.startswith("sm_80 ")]
    assert [line.split()[1] for line in lines] == ["preprocess", "combine"] and all(" ok" in line for line in lines)
    assert "2/2 builds pass on sm_80" in out


def test_check_targets_rejects_unknown_names(capsys):
    code, _, err = run(capsys, "check", "--targets", "sm_75")
    assert_one_line_error(code, err, "--targets", "unknown target 'sm_75'", "gfx942")
    code, _, err = run(capsys, "check", "--targets", "all", "--families", "forward,attention")
    assert_one_line_error(code, err, "--families", "attention")


def test_info_names_the_proven_targets(capsys):
    code, out, _ = run(capsys, "info")
    assert code == 0
    assert "GPU targets proven ahead of time: sm_80, sm_86, sm_89, sm_90, sm_100, sm_120, gfx90a, gfx942, gfx950" in out


def test_info_target_coverage_lines():
    from triton_attn.commands.info import target_coverage

    assert target_coverage("cuda", 90).startswith("sm_90 (Hopper): covered")
    assert "not covered" in target_coverage("cuda", 87) and "nearest target, sm_86" in target_coverage("cuda", 87)
    assert target_coverage("hip", "gfx942").startswith("gfx942 (CDNA3): covered")
