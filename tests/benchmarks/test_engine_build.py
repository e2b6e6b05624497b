"""benchmarks/engine_build.py and benchmarks/int4_graph.py on the tiny model: the measured build row
has the figures the docs quote, and the synthetic int4 graph builds as an int4 export."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from benchmarks.engine_build import build_row, format_table, sampled_run
from benchmarks.int4_graph import int4_graph

ROOT = Path(__file__).resolve().parents[2]
rtx = pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx_bindings") is None,
                         reason="TensorRT-RTX not installed (pip install 'llmtrt[rtx]')")


def test_sampled_run_reports_peak_memory():
    run = sampled_run([sys.executable, "-c", "x = bytearray(300 << 20); import time; time.sleep(0.5)"])
    assert run["rc"] == 0 and run["peak_anon_bytes"] >= 300 << 20 and run["peak_rss_bytes"] >= 300 << 20


@rtx
def test_int4_graph_builds_and_its_row_has_the_figures(tmp_path):
    summary = int4_graph("tiny", tmp_path / "int4", block_size=32)
    model = onnx.load(summary["onnx"], load_external_data=False)
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert dq and all({a.name for a in n.attribute} == {"axis", "block_size"} for n in dq)
    assert not any(t.name.startswith(("lm_head", "model.embed_tokens")) and t.data_type == onnx.TensorProto.INT4
                   for t in model.graph.initializer)
    manifest = json.loads((tmp_path / "int4" / "manifest.json").read_text())
    assert manifest["precision"] == "int4" and "synthetic" in manifest
    row = build_row(tmp_path / "int4", tmp_path / "engine", "tiny int4", max_kv=64)
    assert row["precision"] == "int4" and row["profiles"] == ["prefill+decode"], row
    assert row["plan_bytes"] > row["weights_bytes"] > 0 and row["peak_rss_bytes"] >= row["peak_anon_bytes"] > 0
    assert row["fused_gemm_groups"] == 4 and not (tmp_path / "engine").exists()  # 2 layers x (qkv, gate/up)
    table = format_table({"rows": [row, {"model": "x", "error": "boom"}], "flag_refusal_seconds": 0.5})
    assert "tiny int4" in table and "error: boom" in table


def test_engine_build_help():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.engine_build", "--help"], cwd=ROOT, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0 and "--int4-8b" in proc.stdout
