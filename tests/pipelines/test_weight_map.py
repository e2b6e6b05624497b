"""validate's weight check on quantized graphs (pipelines/checks/weight_map.py): every linear of an
int8-sq / int4-awq / fp16 artifact within half a quantization step of its (smoothed) checkpoint source,
and each planted corruption of a value, a scale or a smoothed norm named by its linear."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from llmtrt.exporter.config import resolve_model
from llmtrt.exporter.onnx_export import ExportOptions
from llmtrt.pipelines.artifacts import export_artifact, open_model_source, read_manifest
from llmtrt.pipelines.checks.tensors import read_initializer
from llmtrt.pipelines.checks.weights import check_weights
from llmtrt.pipelines.precision import quant_math as qm
from llmtrt.pipelines.precision.quantize import PrecisionOptions, quantize


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("weight-map")
    export_artifact(resolve_model("bytes-llama"), root / "fp32", ExportOptions())
    for precision in ("int8-sq", "int4-awq", "fp16"):
        quantize(root / "fp32", root / precision, precision, PrecisionOptions(progress=False, calib_samples=4))
    return root


def _check(directory, graph=None):
    manifest = read_manifest(directory)
    graph = graph or onnx.load(str(directory / "model.onnx"), load_external_data=False)
    return check_weights(graph, directory, manifest, open_model_source(manifest, directory))


def _edit(directory, name, change):
    """The artifact's graph with initializer ``name`` replaced by ``change(values)`` (same type)."""
    graph = onnx.load(str(directory / "model.onnx"))
    tensor = next(t for t in graph.graph.initializer if t.name == name)
    values = read_initializer(tensor, directory)
    new = change(values.copy())
    if tensor.data_type == onnx.TensorProto.INT4:
        replacement = onnx.TensorProto(name=name, data_type=tensor.data_type, dims=tensor.dims,
                                       raw_data=qm.pack_int4(new.astype(np.int8)))
    else:
        replacement = numpy_helper.from_array(new.astype(numpy_helper.to_array(tensor).dtype), name)
    tensor.CopyFrom(replacement)
    return graph


@pytest.mark.parametrize("precision", ["int8-sq", "int4-awq", "fp16"])
def test_clean_quantized_artifacts_pass(artifacts, precision):
    summary, *failures = _check(artifacts / precision)
    assert summary.passed and not failures, [f.detail for f in failures]
    linears = read_manifest(artifacts / precision)["weight_map"]["linears"]
    assert len(linears) == 17  # 4 fused linears per layer and the lm_head, every one checked


def _one(findings):
    summary, *failures = findings
    assert not summary.passed
    return failures


def test_one_int8_value_one_step_off_is_named(artifacts):
    d = artifacts / "int8-sq"
    entry = read_manifest(d)["weight_map"]["linears"]["model.layers.2.mlp.down_proj"]

    def bump(v):
        v.reshape(-1)[5] += 1 if v.reshape(-1)[5] < 127 else -1
        return v
    (bad,) = _one(_check(d, _edit(d, entry["initializers"]["values"], bump)))
    assert bad.subject == "model.layers.2.mlp.down_proj" and "quantization steps" in bad.detail


def test_int4_value_and_scale_faults_are_named(artifacts):
    d = artifacts / "int4-awq"
    entry = read_manifest(d)["weight_map"]["linears"]["model.layers.1.self_attn.qkv_proj"]

    def flip(v):
        v.reshape(-1)[7] = 7 if v.reshape(-1)[7] < 0 else -7
        return v
    (bad,) = _one(_check(d, _edit(d, entry["initializers"]["values"], flip)))
    assert bad.subject == "model.layers.1.self_attn.qkv_proj"

    def scale_up(s):
        s.reshape(-1)[0] *= 1.25
        return s
    (bad,) = _one(_check(d, _edit(d, entry["initializers"]["scale"], scale_up)))
    assert bad.subject == "model.layers.1.self_attn.qkv_proj"


def test_smoothed_norm_changed_fails_every_linear_it_feeds(artifacts):
    """SmoothQuant folds 1/s into the norm: a norm weight changed by 10% at one channel gives that
    channel the wrong s, so the qkv linear it feeds no longer matches its smoothed source."""
    d = artifacts / "int8-sq"
    linears = read_manifest(d)["weight_map"]["linears"]
    qkv = linears["model.layers.0.self_attn.qkv_proj"]
    assert qkv["smoothing"]["kind"] == "folded"
    norm = qkv["smoothing"]["initializer"]
    weight = read_initializer(next(t for t in onnx.load(str(d / "model.onnx")).graph.initializer
                                   if t.name == qkv["initializers"]["values"]), d).reshape(256, -1)
    channel = int(np.abs(weight).sum(axis=1).argmax())  # a channel with large quantized weights

    def nudge(v):
        v[channel] *= 1.1
        return v
    failures = _one(_check(d, _edit(d, norm, nudge)))
    assert "model.layers.0.self_attn.qkv_proj" in {f.subject for f in failures}


def test_fp16_weight_one_ulp_off_is_named(artifacts):
    d = artifacts / "fp16"
    linears = read_manifest(d)["weight_map"]["linears"]
    entry = linears["model.layers.3.mlp.gate_up_proj"]
    name = entry["initializers"]["weight"]

    def ulp(v):
        flat = v.reshape(-1)
        flat[11] = np.nextafter(np.float16(flat[11]), np.float16(np.inf))
        return v
    (bad,) = _one(_check(d, _edit(d, name, ulp)))
    assert bad.subject == "model.layers.3.mlp.gate_up_proj" and "differs" in bad.detail


def test_weight_map_naming_a_missing_tensor_fails_clearly(artifacts, tmp_path):
    import shutil

    d = tmp_path / "int8"
    shutil.copytree(artifacts / "int8-sq", d)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["weight_map"]["linears"]["model.layers.0.mlp.down_proj"]["initializers"]["scale"] = "nope"
    (d / "manifest.json").write_text(json.dumps(manifest))
    graph = onnx.load(str(d / "model.onnx"), load_external_data=False)
    findings = check_weights(graph, d, manifest, open_model_source(manifest, d))
    (bad,) = _one(findings)
    assert "'nope'" in bad.detail
