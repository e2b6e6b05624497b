"""The benchmark's helpers: the checkpoint tokenizer the onnxruntime-genai builder needs, and the
decode-step profile summary (run on a real ORT trace of the tiny model)."""

import json

import pytest

from benchmarks.make_checkpoint import ensure_tokenizer, hf_config, write_tokenizer
from benchmarks.profile_decode import format_summary, profile_ours, summarize_trace
from llmtrt.exporter.config import resolve_model
from llmtrt.exporter.onnx_export import ExportOptions, export
from llmtrt.pipelines.runtime.tokenizer import HFTokenizer


def test_tokenizer_covers_the_vocabulary_and_round_trips_any_text(tmp_path):
    transformers = pytest.importorskip("transformers")
    write_tokenizer(tmp_path, 300)
    (tmp_path / "config.json").write_text(json.dumps({**hf_config("156m"), "vocab_size": 300}))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))  # what the builder loads first
    assert len(hf) == 300 and (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    tok = HFTokenizer(tmp_path / "tokenizer.json")  # what llmtrt's calibration and eval read
    text = "héllo, wörld → 字 \x00\n"
    ids = tok.encode(text)
    assert tok.vocab_size == 300 and all(3 <= i < 259 for i in ids)  # bytes only: no <unk>, no specials
    assert tok.decode(ids) == text
    with pytest.raises(ValueError, match="below"):
        write_tokenizer(tmp_path / "small", 200)


def test_ensure_tokenizer_adds_tokenizer_and_special_ids_to_an_old_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 280, "model_type": "llama"}))
    ensure_tokenizer(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["model_type"]) == (1, 2, "llama")
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"]["<extra_20>"] == 279


def test_decode_profile_summarizes_only_the_decode_steps(tmp_path):
    source = resolve_model("tiny")
    exported = export(source, tmp_path / "custom", ExportOptions(dialect="custom"))
    trace = profile_ours(exported.onnx_path, source.config, tmp_path, prompt_len=8, steps=3)
    summary = summarize_trace(trace, top=50)
    assert summary["decode_steps"] == 3
    ops = {r["op"]: r for r in summary["top_ops"]}
    assert "MatMul" in ops and ops["MatMul"]["us_per_step"] > 0
    # every step runs the same nodes, so a whole count per step: counting the prompt's run too would give
    # 4/3 of it; at least qkv, o, gate_up, down per layer (fused at export) and the lm_head are MatMuls
    per_step = ops["MatMul"]["nodes_per_step"]
    assert float(per_step).is_integer() and per_step >= 4 * source.config.num_hidden_layers + 1
    assert 0 < summary["kernels_ms"] <= summary["step_ms"]
    text = format_summary({"model": "tiny", "prompt_tokens": 8, "threads": 2, "graphs": {"custom": summary}})
    assert "MatMul" in text and "custom: step" in text


def test_long_context_compares_the_two_runners_on_the_same_tokens(tmp_path):
    """benchmarks.long_context on the tiny model: three windows, both runners timed, positive step times."""
    from benchmarks.long_context import measure
    from llmtrt.exporter.config import resolve_model
    from llmtrt.exporter.onnx_export import ExportOptions
    from llmtrt.pipelines.artifacts import export_artifact

    out = tmp_path / "tiny"
    export_artifact(resolve_model("tiny"), out, ExportOptions(logits="last", max_positions=64))
    report = measure(out, prompt=8, tokens=48)
    assert [w["context"][0] for w in report["windows"]] == [8, 24, 40]
    assert all(w["as_written_ms"] > 0 and w["contrib_shared_ms"] > 0 for w in report["windows"])
    assert set(report["open_seconds"]) == {"as written", "contrib + shared buffers"}


def test_huge_pages_ab_opens_two_sessions_and_reports_both(tmp_path):
    """benchmarks.huge_pages on the tiny model: both sessions decode, the report has each figure."""
    from benchmarks.huge_pages import measure

    source = resolve_model("tiny")
    exported = export(source, tmp_path / "standard", ExportOptions(dialect="standard"))
    row = measure(exported.onnx_path, source.config, rounds=2, prompt_len=8, new_tokens=4)
    assert row["huge_tok_s"] > 0 and row["small_pages_tok_s"] > 0 and row["ratio"] > 0
    assert row["process_huge_mib_after_b"] >= row["process_huge_mib_after_a"] >= 0
    assert row["open_huge_s"] >= row["collapse_s"] >= 0
