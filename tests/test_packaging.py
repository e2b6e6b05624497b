"""The installed distribution: one namespace (llmtrt.*), the configs inside it as package data, and a
`pip install .` that runs the demo pipeline from any directory."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, cwd=out)
    (found,) = out.glob("llmtrt-*.whl")
    return found


def test_wheel_holds_one_namespace_and_the_configs(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names if not n.startswith("llmtrt-")}
    assert tops == {"llmtrt"}, f"top-level names besides llmtrt: {tops - {'llmtrt'}}"
    for data in ("llmtrt/configs/tolerances.yaml", "llmtrt/configs/compare_thresholds.yaml",
                 "llmtrt/configs/pipelines/demo.yaml", "llmtrt/configs/text/calib.txt", "llmtrt/configs/text/eval.txt",
                 "llmtrt/configs/models/tiny.yaml", "llmtrt/configs/models/bytes-llama/config.json",
                 "llmtrt/configs/models/bytes-llama/model.safetensors", "llmtrt/exporter/model.py",
                 "llmtrt/plugins/gqa_attention/__init__.py", "llmtrt/pipelines/cli/__init__.py"):
        assert data in names, f"{data} is missing from {wheel.name}"
    assert not [n for n in names if n.startswith(("llmtrt/tools", "llmtrt/tests", "llmtrt/benchmarks"))]


@pytest.mark.slow
def test_installed_wheel_runs_the_demo_pipeline_from_elsewhere(wheel, tmp_path):
    """pip install (not editable) into a fresh venv, then `llmtrt pipeline run demo` from a directory with
    no source tree. The dependencies come from this environment (a .pth file; its editable finder for
    the checkout is not loaded), llmtrt itself only from the wheel."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(python), "-c", "import llmtrt.exporter, llmtrt.configs as c; "
                            "print(llmtrt.exporter.__file__); print(c.path('pipelines', 'demo.yaml'))"],
                           check=True, capture_output=True, text=True, cwd=work, env=env).stdout.splitlines()
    assert all(line.startswith(site) for line in where), where  # the wheel's copy, not the checkout
    run = subprocess.run([str(venv / "bin" / "llmtrt"), "pipeline", "run", "demo", "--out", "x"],
                         capture_output=True, text=True, cwd=work, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (work / "x" / "reports" / "report.md").is_file()
