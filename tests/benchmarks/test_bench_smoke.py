"""`make bench` smoke test: the quick benchmark runs, prints its table and writes a complete JSON report."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks.run import _ratios, bytes_per_token, format_table
from llmtrt.exporter.config import resolve_model

ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_runs_and_reports(tmp_path):
    report_path = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--work", str(tmp_path / "work"),
                           "--json", str(report_path)], cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(report_path.read_text())
    assert [r["model"] for r in report["export"]] == ["tiny", "bytes-llama"]
    for row in report["export"]:
        assert row["export_seconds"] > 0 and row["peak_rss_bytes"] > 0
    rows = report["decode"]["rows"]
    assert {r["dialect"] for r in rows if r["runtime"] == "onnxruntime"} == {"custom", "standard", "decomposed"}
    assert any(r["runtime"] == "pytorch-eager" for r in rows)
    for row in rows:
        assert row["decode_tok_s"] > 0 and row["prefill_ms"] > 0 and row["of_bound"] > 0
    assert report["memory_bandwidth_gbs"] > 0
    assert report["onnxruntime_genai"] == "not measured: --quick"
    eager = next(r for r in rows if r["runtime"] == "pytorch-eager")  # bytes-llama: a trained HF checkpoint
    assert eager["max_abs_logit_diff_vs_ref"] < 1e-3 and eager["greedy_tokens_equal_ref"] == report["decode"]["new_tokens"]
    assert format_table(report) in proc.stdout


def test_bytes_per_token_counts_weights_but_the_embedding_and_the_cache():
    c = resolve_model("tiny").config
    weights = c.num_parameters - c.vocab_size * c.hidden_size
    assert bytes_per_token(c, 0) == 4 * weights
    assert bytes_per_token(c, 10) - bytes_per_token(c, 0) == 4 * 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 10


def _row(graph, precision, tok_s, prefill_ms, tokens, logits, runtime="onnxruntime"):
    return {"runtime": runtime, "graph": graph, "dialect": "-", "precision": precision, "decode_tok_s": tok_s,
            "prefill_ms": prefill_ms, "_tokens": tokens, "_prefill_logits": np.asarray(logits, np.float32)}


def test_ratios_pair_each_row_with_the_builder_of_its_bit_width_and_check_agreement():
    decode = {"bandwidth_bound_tok_s": 40.0, "rows": [
        _row("llmtrt", "fp32", 20.0, 100.0, [1, 2, 3], [0.0, 1.0]),
        _row("llmtrt", "int4-awq", 60.0, 80.0, [1, 2, 4], [0.0, 1.5]),
        _row("genai-builder 0.18.0", "fp32", 25.0, 50.0, [1, 2, 3], [0.0, 1.0], runtime="onnxruntime-genai"),
        _row("genai-builder 0.18.0", "int4", 80.0, 40.0, [9, 2, 3], [0.5, 1.0], runtime="onnxruntime-genai"),
        _row("transformers", "fp32", 10.0, 200.0, [1, 2, 3], [0.0, 1.25], runtime="pytorch-eager"),
    ]}
    _ratios(decode)
    ours, ours4, b32, b4, eager = decode["rows"]
    assert (ours["decode_vs_builder"], ours["prefill_vs_builder"], ours["decode_vs_eager"]) == (0.8, 2.0, 2.0)
    assert (ours4["decode_vs_builder"], ours4["prefill_vs_builder"], ours4["of_bound"]) == (0.75, 2.0, 1.5)
    assert "max_abs_logit_diff_vs_ref" not in ours  # the reference itself
    assert (ours4["max_abs_logit_diff_vs_ref"], ours4["greedy_tokens_equal_ref"]) == (0.5, 2)
    assert (b4["greedy_tokens_equal_ref"], b32["greedy_tokens_equal_ref"], eager["max_abs_logit_diff_vs_ref"]) == (0, 3, 0.25)
    assert decode["agreement_reference"] == "onnxruntime - fp32"
    assert not any(k.startswith("_") for row in decode["rows"] for k in row)
    assert "int4-awq" in format_table({"memory_bandwidth_gbs": 1.0, "cpu_count": 2, "threads": 2, "export": [],
                                       "onnxruntime_genai": "0.18.0", "load_average_start": [1.0, 1.0, 1.0],
                                       "decode": {**decode, "model": "m", "prompt_tokens": 3, "new_tokens": 3,
                                                  "bytes_per_token": 10**9, "errors": ["x"]}})
