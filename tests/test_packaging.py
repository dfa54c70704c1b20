"""Packaging: metadata, dependency floors, and "installing into a torch 2.8 environment leaves torch alone".

The install check is offline: pip's real resolver runs against a folder of stub wheels (torch 2.8.0 pinning
triton 3.4.0, as the real torch 2.8.0 does, plus newer torch/triton stubs that an over-tight floor would pull
in) and our freshly built wheel, into a bare venv where the torch 2.8 stub is installed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
tomllib = pytest.importorskip("tomllib")
requirements = pytest.importorskip("packaging.requirements")


def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirement(project, name):
    return next(requirements.Requirement(r) for r in project["dependencies"] if r.startswith(name))


def test_metadata_license_urls_version():
    import triton_attn

    project = pyproject()
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert not any(c.startswith("License ::") for c in project["classifiers"])  # PEP 639: the expression only
    assert {"Homepage", "Source", "Issues"} <= set(project["urls"])
    assert "version" in project["dynamic"] and triton_attn.__version__.count(".") == 2
    assert any(r.startswith("transformers") for r in project["optional-dependencies"]["hf"])


def test_floors_admit_what_torch_2_8_brings():
    from triton_attn import versions

    project = pyproject()
    torch_req, numpy_req = requirement(project, "torch"), requirement(project, "numpy")
    assert torch_req.specifier.contains("2.8.0") and not torch_req.specifier.contains("2.7.1")
    assert str(torch_req.specifier) == ">=" + ".".join(map(str, versions.MIN_TORCH))
    assert numpy_req.specifier.contains("1.26.4") and numpy_req.specifier.contains("2.2.6")
    assert not any(r.startswith("triton") for r in project["dependencies"]), \
        "torch brings Triton; a requirement here would overwrite ROCm's pytorch-triton-rocm"
    triton_req = requirements.Requirement(project["optional-dependencies"]["triton"][0])
    assert str(triton_req.specifier) == ">=" + ".".join(map(str, versions.MIN_TRITON))
    assert triton_req.specifier.contains("3.4.0")


def _stub_wheel(folder: Path, name: str, version: str, requires=()):
    """A minimal valid wheel with metadata only."""
    dist = f"{name.replace('-', '_')}-{version}"
    files = {
        f"{dist}.dist-info/METADATA": "Metadata-Version: 2.1\nName: {}\nVersion: {}\n{}".format(
            name, version, "".join(f"Requires-Dist: {r}\n" for r in requires)),
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: stub\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }

    def record_hash(text: str) -> str:  # the RECORD form: urlsafe base64 of the digest, no '=' padding
        return base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()

    record = "".join(f"{path},sha256={record_hash(text)},{len(text.encode())}\n" for path, text in files.items())
    files[f"{dist}.dist-info/RECORD"] = record + f"{dist}.dist-info/RECORD,,\n"
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)


def _pip(*args, timeout=180):
    # No pip configuration, no PIP_* variables: only the folders given here.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def _to_install(pip_python: str, wheels: Path, target: str, report: Path):
    result = _pip("--python", pip_python, "install", "--dry-run", "--no-index", "--find-links", str(wheels),
                  "--report", str(report), target)
    assert result.returncode == 0, result.stdout + result.stderr
    return {item["metadata"]["name"]: item["metadata"]["version"] for item in json.loads(report.read_text())["install"]}


def test_install_into_a_torch_2_8_venv_leaves_torch_alone(tmp_path):
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip("building the wheel offline needs setuptools>=77 (PEP 639) in this environment")
    pip_version = _pip("--version").stdout.split()[1]
    if tuple(int(p) for p in pip_version.split(".")[:2]) < (23, 0):
        pytest.skip(f"pip {pip_version} has no --python / --report")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    built = _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels), str(ROOT), timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    ours = next(wheels.glob("triton_attn-*.whl"))
    _stub_wheel(wheels, "torch", "2.8.0", ["triton==3.4.0"])
    _stub_wheel(wheels, "torch", "2.13.0", ["triton==3.9.0"])  # what an over-tight floor would pull in
    _stub_wheel(wheels, "triton", "3.4.0")
    _stub_wheel(wheels, "triton", "3.9.0")
    _stub_wheel(wheels, "numpy", "2.2.6")
    _stub_wheel(wheels, "needs-newer-torch", "1.0", ["torch>=2.9"])  # the control: an upgrade is visible
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True, timeout=120)
    python = str(tmp_path / "venv" / "bin" / "python")
    installed = _pip("--python", python, "install", "--no-index", "--find-links", str(wheels), "torch==2.8.0")
    assert installed.returncode == 0, installed.stdout + installed.stderr

    plan = _to_install(python, wheels, str(ours), tmp_path / "ours.json")
    assert "torch" not in plan and "triton" not in plan, plan
    assert plan == {"triton-attn": ours.name.split("-")[1], "numpy": "2.2.6"}
    control = _to_install(python, wheels, "needs-newer-torch", tmp_path / "control.json")
    assert control.get("torch") == "2.13.0", control

