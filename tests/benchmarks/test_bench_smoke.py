"""`make bench` smoke test: the quick benchmark runs, prints its table and writes a complete JSON report."""

import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.run import bytes_per_token, format_table
from exporter.config import resolve_model

ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_runs_and_reports(tmp_path):
    report_path = tmp_path / "bench.json"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--work", str(tmp_path / "work"),
                           "--json", str(report_path)], cwd=ROOT, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
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
    assert format_table(report) in proc.stdout
    assert seconds < 60, f"--quick took {seconds:.0f} s; it is the CI smoke test and must stay under a minute"


def test_bytes_per_token_counts_weights_but_the_embedding_and_the_cache():
    c = resolve_model("tiny").config
    weights = c.num_parameters - c.vocab_size * c.hidden_size
    assert bytes_per_token(c, 0) == 4 * weights
    assert bytes_per_token(c, 10) - bytes_per_token(c, 0) == 4 * 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 10
