"""llmtrt validate: fp32 artifacts pass in every dialect and the static cache; broken graphs fail and
--layerwise names the node that broke them; precision manifests pick their tolerances; CLI exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from click.testing import CliRunner
from onnx import numpy_helper

from llmtrt.exporter.config import resolve_model
from llmtrt.exporter.errors import LlmtrtUserError
from llmtrt.exporter.onnx_export import ExportOptions
from llmtrt.pipelines.artifacts import export_artifact
from llmtrt.pipelines.checks.tolerances import DEFAULT_TOLERANCES, load_tolerances
from llmtrt.pipelines.checks.validate import ValidateOptions, validate
from llmtrt.pipelines.cli import main

FAST = ValidateOptions(batch=2, decode_steps=3, prompt_tokens=12)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The tiny preset exported once per dialect, plus a static-cache graph."""
    root = tmp_path_factory.mktemp("validate")
    source = resolve_model("tiny")
    variants = {"custom": ExportOptions(dialect="custom", max_positions=64),
                "standard": ExportOptions(dialect="standard", max_positions=64),
                "decomposed": ExportOptions(dialect="decomposed", max_positions=64),
                "static": ExportOptions(dialect="standard", kv_cache="static", max_positions=64),
                "last": ExportOptions(dialect="custom", logits="last", max_positions=64)}
    for name, options in variants.items():
        export_artifact(source, root / name, options)
    return {name: root / name for name in variants}


def _copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "model.onnx"))
    edit(model)
    onnx.save(model, str(dst / "model.onnx"))
    return dst


@pytest.mark.parametrize("variant", ["custom", "standard", "decomposed", "static", "last"])
def test_fp32_artifacts_pass(exports, variant, tmp_path):
    report = validate(exports[variant], ValidateOptions(batch=2, decode_steps=3, prompt_tokens=12,
                                                        out_dir=tmp_path / "v"))
    assert report, report.table()
    assert {r["output"] for r in report.outputs} >= {"logits.prefill", "logits.decode.3", "logits.one_pass",
                                                     "present.1.value"}
    worst = max(r["max_absdiff"] for r in report.outputs)
    assert worst < 1e-5  # measured ~2e-7; the gate is 1e-4
    assert [r["runner"] for r in report.kv_cache] == ["pytorch-fp32", "onnxruntime"]
    assert all(r["passed"] for r in report.kv_cache)
    assert report.inputs["prompt_lengths"] == [12, 7]  # left padding exercised
    saved = json.loads((tmp_path / "v" / "validation.json").read_text())
    assert saved["passed"] is True and saved["precision"] == "fp32"
    assert not list((tmp_path / "v").glob(".validate-*"))  # staging removed
    assert any(f["check"] == "weights" and f["passed"] for f in report.integrity)  # fused weights included


def test_last_logits_artifact_is_compared_where_it_has_logits(exports, tmp_path):
    """--logits last: the prefill's last position, every decode step, and the one-pass forward's last
    position are compared (against the reference run the same way); the printed reproduction agrees."""
    import shlex
    import subprocess
    import sys

    report = validate(exports["last"], ValidateOptions(batch=2, decode_steps=3, prompt_tokens=12,
                                                       out_dir=tmp_path / "v"))
    assert report, report.table()
    from polygraphy.comparator import RunResults

    results = RunResults.load(str(tmp_path / "v" / "outputs.json"))
    for runner in ("pytorch-fp32", "onnxruntime"):
        it = results[runner][0]
        assert it["logits.prefill"].shape == (2, 1, 256) and it["logits.one_pass"].shape == (2, 1, 256)
    assert [r["passed"] for r in report.kv_cache] == [True, True]
    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    proc = subprocess.run(shlex.split(report.files["reproduce"]), capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:]


def _edit_fused_weight(model):
    for t in model.graph.initializer:
        if t.name == "model.layers.0.self_attn.qkv_proj.weight_t":
            a = numpy_helper.to_array(t).copy()
            a[5, 64 + 3] += 0.01  # a k_proj column: k's part of the fused weight
            t.CopyFrom(numpy_helper.from_array(a, t.name))
            return
    raise AssertionError("fused weight not found")


def test_integrity_checks_a_fused_weight_against_its_parts(exports, tmp_path):
    """A fused weight equals its parts concatenated; an edit in k's columns is named, and so is a fused
    weight the manifest does not explain (no `fused` entry: no checkpoint tensor behind it)."""
    from llmtrt.pipelines.artifacts import onnx_sha256
    from llmtrt.pipelines.checks.integrity import check_artifact

    assert all(check_artifact(exports["standard"]))
    broken = _copy(exports["standard"], tmp_path / "broken", _edit_fused_weight)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["onnx_sha256"] = onnx_sha256(broken / "model.onnx")
    (broken / "manifest.json").write_text(json.dumps(manifest))
    bad = [f for f in check_artifact(broken) if not f]
    assert [f.subject for f in bad][-1] == "model.layers.0.self_attn.qkv_proj.weight_t"
    assert "model.layers.0.self_attn.q_proj.weight+model.layers.0.self_attn.k_proj.weight" in bad[-1].detail
    unexplained = tmp_path / "unexplained"
    shutil.copytree(exports["standard"], unexplained)
    manifest = json.loads((unexplained / "manifest.json").read_text())
    del manifest["fused"]
    (unexplained / "manifest.json").write_text(json.dumps(manifest))
    bad = [f.subject for f in check_artifact(unexplained) if not f]
    assert "model.layers.1.mlp.gate_up_proj.weight_t" in bad


def test_saved_inputs_are_unpadded_steps_that_replay_in_onnxruntime(exports, tmp_path):
    """inputs.json holds, per prompt, its prefill and each decode step on the reference's cache (no
    padding); running each feed in ONNX Runtime reproduces reference_outputs.json."""
    import onnxruntime as ort
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    validate(exports["custom"], ValidateOptions(batch=2, decode_steps=2, prompt_tokens=10, out_dir=tmp_path))
    feeds = load_json(str(tmp_path / "inputs.json"))
    assert len(feeds) == 2 * 3  # 2 prompts x (prefill + 2 decode steps)
    session = ort.InferenceSession(str(exports["custom"] / "model.onnx"), providers=["CPUExecutionProvider"])
    assert set(feeds[0]) == {i.name for i in session.get_inputs()}
    assert [f["input_ids"].shape[1] for f in feeds] == [10, 1, 1, 5, 1, 1]
    assert all(f["attention_mask"].all() for f in feeds)  # no padding anywhere
    assert [f["past_key_values.0.key"].shape[2] for f in feeds] == [0, 10, 11, 0, 5, 6]
    reference = RunResults.load(str(tmp_path / "reference_outputs.json"))["pytorch-fp32"]
    for feed, ref in zip(feeds, reference, strict=True):
        logits = session.run(["logits"], dict(feed))[0]
        np.testing.assert_allclose(logits, ref["logits"], atol=1e-4)
    report = json.loads((tmp_path / "validation.json").read_text())
    assert report["files"]["reproduce"].startswith("polygraphy run ")


def test_static_feed_carries_write_indices(exports, tmp_path):
    from polygraphy.json import load_json

    validate(exports["static"], ValidateOptions(batch=2, decode_steps=2, prompt_tokens=10, out_dir=tmp_path))
    feeds = load_json(str(tmp_path / "inputs.json"))
    assert [f["write_indices"].tolist() for f in feeds[:3]] == [[0], [10], [11]]
    assert feeds[0]["past_key_values.0.key"].shape[2] == feeds[0]["attention_mask"].shape[1] == 12  # 10 + 2 slots


@pytest.mark.parametrize("fault", [None, "interleaved_rope", "position_off_by_one"])
def test_printed_reproduction_gives_validates_verdict(exports, tmp_path, fault):
    """The command validate prints, run as printed, agrees with validate: a good artifact passes, a
    planted fault fails (the old padded replay failed good artifacts at padding positions)."""
    import os
    import shlex
    import subprocess
    import sys

    from tools.plant_fault import plant

    artifact = exports["standard"]
    if fault is not None:
        artifact = tmp_path / "faulty"
        plant(exports["standard"], fault, artifact)
    report = validate(artifact, ValidateOptions(batch=2, decode_steps=2, prompt_tokens=10, out_dir=tmp_path / "v"))
    command = shlex.split(report.files["reproduce"])
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    assert (proc.returncode == 0) == bool(report) == (fault is None), proc.stdout[-2000:] + proc.stderr[-2000:]


def _corrupt_weight(model):
    for t in model.graph.initializer:
        if t.name == "model.layers.1.mlp.down_proj.weight_t":
            a = numpy_helper.to_array(t).copy()
            a[3, 5] += 0.5
            t.CopyFrom(numpy_helper.from_array(a, t.name))
            return
    raise AssertionError("weight not found")


def _interleaved_rope(model):
    nodes = [n for n in model.graph.node if n.op_type == "RotaryEmbedding"]
    assert nodes
    for node in nodes:
        for a in node.attribute:
            if a.name == "interleaved":
                a.i = 1


def _no_epsilon(model):
    nodes = [n for n in model.graph.node if n.op_type == "RMSNormalization"]
    assert nodes
    for node in nodes:
        for a in node.attribute:
            if a.name == "epsilon":
                a.f = 0.0


@pytest.mark.parametrize("edit,node", [
    (_corrupt_weight, "/model/layers/1/mlp/down_proj/MatMul"),
    (_interleaved_rope, "/model/layers/0/self_attn/RotaryEmbedding"),
    (_no_epsilon, "/model/layers/0/input_layernorm/RMSNorm"),
], ids=["weight", "rope-interleaved", "rmsnorm-epsilon"])
def test_broken_graph_fails_and_layerwise_names_the_node(exports, tmp_path, edit, node):
    broken = _copy(exports["standard"], tmp_path / "broken", edit)
    report = validate(broken, ValidateOptions(batch=2, decode_steps=2, prompt_tokens=10, layerwise=True,
                                              reference=exports["standard"], out_dir=tmp_path / "v"))
    assert not report
    assert any(not r["passed"] for r in report.outputs if r["output"].startswith("logits"))
    jump = report.layerwise["first_jump"]
    assert jump is not None and jump["node"].startswith(node), report.layerwise
    assert jump["input_error"] == 0.0
    assert report.summary()["first_bad_node"] == jump["node"]
    assert (tmp_path / "v" / "layerwise.json").is_file()


def test_layerwise_reexport_finds_no_jump_on_a_clean_graph(exports):
    report = validate(exports["custom"], ValidateOptions(batch=2, decode_steps=1, prompt_tokens=8, layerwise=True))
    assert report
    assert report.layerwise["first_jump"] is None
    assert report.layerwise["compared_tensors"] > 50
    assert "re-export" in report.layerwise["reference"]


def _with_precision(src: Path, dst: Path, precision: str) -> Path:
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["precision"] = precision
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_precision_manifest_picks_its_tolerances(exports, tmp_path):
    table = yaml.safe_load(DEFAULT_TOLERANCES.read_text())["precisions"]
    art = _with_precision(exports["standard"], tmp_path / "fp16", "fp16")
    report = validate(art, FAST)
    assert report.precision == "fp16"
    assert report.tolerances["groups"]["logits"]["atol"] == table["fp16"]["logits"]["atol"]
    row = next(r for r in report.outputs if r["output"] == "logits.decode.1")
    assert set(row["checks"]) == {"max", "mean", "cosine", "top1"}
    assert row["cosine_similarity"] > 0.9999 and row["top1_agreement"] == 1.0
    # a broken graph labelled int4-awq still fails the loose gate on cosine similarity / top-1
    broken = _copy(exports["standard"], tmp_path / "broken", _interleaved_rope)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["precision"] = "int4-awq"
    (broken / "manifest.json").write_text(json.dumps(manifest))
    report = validate(broken, FAST)
    assert report.tolerances["groups"]["logits"]["min_top1_agreement"] == table["int4-awq"]["logits"]["min_top1_agreement"]
    assert report.precision == "int4-awq"
    # the tiny random model's logits are nearly flat, so at int4 tolerances the broken cache is what fails
    assert not report
    assert any(not r["passed"] for r in report.outputs if r["output"].startswith("present"))


def test_unknown_precision_is_a_user_error(exports, tmp_path):
    art = _with_precision(exports["standard"], tmp_path / "odd", "int3-magic")
    with pytest.raises(LlmtrtUserError, match="int3-magic"):
        validate(art, FAST)


def test_tolerance_file_errors_name_the_field(tmp_path):
    bad = tmp_path / "tol.yaml"
    bad.write_text("precisions:\n  fp32:\n    logits: {atol: 1e-4, rtol: 1e-3, atoll: 1}\n")
    with pytest.raises(LlmtrtUserError, match=r"precisions.fp32.logits.atoll"):
        load_tolerances(bad, "fp32")
    bad.write_text("precisions:\n  fp32:\n    logits: {atol: -1, rtol: 1e-3}\n")
    with pytest.raises(LlmtrtUserError, match=r"tol.yaml:3: precisions.fp32.logits.atol: -1.0 is below the minimum 0"):
        load_tolerances(bad, "fp32")


def test_atol_override_makes_a_clean_graph_fail(exports):
    """--atol/--rtol override per output name like Polygraphy's (0 tolerance: fp32 rounding fails)."""
    report = validate(exports["custom"], ValidateOptions(batch=2, decode_steps=2, prompt_tokens=10,
                                                         atol={"logits.decode.2": 0.0}, rtol={"logits.decode.2": 0.0}))
    failed = [r["output"] for r in report.outputs if not r["passed"]]
    assert failed == ["logits.decode.2"]


def test_tensorrt_engine_is_skipped_with_reason_without_gpu(exports, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the skip path is for CPU-only machines")
    engines = tmp_path / "engines"
    engines.mkdir()
    (engines / "engine.fp32.plan").write_bytes(b"plan")
    (engines / "engine.fp32.json").write_text(json.dumps({
        "kind": "tensorrt-engine", "plan": "engine.fp32.plan", "precision": "fp32", "backend": {"name": "tensorrt"},
        "onnx": str(exports["custom"] / "model.onnx"), "profiles": [], "kv_cache": "dynamic"}))
    report = validate(engines, ValidateOptions(batch=1, decode_steps=1, prompt_tokens=8))  # ONNX checked + run
    assert report.artifact == str(exports["custom"]) and report.passed
    trt = next(r for r in report.runners if r["name"] == "tensorrt")
    assert trt["skipped"] and "GPU" in trt["reason"]
    assert "tensorrt" in report.summary()["skipped"]
    assert "SKIPPED" in report.table()


def test_cli_exit_codes_and_json(exports, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["validate", "--help"])
    assert result.exit_code == 0 and "--layerwise" in result.output and "polygraphy run" in result.output
    ok = runner.invoke(main, ["validate", str(exports["decomposed"]), "--batch", "2", "--decode-steps", "2",
                              "--prompt-tokens", "10", "--json", "--out", str(tmp_path / "ok")])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["passed"] is True
    broken = _copy(exports["standard"], tmp_path / "broken", _corrupt_weight)
    bad = runner.invoke(main, ["validate", str(broken), "--decode-steps", "1", "--prompt-tokens", "8"])
    assert bad.exit_code == 1 and "FAIL" in bad.output
    usage = runner.invoke(main, ["validate", str(tmp_path / "nowhere")])
    assert usage.exit_code == 2 and "manifest.json" in usage.output
    usage = runner.invoke(main, ["validate", str(exports["custom"]), "--atol", "logits:lots"])
    assert usage.exit_code == 2 and "--atol" in usage.output
    prompt = runner.invoke(main, ["validate", str(exports["custom"]), "--prompt", "The for statement",
                                  "--batch", "3", "--decode-steps", "2"])
    assert prompt.exit_code == 0, prompt.output


def test_integrity_reads_the_rotary_tables_from_external_data(tmp_path):
    """An export with its weights in model.onnx.data (every export over 64 MiB of weights) keeps its
    rotary tables there too: the integrity checks read them from the file (they once raised on them),
    and a table changed in the file is named."""
    from onnx.external_data_helper import ExternalDataInfo

    from llmtrt.pipelines.artifacts import onnx_sha256
    from llmtrt.pipelines.checks.integrity import check_artifact

    out = tmp_path / "external"
    export_artifact(resolve_model("tiny"), out, ExportOptions(max_positions=64, external_data=True))
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    cos = next(t for t in graph.initializer if t.name == "rope_cos")
    assert cos.data_location == onnx.TensorProto.EXTERNAL  # the case under test
    assert all(check_artifact(out))
    offset = ExternalDataInfo(cos).offset
    with open(out / "model.onnx.data", "r+b") as f:  # rope_cos[1, 0] (cos of one radian) -> 0.0
        f.seek(offset + 4 * cos.dims[1])
        f.write(np.float32(0.0).tobytes())
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["onnx_sha256"] = onnx_sha256(out / "model.onnx")
    (out / "manifest.json").write_text(json.dumps(manifest))
    bad = [f.subject for f in check_artifact(out) if not f]
    assert "rope_cos/rope_sin" in bad
