"""llmtrt quantize on the trained bytes-llama fixture: every precision runs in ONNX Runtime (CPU) and
meets its perplexity threshold against fp32 on held-out text; calibration cache, determinism, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from llmtrt.exporter.errors import LlmtrtUserError
from llmtrt.exporter.files import sha256_file
from llmtrt.pipelines.artifacts import read_manifest
from llmtrt.pipelines.precision.quantize import (
    PRECISIONS,
    PrecisionOptions,
    Rewrite,
    convert_to_half,
    quantize,
)

REPO = Path(__file__).resolve().parents[2]
EVAL_TEXT = REPO / "configs" / "text" / "eval.txt"
CALIB_TEXT = REPO / "configs" / "text" / "calib.txt"
EVAL_TOKENS = 16 * 256  # a slice of eval.txt: 16 windows of 256 bytes keep this file fast
# perplexity increase over fp32 allowed on that slice (issue 3's targets)
THRESHOLDS = {"fp16": 0.001, "int8-sq": 0.01, "int8-wo": 0.005, "int4-awq": 0.05, "int4-rtn": 0.05}
QUIET = PrecisionOptions(progress=False)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    from llmtrt.exporter.config import resolve_model
    from llmtrt.pipelines.artifacts import export_artifact

    out = tmp_path_factory.mktemp("bytes-llama") / "fp32"
    export_artifact(resolve_model("bytes-llama"), out)
    return out


@pytest.fixture(scope="module")
def artifacts(export_dir, tmp_path_factory):
    """precision -> quantized directory, made on first use and shared by the module's tests."""
    root = tmp_path_factory.mktemp("quantized")
    made: dict[str, Path] = {}

    def get(precision: str) -> Path:
        if precision not in made:
            made[precision] = quantize(export_dir, root / precision, precision, QUIET)
        return made[precision]

    return get


def perplexity(directory: Path, tokens: int = EVAL_TOKENS) -> tuple[float, np.ndarray]:
    """exp(mean next-byte NLL) over non-overlapping 256-byte windows of eval.txt, and the logits."""
    import onnxruntime as ort

    manifest = read_manifest(directory)
    ids = np.frombuffer(EVAL_TEXT.read_bytes()[:tokens], dtype=np.uint8).astype(np.int64).reshape(-1, 256)
    batch, n = ids.shape
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(directory / manifest["onnx"]), options, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "position_ids": np.broadcast_to(np.arange(n), (batch, n)).copy(),
             "attention_mask": np.ones((batch, n), dtype=np.int64)}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            dtype = np.float16 if i.type == "tensor(float16)" else np.float32
            feeds[i.name] = np.zeros((batch, i.shape[1], 0, i.shape[3]), dtype=dtype)
    logits = session.run(["logits"], feeds)[0].astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1).mean()
    assert np.isfinite(nll)
    return float(np.exp(nll)), logits


@pytest.fixture(scope="module")
def fp32_ppl(export_dir):
    return perplexity(export_dir)


def _initializer_types(path: Path) -> set[int]:
    return {t.data_type for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("precision", list(THRESHOLDS))
def test_precision_runs_in_onnxruntime_within_threshold(precision, artifacts, fp32_ppl, export_dir):
    out = artifacts(precision)
    ppl, logits = perplexity(out)
    ref_ppl, ref_logits = fp32_ppl
    rel = ppl / ref_ppl - 1
    print(f"{precision}: perplexity {ppl:.4f} vs fp32 {ref_ppl:.4f} ({100 * rel:+.3f}%), top-1 agreement "
          f"{(logits.argmax(-1) == ref_logits.argmax(-1)).mean():.4f}")
    assert rel <= THRESHOLDS[precision], f"{precision}: perplexity +{100 * rel:.3f}% over fp32"
    assert not np.array_equal(logits, ref_logits)  # the graph really changed

    manifest = read_manifest(out)
    source = read_manifest(export_dir)
    assert manifest["precision"] == precision and manifest["kind"] == "onnx"
    assert manifest["source_onnx_sha256"] == source["onnx_sha256"]
    assert manifest["onnx_sha256"] != source["onnx_sha256"]
    assert manifest["engine_precision"] == PRECISIONS[precision].engine_precision
    assert manifest["config"] == source["config"] and manifest["io"] == source["io"]
    assert all({"name", "kind", "reason"} <= set(k) for k in manifest["fp32_kept"])
    assert (manifest["calibration"] is not None) == PRECISIONS[precision].calibrated
    onnx.checker.check_model(str(out / "model.onnx"))


def test_graph_contents_per_precision(artifacts):
    T = onnx.TensorProto
    sq = onnx.load(str(artifacts("int8-sq") / "model.onnx"))
    ops = [n.op_type for n in sq.graph.node]
    assert ops.count("QuantizeLinear") == 16  # per layer: qkv, o, gate/up, down inputs
    assert ops.count("DequantizeLinear") == 16 + 28  # activations + every linear weight
    assert sum(t.data_type == T.INT8 and len(t.dims) == 2 for t in sq.graph.initializer) == 28
    assert not any(t.name.endswith(".weight_t") for t in sq.graph.initializer)  # no fp32 copy left

    awq = onnx.load(str(artifacts("int4-awq") / "model.onnx"))
    assert max(o.version for o in awq.opset_import if o.domain == "") >= 21
    blocked = [n for n in awq.graph.node if n.op_type == "DequantizeLinear"]
    assert len(blocked) == 28 and all(any(a.name == "block_size" for a in n.attribute) for n in blocked)
    assert sum(t.data_type == T.INT4 for t in awq.graph.initializer) == 28
    details = read_manifest(artifacts("int4-awq"))["precision_details"]
    assert details["block_size_adjusted"] == {f"model.layers.{i}.mlp.down_proj": 16 for i in range(4)}  # 688 = 16 x 43
    assert all(g["error"] <= g["rtn_error"] for g in details["awq"].values())

    half = artifacts("fp16")
    assert T.FLOAT16 in _initializer_types(half / "model.onnx")
    kept = read_manifest(half)["fp32_kept"]
    reasons = " ".join(k["reason"] for k in kept)
    assert "norm:" in reasons and "softmax:" in reasons and "logits:" in reasons


def test_awq_beats_round_to_nearest(artifacts, fp32_ppl):
    awq, _ = perplexity(artifacts("int4-awq"))
    rtn, _ = perplexity(artifacts("int4-rtn"))
    print(f"int4 perplexity: awq {awq:.4f}, rtn {rtn:.4f}, fp32 {fp32_ppl[0]:.4f}")
    assert awq < rtn


def test_bf16_graph_is_well_typed(artifacts):
    # ONNX Runtime's CPU provider has no bf16 MatMul, so this graph's numbers are checked by TensorRT only
    out = artifacts("bf16")
    model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(model)
    assert onnx.TensorProto.BFLOAT16 in _initializer_types(out / "model.onnx")
    assert {o.name: o.type.tensor_type.elem_type for o in model.graph.output}["logits"] == onnx.TensorProto.FLOAT


@pytest.mark.parametrize("dialect", ["standard", "decomposed"])
def test_other_dialects_fp16_and_int4(dialect, tmp_path):
    from llmtrt.exporter.config import resolve_model
    from llmtrt.exporter.onnx_export import ExportOptions
    from llmtrt.pipelines.artifacts import export_artifact

    src = tmp_path / "fp32"
    export_artifact(resolve_model("bytes-llama"), src, ExportOptions(dialect=dialect))
    ref, _ = perplexity(src, 4 * 256)
    for precision, limit in (("fp16", 0.001), ("int4-rtn", 0.05)):
        ppl, _ = perplexity(quantize(src, tmp_path / precision, precision, QUIET), 4 * 256)
        assert ppl / ref - 1 <= limit, f"{dialect} {precision}: {ppl} vs {ref}"


def test_fp16_keeps_overflowing_tensors_in_fp32(export_dir):
    from llmtrt.pipelines.precision.calibration import CalibrationStats

    model = onnx.load(str(export_dir / "model.onnx"))
    # pretend calibration saw the first residual add reach 1e6 (beyond fp16's 65504)
    stats = CalibrationStats({"add_145": 1e6, "linear_4": 10.0}, {}, {}, {}, windows=1, seq_len=1)
    rw = Rewrite(model, QUIET, stats)
    convert_to_half(rw, onnx.TensorProto.FLOAT16, "fp16")
    kept = {k["name"]: k for k in rw.fp32_kept}
    assert kept["add_145"]["kind"] == "tensor" and "1e+06" in kept["add_145"]["reason"]
    assert "overflow" in kept["/model/layers/0/Add"]["reason"]
    assert rw.details["overflowing_tensors"] == ["add_145"]
    # the producer writes fp32 and its consumers read it in fp32 (no Cast of add_145 to fp16)
    assert not any(n.op_type == "Cast" and n.input[0] == "add_145" and n.attribute[0].i == onnx.TensorProto.FLOAT16
                   for n in model.graph.node)
    onnx.checker.check_model(model)


def test_half_kv_cache_io(export_dir, tmp_path):
    out = quantize(export_dir, tmp_path / "fp16", "fp16", PrecisionOptions(progress=False, kv_cache_io="half"))
    model = onnx.load(str(out / "model.onnx"))
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}
    assert types["past_key_values.0.key"] == types["present.3.value"] == onnx.TensorProto.FLOAT16
    assert types["logits"] == onnx.TensorProto.FLOAT
    assert read_manifest(out)["io"]["inputs"][3]["dtype"] == "float16"
    ppl, _ = perplexity(out, 4 * 256)
    ref, _ = perplexity(export_dir, 4 * 256)
    assert ppl / ref - 1 <= 0.001


def test_calibration_cache_reused_and_output_deterministic(export_dir, artifacts, tmp_path):
    first = artifacts("int8-sq")
    cache = json.loads((first / "calibration_cache.json").read_text())
    assert cache["samples"] == 16 and cache["seq_len"] == 128
    assert cache["source_onnx_sha256"] == read_manifest(export_dir)["onnx_sha256"]
    assert cache["calib_text_sha256"] == sha256_file(CALIB_TEXT)
    entry = cache["tensors"]["rms_norm"]
    assert entry["method"] == "max" and entry["samples"] == 16 * 128 and entry["amax"] > 0
    assert read_manifest(first)["calibration"]["cache"] == "computed"
    graph_sha = sha256_file(first / "model.onnx")

    again = quantize(export_dir, first, "int8-sq", QUIET)  # same inputs: cache reused, same bytes
    assert read_manifest(again)["calibration"]["cache"] == "reused"
    assert sha256_file(again / "model.onnx") == graph_sha

    changed = quantize(export_dir, first, "int8-sq", PrecisionOptions(progress=False, calib_samples=8))
    assert read_manifest(changed)["calibration"]["cache"] == "computed"
    assert json.loads((first / "calibration_cache.json").read_text())["samples"] == 8

    # a fresh process (other hash seed, no cache) through the CLI writes the identical graph
    fresh = tmp_path / "fresh"
    proc = subprocess.run([str(Path(sys.executable).parent / "llmtrt"), "quantize", str(export_dir), "--to", "int8-sq",
                           "--out", str(fresh), "--json"], capture_output=True, text=True, cwd=REPO,
                          env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["calibration"]["cache"] == "computed"
    assert sha256_file(fresh / "model.onnx") == graph_sha


@pytest.mark.parametrize("content, message", [
    (None, "no such calibration text file"),
    (b"", "calibration text is empty"),
    (b"  \n\t", "calibration text is empty"),
    (b"short text", "too short for one calibration window"),
    (b"caf\xe9 " * 100, "not UTF-8 text (bad byte 0xe9 at offset 3)"),
])
def test_bad_calibration_text(content, message, export_dir, tmp_path):
    path = tmp_path / "calib.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(LlmtrtUserError, match="calib.txt") as info:
        quantize(export_dir, tmp_path / "out", "int8-sq", PrecisionOptions(calib_text=str(path), progress=False))
    assert message in str(info.value)
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_user_errors(export_dir, artifacts, tmp_path):
    with pytest.raises(LlmtrtUserError, match="unknown precision"):
        quantize(export_dir, tmp_path / "x", "int3")
    with pytest.raises(LlmtrtUserError, match="already int8-wo"):
        quantize(artifacts("int8-wo"), tmp_path / "x", "fp16")
    with pytest.raises(LlmtrtUserError, match="--alpha"):
        quantize(export_dir, tmp_path / "x", "int8-sq", PrecisionOptions(alpha=1.5))
    with pytest.raises(LlmtrtUserError, match="--keep-fp32 'norms'"):
        quantize(export_dir, tmp_path / "x", "fp16", PrecisionOptions(keep_fp32=("norms",)))
    with pytest.raises(LlmtrtUserError, match="no manifest.json"):
        quantize(tmp_path, tmp_path / "x", "fp16")
    with pytest.raises(LlmtrtUserError, match="--calib-samples"):
        quantize(export_dir, tmp_path / "x", "int8-sq", PrecisionOptions(calib_samples=0, progress=False))


def test_keep_fp32_module_name(export_dir, tmp_path):
    out = quantize(export_dir, tmp_path / "wo", "int8-wo",
                   PrecisionOptions(keep_fp32=("model.layers.0.mlp.down_proj",), progress=False))
    names = {t.name for t in onnx.load(str(out / "model.onnx")).graph.initializer}
    assert "model.layers.0.mlp.down_proj.weight_t" in names
    assert "model.layers.1.mlp.down_proj.weight_t.int8" in names
    assert {"name": "model.layers.0.mlp.down_proj", "kind": "linear", "reason": "named in keep_fp32"} in \
        read_manifest(out)["fp32_kept"]


def test_cli_help_json_and_exit_codes(export_dir, tmp_path):
    from llmtrt.pipelines.cli import main
    from llmtrt.pipelines.cli import quantize as cli_precision

    assert cli_precision.PRECISION_NAMES == tuple(PRECISIONS)
    runner = CliRunner()
    res = runner.invoke(main, ["quantize", "--help"])
    assert res.exit_code == 0 and "int4-awq" in res.output and "--calib-text" in res.output
    res = runner.invoke(main, ["quantize", str(export_dir), "--to", "int8-wo", "--out", str(tmp_path / "wo"), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["precision"] == "int8-wo" and summary["engine_precision"] == "int8"
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe")
    res = runner.invoke(main, ["quantize", str(export_dir), "--to", "int8-sq", "--out", str(tmp_path / "sq"),
                               "--calib-text", str(bad)])
    assert res.exit_code == 2 and "not UTF-8" in res.stderr


def _rtx_available() -> bool:
    try:
        import tensorrt_rtx_bindings  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.rtx
@pytest.mark.slow
@pytest.mark.skipif(not _rtx_available(), reason="needs TensorRT-RTX (tensorrt-rtx bindings) to build engines")
@pytest.mark.parametrize("precision, engine", [("int8-sq", "int8"), ("int4-awq", "int4")])
def test_builds_with_tensorrt_rtx(precision, engine, artifacts, tmp_path):
    from llmtrt.pipelines.engine.from_export import build_from_export

    result = build_from_export(artifacts(precision), tmp_path / "engine", precision=engine, backend="tensorrt-rtx",
                               lower="native", max_prompt=64, max_kv=128, opt_level=0)
    assert Path(result.plan_path).stat().st_size > 0


def test_int8_sq_observers_choose_activation_ranges(export_dir, artifacts, tmp_path):
    by_max = read_manifest(artifacts("int8-sq"))["precision_details"]["activations"]
    out = quantize(export_dir, tmp_path / "pct", "int8-sq", PrecisionOptions(observer="percentile", progress=False))
    details = read_manifest(out)["precision_details"]["activations"]
    assert details.keys() == by_max.keys()
    assert all(d["observer"] == "percentile" for d in details.values())
    assert all(details[k]["amax"] <= by_max[k]["amax"] + 1e-6 for k in details)  # a percentile never exceeds max
    assert any(details[k]["amax"] < by_max[k]["amax"] for k in details)


def test_progress_bar_plain_lines_without_a_tty():
    import io

    from llmtrt.pipelines.precision.calibration import Progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    plain = io.StringIO()
    bar = Progress("calibrating", 2, plain)
    bar.update(1)
    bar.update(2)
    assert plain.getvalue().splitlines()[0].startswith("calibrating: 1/2 windows")
    tty = Tty()
    bar = Progress("calibrating", 2, tty)
    bar.update(1)
    bar.update(2)
    assert tty.getvalue().startswith("\rcalibrating [") and tty.getvalue().endswith("\n") and "2/2" in tty.getvalue()
