import json
import math
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from llmtrt import configs
from llmtrt.exporter.config import resolve_model
from llmtrt.exporter.errors import LlmtrtUserError
from llmtrt.pipelines.checks.accuracy import (
    DEFAULT_THRESHOLDS,
    PYTORCH,
    Check,
    PrecisionMetrics,
    Thresholds,
    Totals,
    gate,
    load_thresholds,
    log_softmax,
    parse_thresholds,
    perplexity,
)
from llmtrt.pipelines.checks.compare import (
    compare_artifacts,
    evaluate,
    evaluate_runners,
    read_eval_tokens,
    windows,
)
from llmtrt.pipelines.cli import main
from llmtrt.pipelines.runtime.runners import PyTorchRunner
from llmtrt.pipelines.runtime.tokenizer import ByteTokenizer

EVAL = configs.path("text", "eval.txt")
SLICE = 2048  # tokens of eval.txt the end-to-end tests score


# --------------------------------------------------------------------------------------------
# metrics math against hand-computed values
# --------------------------------------------------------------------------------------------
def test_perplexity_of_known_distributions():
    probs = np.array([0.5, 0.25, 0.25])
    logp = log_softmax(np.log(probs)[None].repeat(2, 0))
    assert np.allclose(np.exp(logp), probs)
    # tokens 0 and 1 predicted with p = 0.5 and 0.25: ppl = (0.5 * 0.25) ** -0.5 = sqrt(8)
    assert perplexity(logp[[0, 1], [0, 1]]) == pytest.approx(math.sqrt(8), rel=1e-12)
    t = Totals()
    t.add(np.log(probs)[None].repeat(2, 0), np.array([0, 1]), np.log(probs)[None].repeat(2, 0))
    assert math.exp(t.nll / t.tokens) == pytest.approx(math.sqrt(8), rel=1e-12)
    # uniform over V: perplexity V whatever the targets
    u = Totals()
    u.add(np.zeros((5, 7)), np.arange(5), np.zeros((5, 7)))
    assert math.exp(u.nll / u.tokens) == pytest.approx(7.0, rel=1e-12)


def test_kl_agreement_and_logit_error_by_hand():
    ref = np.log(np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]))
    q = np.log(np.array([[0.75, 0.25], [0.6, 0.4], [0.6, 0.4]]))
    t = Totals()
    t.add(q, np.array([0, 0, 1]), ref)
    kl = [0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25),
          0.9 * math.log(0.9 / 0.6) + 0.1 * math.log(0.1 / 0.4),
          0.2 * math.log(0.2 / 0.6) + 0.8 * math.log(0.8 / 0.4)]
    assert t.kl / t.tokens == pytest.approx(sum(kl) / 3, rel=1e-12)
    assert kl[0] == pytest.approx(0.143841, abs=1e-6)
    # argmax: q = [0, 0, 0], ref = [0 (tie -> first), 0, 1]
    assert t.agree == 2
    assert t.correct == 2  # targets [0, 0, 1] vs q argmax [0, 0, 0]
    assert t.max_abs_logit_error == pytest.approx(max(np.abs(q - ref).ravel()), rel=1e-12)
    m = PrecisionMetrics.from_totals("x", "-", t, ref_perplexity=2.0)
    assert m.top1_agreement == pytest.approx(2 / 3)
    assert m.perplexity_increase == pytest.approx(m.perplexity / 2.0 - 1)


def test_non_finite_logits_fail_the_gate():
    t = Totals()
    t.add(np.array([[0.0, np.nan], [1.0, 0.0]]), np.array([0, 0]), np.zeros((2, 2)))
    m = PrecisionMetrics.from_totals("fp16", "-", t, 1.0)
    assert m.nonfinite_positions == 1 and math.isnan(m.max_abs_logit_error)
    checks, _ = gate({"fp32": m, "fp16": m}, load_thresholds(DEFAULT_THRESHOLDS))
    assert not all(c.passed for c in checks if c.subject == "fp16")
    assert not Check("fp16", "mean_kl", math.nan, 1.0, "<=").passed


def test_windows_are_non_overlapping_and_keep_a_useful_tail():
    tokens = np.arange(10)
    assert [w.tolist() for w in windows(tokens, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [len(w) for w in windows(np.arange(9), 4)] == [4, 4]  # a 1-token tail predicts nothing
    # bytes-llama's README: 48,724 held-out bytes in windows of 256 -> 48,533 predictions
    n = 48_724
    assert sum(len(w) - 1 for w in windows(np.zeros(n, dtype=np.int64), 256)) == 48_533
    with pytest.raises(LlmtrtUserError, match="--seq-len"):
        windows(tokens, 1)


def test_windows_start_with_bos_when_the_checkpoint_adds_it():
    tokens = np.arange(10, 18)
    assert [w.tolist() for w in windows(tokens, 4, bos_id=1)] == [[1, 10, 11, 12], [1, 13, 14, 15], [1, 16, 17]]
    assert [len(w) for w in windows(np.arange(7), 4, bos_id=1)] == [4, 4]  # [BOS, t] predicts nothing scored
    with pytest.raises(LlmtrtUserError, match="--seq-len must be at least 3"):
        windows(tokens, 2, bos_id=1)
    seen, vocab = [], 20

    def run(ids):  # logits at position p put all mass on the token that follows in the window
        seen.append(ids.tolist())
        out = np.zeros((*ids.shape, vocab))
        out[:, :-1][np.arange(ids.shape[0])[:, None], np.arange(ids.shape[1] - 1), ids[:, 1:]] = 50.0
        out[:, 0, 5] = 100.0  # BOS -> first text token (a cut mid-text) is wrong on purpose: not scored
        return out

    totals = evaluate_runners({"fp32": run}, tokens, seq_len=4, vocab=vocab, bos_id=1)
    assert seen == [[[1, 10, 11, 12], [1, 13, 14, 15]], [[1, 16, 17]]]
    assert totals["fp32"].tokens == 2 + 2 + 1      # the first text token of each window is context only
    assert totals["fp32"].correct == totals["fp32"].tokens


def test_pluggable_runners_see_the_same_windows():
    vocab, seen = 5, []
    rng = np.random.default_rng(0)
    table = rng.normal(size=(vocab, vocab))

    def ref(ids):
        seen.append(ids.shape)
        return table[ids]

    def noisy(ids):
        return table[ids] + 0.01

    totals = evaluate_runners({"fp32": ref, "shifted": noisy}, rng.integers(0, vocab, 21), seq_len=8, vocab=vocab)
    assert seen == [(2, 8), (1, 5)]
    assert totals["shifted"].tokens == 7 + 7 + 4
    # a constant shift leaves the softmax unchanged: same perplexity, full agreement, zero KL
    assert totals["shifted"].nll == pytest.approx(totals["fp32"].nll, rel=1e-12)
    assert totals["shifted"].agree == 18 and totals["shifted"].kl == pytest.approx(0, abs=1e-12)
    assert totals["shifted"].max_abs_logit_error == pytest.approx(0.01)


# --------------------------------------------------------------------------------------------
# thresholds YAML
# --------------------------------------------------------------------------------------------
def test_default_thresholds_hold_the_issue_targets():
    t = load_thresholds(DEFAULT_THRESHOLDS)
    targets = {"fp16": 0.001, "int8-sq": 0.01, "int8-wo": 0.005, "int4-awq": 0.05}
    assert {k: t.precisions[k].max_perplexity_increase for k in targets} == targets
    assert t.must_beat == {"int4-awq": "int4-rtn"}
    assert t.pytorch_reference.max_perplexity_rel_diff == 1e-4


@pytest.mark.parametrize("text, message", [
    ("precisions:\n  fp16:\n    max_ppl: 0.1\n", "precisions.fp16.max_ppl: unknown key"),
    ("precisions:\n  fp16:\n    max_mean_kl: lots\n", "precisions.fp16.max_mean_kl: expected a number, got 'lots'"),
    ("precisions:\n  fp16:\n    min_top1_agreement: true\n", "min_top1_agreement: expected a number"),
    ("precisions:\n  fp16:\n    min_top1_agreement: 1.5\n", "1.5 is above the maximum 1.0"),
    ("precisions:\n  fp16:\n    max_mean_kl: -1\n", "-1.0 is below the minimum 0.0"),
    ("precisions: {}\ngates: {}\n", "gates: unknown key"),
    ("precisions: [fp16]\n", "precisions: expected a mapping"),
    ("precisions:\n  fp16: 0.1\n", "precisions.fp16: expected a mapping"),
    ("pytorch_reference: {}\n", "precisions: required key is missing"),
    ("pytorch_reference:\n  tolerance: 1\nprecisions: {}\n", "pytorch_reference.tolerance: unknown key"),
    ("precisions: {}\nmust_beat:\n  int4-awq: 3\n", "must_beat.int4-awq: 'int4-awq' is not a precision listed"),
    ("precisions: [\n", "invalid YAML"),
    ("", "expected a mapping"),
])
def test_threshold_errors_name_key_and_file(tmp_path, text, message):
    path = tmp_path / "limits.yaml"
    path.write_text(text)
    with pytest.raises(LlmtrtUserError, match="limits.yaml") as info:
        load_thresholds(path)
    assert message in str(info.value)


def test_missing_thresholds_file(tmp_path):
    with pytest.raises(LlmtrtUserError, match="none.yaml: no such file"):
        load_thresholds(tmp_path / "none.yaml")


def _metrics(name, ppl, agree=1.0, kl=0.0):
    return PrecisionMetrics(name, "-", 100, ppl, math.log(ppl), 0.5, agree, kl, 0.0, ppl / 4.0 - 1, 0, 1.0)


def test_gate_checks_limits_must_beat_and_ungated():
    t = parse_thresholds({"precisions": {"int4-awq": {"max_perplexity_increase": 0.05, "min_top1_agreement": 0.9},
                                         "int4-rtn": {}},
                          "must_beat": {"int4-awq": "int4-rtn"}}, "t.yaml")
    metrics = {"fp32": _metrics("fp32", 4.0), "int4-awq": _metrics("int4-awq", 4.1, 0.95),
               "int4-rtn": _metrics("int4-rtn", 4.08), "int8-wo": _metrics("int8-wo", 4.0)}
    checks, ungated = gate(metrics, t)
    assert ungated == ["int8-wo"]
    failed = [c for c in checks if not c.passed]
    assert [(c.subject, c.metric) for c in failed] == [("int4-awq vs int4-rtn", "perplexity")]
    metrics["int4-awq"] = _metrics("int4-awq", 4.3, 0.8)
    failed = {(c.subject, c.metric) for c in gate(metrics, t)[0] if not c.passed}
    assert failed == {("int4-awq", "perplexity_increase"), ("int4-awq", "top1_agreement"),
                      ("int4-awq vs int4-rtn", "perplexity")}


# --------------------------------------------------------------------------------------------
# eval text
# --------------------------------------------------------------------------------------------
def test_eval_text_errors(tmp_path):
    tok = ByteTokenizer()
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(LlmtrtUserError, match=r"latin1.txt: not UTF-8 text \(bad byte at offset 3\)"):
        read_eval_tokens(bad, tok)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(LlmtrtUserError, match="empty.txt: 0 token"):
        read_eval_tokens(empty, tok)
    one = tmp_path / "one.txt"
    one.write_text("x")
    with pytest.raises(LlmtrtUserError, match="at least 2 are needed"):
        read_eval_tokens(one, tok)
    with pytest.raises(LlmtrtUserError, match="no such eval text file"):
        read_eval_tokens(tmp_path / "missing.txt", tok)
    assert read_eval_tokens(EVAL, tok, max_tokens=10).tolist() == list(EVAL.read_bytes()[:10])


# --------------------------------------------------------------------------------------------
# end to end on bytes-llama: fp32 ONNX vs PyTorch, degraded artifacts, the CLI
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory):
    from llmtrt.exporter.config import resolve_model
    from llmtrt.pipelines.artifacts import export_artifact

    out = tmp_path_factory.mktemp("compare") / "fp32"
    export_artifact(resolve_model("bytes-llama"), out)
    return out


def _perturbed(src, dst, precision, transform):
    """A copy of an fp32 artifact with every weight matrix passed through ``transform`` (numpy)."""
    import onnx
    from onnx import numpy_helper

    dst.mkdir(parents=True)
    model = onnx.load(str(src / "model.onnx"))
    changed = 0
    for init in model.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.dtype == np.float32 and a.ndim == 2 and not init.name.startswith("rope_"):
            init.CopyFrom(numpy_helper.from_array(transform(a).astype(np.float32), init.name))
            changed += 1
    assert changed >= 1
    onnx.save(model, str(dst / "model.onnx"))
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["precision"] = precision
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def _to_fp16(a):
    return a.astype(np.float16)


def _int2(a):  # 2-bit per-row weights: far past any threshold
    s = np.abs(a).max(axis=-1, keepdims=True) / 1.0
    return np.clip(np.round(a / s), -1, 1) * s


@pytest.fixture(scope="module")
def artifacts(fp32_dir):
    root = fp32_dir.parent
    return {"fp32": fp32_dir, "fp16": _perturbed(fp32_dir, root / "fp16", "fp16", _to_fp16),
            "int8-wo": _perturbed(fp32_dir, root / "bad", "int8-wo", _int2)}


def test_fp32_onnx_matches_pytorch(fp32_dir):
    tokens = read_eval_tokens(EVAL, ByteTokenizer(), max_tokens=SLICE)
    m = evaluate(fp32_dir, tokens, seq_len=256, reference=PyTorchRunner(resolve_model("bytes-llama")))
    print(f"fp32 ONNX vs PyTorch on {m.tokens} predictions: ppl {m.perplexity:.6f} ({m.perplexity_increase:+.2e}), "
          f"agreement {m.top1_agreement}, max logit err {m.max_abs_logit_error:.2e}")
    assert m.tokens == SLICE - SLICE // 256
    assert abs(m.perplexity_increase) <= 1e-4
    assert m.top1_agreement == 1.0
    assert m.max_abs_logit_error < 1e-3
    assert 2.0 < m.perplexity < 8.0  # a trained byte model (README: 4.03 on all of eval.txt), not a random one
    alone = evaluate(fp32_dir, tokens, seq_len=256)
    assert alone.perplexity == pytest.approx(m.perplexity, rel=1e-12) and alone.top1_agreement == 1.0


def test_compare_gates_a_degraded_artifact(artifacts, tmp_path):
    result = compare_artifacts(artifacts, eval_text=EVAL, max_tokens=SLICE, out_dir=tmp_path)
    m = result.metrics
    assert set(m) == {"fp32", PYTORCH, "fp16", "int8-wo"}
    assert abs(m[PYTORCH].perplexity_increase) <= 1e-4
    assert m["fp16"].perplexity_increase < 1e-3 and m["fp16"].top1_agreement > 0.99
    assert m["int8-wo"].perplexity_increase > 0.005 and m["int8-wo"].mean_kl > m["fp16"].mean_kl
    assert not result
    assert {c.subject for c in result.failed} == {"int8-wo"}
    report = json.loads((tmp_path / "compare.json").read_text())
    assert report["passed"] is False and report["eval"]["predictions"] == m["fp32"].tokens
    assert report["metrics"]["fp16"]["perplexity"] == pytest.approx(m["fp16"].perplexity)
    md = (tmp_path / "compare.md").read_text()
    assert "| int8-wo |" in md and "NOT OK" in md and "**FAILED**" in md
    assert result.summary()["failed_checks"]
    if (tmp_path / "compare.png").exists():
        assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        pytest.importorskip("matplotlib")  # present yet no plot: fail loudly
        raise AssertionError("matplotlib is installed but compare.png was not written")


def test_cli_exit_codes(artifacts, tmp_path):
    runner = CliRunner()
    good = ",".join(str(artifacts[k]) for k in ("fp32", "fp16"))
    res = runner.invoke(main, ["compare", *good.split(","), "--max-tokens", "512", "--out", str(tmp_path / "ok")])
    assert res.exit_code == 0, res.output
    assert "PASSED" in res.output and "| fp16 |" in res.output
    bad = ",".join(str(artifacts[k]) for k in ("fp32", "fp16", "int8-wo"))
    res = runner.invoke(main, ["compare", *bad.split(","), "--max-tokens", "1024", "--json",
                               "--no-pytorch-check", "--out", str(tmp_path / "bad")])
    assert res.exit_code == 1, res.output
    payload = json.loads(res.output)
    assert payload["passed"] is False and PYTORCH not in payload["metrics"]
    assert any(not c["passed"] and c["subject"] == "int8-wo" for c in payload["checks"])


def test_cli_usage_errors(artifacts, tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"
    res = runner.invoke(main, ["compare", "--out", str(out)])
    assert res.exit_code == 2 and "exactly one of --model" in res.output
    res = runner.invoke(main, ["compare", str(artifacts["fp16"]), "--out", str(out)])
    assert res.exit_code == 2 and "no fp32 artifact" in res.output
    res = runner.invoke(main, ["compare", str(artifacts["fp32"]), str(artifacts["fp32"]),
                               "--out", str(out)])
    assert res.exit_code == 2 and "both fp32" in res.output
    limits = tmp_path / "limits.yaml"
    limits.write_text("precisions:\n  fp16:\n    max_kl: 1\n")
    res = runner.invoke(main, ["compare", str(artifacts["fp32"]), "--thresholds", str(limits),
                               "--out", str(out)])
    assert res.exit_code == 2 and "limits.yaml:3: precisions.fp16.max_kl: unknown key" in res.output
    res = runner.invoke(main, ["compare", "--model", "bytes-llama", "--precisions", "fp32,int9",
                               "--out", str(out)])
    assert res.exit_code == 2 and "int9" in res.output
    assert not out.exists()


def test_cli_model_exports_fp32(tmp_path):
    res = CliRunner().invoke(main, ["compare", "--model", "bytes-llama", "--precisions", "fp32",
                                    "--max-tokens", "300", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "fp32" / "model.onnx").is_file()
    assert json.loads((tmp_path / "compare.json").read_text())["eval"]["predictions"] == 298


def test_cli_help():
    res = CliRunner().invoke(main, ["compare", "--help"])
    assert res.exit_code == 0
    for word in ("ARTIFACTS", "--thresholds", "perplexity", "KL", "Exit status", "Examples"):
        assert word in res.output


def test_plot_is_skipped_with_a_note_without_matplotlib(artifacts, tmp_path, monkeypatch):
    import builtins

    from llmtrt.pipelines.checks.compare_report import CompareResult, write_reports

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    result = CompareResult({"fp32": _metrics("fp32", 4.0)}, [], [], {"text": "t", "tokens": 3, "seq_len": 2,
                                                                       "predictions": 2, "tokenizer": "bytes"},
                           Thresholds({}).source)
    said = []
    paths = write_reports(result, tmp_path, said.append)
    assert set(paths) == {"json", "md"} and not (tmp_path / "compare.png").exists()
    assert "matplotlib is not installed" in said[0]


def test_reports_are_replaced_whole(artifacts, tmp_path):
    shutil.copy(DEFAULT_THRESHOLDS, tmp_path / "t.yaml")
    compare_artifacts({"fp32": artifacts["fp32"]}, eval_text=EVAL, max_tokens=64, out_dir=tmp_path,
                      thresholds=tmp_path / "t.yaml", pytorch_reference=False)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_static_kv_cache_artifact_runs_and_matches_pytorch(tmp_path, fp32_dir):
    from llmtrt.exporter.config import resolve_model
    from llmtrt.exporter.onnx_export import ExportOptions
    from llmtrt.pipelines.artifacts import export_artifact

    export_artifact(resolve_model("tiny"), tmp_path, ExportOptions(kv_cache="static", max_positions=64))
    tokens = read_eval_tokens(EVAL, ByteTokenizer(), max_tokens=200)
    m = evaluate(tmp_path, tokens, seq_len=32, reference=PyTorchRunner(resolve_model("tiny"), max_positions=64))
    assert m.tokens == 200 - 7  # 6 full windows of 32 and a tail of 8
    assert abs(m.perplexity_increase) <= 1e-5 and m.top1_agreement == 1.0 and m.max_abs_logit_error < 1e-4
    with pytest.raises(LlmtrtUserError, match="a different model than the fp32 artifact"):
        compare_artifacts({"fp32": fp32_dir, "fp16": tmp_path}, eval_text=EVAL, max_tokens=64)


def test_cli_model_quantizes_with_the_precision_step(tmp_path):
    pytest.importorskip("llmtrt.pipelines.precision.quantize", reason="the precision step is not in this tree")
    res = CliRunner().invoke(main, ["compare", "--model", "bytes-llama", "--precisions", "fp32,int8-wo",
                                    "--max-tokens", "1024", "--json", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.output)
    assert json.loads((tmp_path / "int8-wo" / "manifest.json").read_text())["precision"] == "int8-wo"
    m = payload["metrics"]["int8-wo"]
    assert 0 < m["max_abs_logit_error"] and m["perplexity_increase"] <= 0.005 and m["top1_agreement"] >= 0.97


def test_cli_model_checks_every_input_before_exporting(tmp_path, monkeypatch, hf_checkpoint):
    """The issue: no tokenizer.json failed after 11 s of exporting and left fp32/ behind; without
    --calib-text a story model was calibrated on Python documentation."""
    import llmtrt.pipelines.artifacts as artifacts_module
    from tests.conftest import write_llama3_style_tokenizer

    pytest.importorskip("tokenizers")

    def no_export(*args, **kwargs):
        raise AssertionError("export started")

    monkeypatch.setattr(artifacts_module, "export_artifact", no_export)
    ckpt = hf_checkpoint("ckpt", vocab_size=384)
    out = tmp_path / "cmp"
    calib = tmp_path / "calib.txt"
    calib.write_text("Once upon a time there was a fox. " * 50)
    same = tmp_path / "same.txt"
    same.write_bytes(EVAL.read_bytes())

    def run(*args):
        return CliRunner().invoke(main, ["compare", "--model", str(ckpt), "--out", str(out), *args])

    cases = [((), "no tokenizer.json")]
    for args, message in cases:
        res = run(*args)
        assert res.exit_code == 2 and message in res.output, res.output
    write_llama3_style_tokenizer(ckpt)
    cases = [(("--precisions", "fp32,fp16"), "--calib-text is required: fp16"),
             (("--precisions", "fp32,int4-awq", "--calib-text", str(tmp_path / "nope.txt")), "nope.txt"),
             (("--precisions", "fp32,int8-sq", "--calib-text", str(same)), "same content as --eval-text"),
             (("--precisions", "fp32,int8-wo", "--eval-text", str(tmp_path / "gone.txt")), "no such eval text"),
             (("--precisions", "fp32", "--seq-len", "4096"), "exceeds the model's max_position_embeddings")]
    for args, message in cases:
        res = run(*args)
        assert res.exit_code == 2 and message in res.output, (args, res.output)
        assert not out.exists()
    # the same checks pass with good inputs, and the export is what comes next (int8-wo needs no text)
    for args in (("--precisions", "fp32,fp16", "--calib-text", str(calib)), ("--precisions", "fp32,int8-wo")):
        res = run(*args)
        assert isinstance(res.exception, AssertionError) and str(res.exception) == "export started", res.output


def test_last_logits_artifact_is_refused_with_exit_2(tmp_path):
    """Perplexity needs every position's logits: a graph exported with --logits last is bad input for compare."""
    from llmtrt.exporter.config import resolve_model
    from llmtrt.exporter.onnx_export import ExportOptions
    from llmtrt.pipelines.artifacts import export_artifact

    last = tmp_path / "last"
    export_artifact(resolve_model("tiny"), last, ExportOptions(logits="last", max_positions=64))
    with pytest.raises(LlmtrtUserError, match=r"--logits last .* every position"):
        compare_artifacts({"fp32": last}, eval_text=EVAL, max_tokens=64)
    with pytest.raises(LlmtrtUserError, match="--logits last"):
        evaluate(last, read_eval_tokens(EVAL, ByteTokenizer(), max_tokens=64), seq_len=32)
    res = CliRunner().invoke(main, ["compare", str(last), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "--logits last" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()
