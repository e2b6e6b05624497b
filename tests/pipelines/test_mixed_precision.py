"""Layer sensitivity and accuracy budgets (``llmtrt quantize --sensitivity / --max-ppl-increase / --max-kl``)
on the trained bytes-llama fixture: the ranking finds a planted sensitive layer; a budget is met by a
real mixed graph (int4 and int8 DequantizeLinear, fp16) whose ONNX Runtime figures are the ones the
search predicted, with fewer bits per weight than int8-wo; an impossible budget exits 1 and writes
nothing; the inventory check refuses a graph that is not the mix."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from llmtrt.pipelines.artifacts import read_manifest
from llmtrt.pipelines.precision.budget import Budget
from llmtrt.pipelines.precision.mix import LABELS
from llmtrt.pipelines.precision.mixed import calibration_windows_for, quantize_to_budget
from llmtrt.pipelines.precision.quantize import PrecisionOptions, quantize

REPO = Path(__file__).resolve().parents[2]
SMALL = PrecisionOptions(calib_samples=8, calib_seq_len=64, progress=False)
PLANTED = "model.layers.2.mlp.gate_up_proj"


def _export(src, out: Path) -> Path:
    from llmtrt.exporter.config import resolve_model
    from llmtrt.pipelines.artifacts import export_artifact

    export_artifact(resolve_model(str(src)), out)
    return out


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    return _export("bytes-llama", tmp_path_factory.mktemp("mixed") / "fp32")


@pytest.fixture(scope="module")
def budget_0_2(export_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mixed-out") / "int4-awq-ppl0.2"
    quantize_to_budget(export_dir, out, "int4-awq", SMALL, Budget(max_ppl_increase=0.2))
    return out


def _planted_checkpoint(tmp_path: Path) -> Path:
    """bytes-llama with one outlier input channel in layer 2's gate/up weights: the HF column j of
    gate_proj and up_proj x 50, the RMSNorm weight feeding them / 50, so the fp32 model computes the same
    function while every int4 block holding row j of the [in, out] weight loses its other rows."""
    from safetensors.numpy import load_file, save_file

    ckpt = tmp_path / "planted"
    shutil.copytree(REPO / "configs" / "models" / "bytes-llama", ckpt)
    tensors = load_file(str(ckpt / "model.safetensors"))
    j = 7
    tensors["model.layers.2.post_attention_layernorm.weight"][j] /= 50.0
    for name in ("gate_proj", "up_proj"):
        tensors[f"model.layers.2.mlp.{name}.weight"][:, j] *= 50.0
    save_file(tensors, str(ckpt / "model.safetensors"))
    return ckpt


def _sensitivity(src: Path, target: str) -> list[dict]:
    from llmtrt.pipelines.precision.budget import sensitivity, variants
    from llmtrt.pipelines.precision.mix_eval import MixEvaluator

    uniform = quantize(src, src.parent / f"{src.name}-{target}", target, SMALL)
    windows, _ = calibration_windows_for(src, SMALL)
    ev = MixEvaluator(src, windows)
    return sensitivity(ev, variants(ev, uniform, target), target)


def test_sensitivity_ranks_a_planted_outlier_layer_first(export_dir, tmp_path):
    planted = _export(_planted_checkpoint(tmp_path), tmp_path / "planted-fp32")
    ranking = _sensitivity(planted, "int4-rtn")
    assert ranking[0]["group"] == PLANTED, [r["group"] for r in ranking[:3]]
    assert ranking[0]["mean_kl"] > 3 * ranking[1]["mean_kl"]
    # the same group in the unplanted model is not the most sensitive: the outlier made it so
    clean = _sensitivity(export_dir, "int4-rtn")
    assert clean[0]["group"] != PLANTED
    assert [r["rank"] for r in clean] == list(range(1, len(clean) + 1))
    assert all(a["mean_kl"] >= b["mean_kl"] for a, b in zip(clean, clean[1:], strict=False))


def _calibration_ppl_increase(artifact: Path, export_dir: Path) -> float:
    """The written artifact run as a whole graph in ONNX Runtime on the calibration windows, against fp32."""
    import onnxruntime as ort

    from llmtrt.exporter.kv_cache import get_layout
    from llmtrt.pipelines.artifacts import load_exported
    from llmtrt.pipelines.checks.accuracy import log_softmax
    from llmtrt.pipelines.precision.calibration import prefill_feeds

    windows, _ = calibration_windows_for(export_dir, SMALL)
    nll = []
    for d in (export_dir, artifact):
        exported = load_exported(d, read_manifest(d))
        session = ort.InferenceSession(str(exported.onnx_path), providers=["CPUExecutionProvider"])
        feeds = prefill_feeds(get_layout(exported.kv_cache), exported.config, windows)
        logits = session.run(["logits"], feeds)[0][:, :-1]
        targets = windows[:, 1:].reshape(-1)
        logp = log_softmax(logits.reshape(len(targets), -1))
        nll.append(-float(logp[np.arange(len(targets)), targets].mean()))
    return float(np.exp(nll[1] - nll[0]) - 1.0)


def test_budget_met_by_a_real_mixed_graph_with_fewer_bits_than_int8_wo(budget_0_2, export_dir, tmp_path):
    from llmtrt.pipelines.precision.inventory import inventory

    m = read_manifest(budget_0_2)
    mix = m["mix"]
    assert m["precision"] == "int4-awq@ppl+0.2%" and mix["met"] and mix["base"] == "int4-awq"
    predicted = mix["calibration"]["ppl_increase"]
    assert predicted <= 0.002
    schemes = set(mix["groups"].values())
    assert "int4-awq" in schemes and schemes - {"int4-awq"}, "a mix, not a uniform precision"
    # the graph is the mix: every linear's label, and both int4 (blocked) and int8 DequantizeLinear present
    model = onnx.load(str(budget_0_2 / "model.onnx"), load_external_data=False)
    inv = inventory(model)
    for module, scheme in mix["linears"].items():
        assert inv.linear(module).precision == LABELS[scheme], module
        assert m["weight_map"]["linears"][module]["scheme"] == {"int4-awq": "int4", "int8-wo": "int8",
                                                                "fp16": "fp16"}[scheme]
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert any(a.name == "block_size" for n in dq for a in n.attribute)
    assert any(not any(a.name == "block_size" for a in n.attribute) for n in dq)
    # what the search predicted is what the written graph computes (the evaluator is honest)
    measured = _calibration_ppl_increase(budget_0_2, export_dir)
    assert abs(measured - predicted) < 2e-4, (measured, predicted)
    assert measured <= 0.002 + 2e-4
    # fewer effective bits per weight than uniform int8-wo (counted the same way, from the written graphs)
    int8 = read_manifest(quantize(export_dir, tmp_path / "int8-wo", "int8-wo", SMALL))["weight_bits"]
    assert m["weight_bits"]["bits_per_weight"] < int8["bits_per_weight"]
    # the sensitivity table and plot are in the artifact and the manifest
    assert (budget_0_2 / "sensitivity.md").is_file() and len(m["sensitivity"]["groups"]) == len(mix["groups"])
    if _has_matplotlib():
        assert (budget_0_2 / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"


def test_impossible_budget_exits_1_and_writes_nothing(export_dir, tmp_path):
    from llmtrt.pipelines.cli import main

    out = tmp_path / "never"
    res = CliRunner().invoke(main, ["quantize", str(export_dir), "--to", "int4-awq", "--out", str(out),
                                    "--calib-samples", "8", "--calib-seq-len", "64", "--max-kl", "1e-12"])
    assert res.exit_code == 1, res.output
    assert "no mix of int4-awq with fallbacks meets the budget kl1e-12" in res.stderr
    assert "has perplexity" in res.stderr and "Nothing was written" in res.stderr
    assert not out.exists()
    assert not list(tmp_path.glob(".llmtrt-mix-*")), "the temporary uniform artifact is removed"


def test_budget_user_errors(export_dir, tmp_path):
    from llmtrt.pipelines.cli import main

    res = CliRunner().invoke(main, ["quantize", str(export_dir), "--to", "int8-sq", "--out", str(tmp_path / "x"),
                                    "--max-ppl-increase", "1"])
    assert res.exit_code == 2 and "start from int4-awq or int4-rtn" in res.stderr
    res = CliRunner().invoke(main, ["quantize", str(export_dir), "--to", "int4-awq", "--out", str(tmp_path / "x"),
                                    "--max-ppl-increase", "-1"])
    assert res.exit_code == 2 and "non-negative" in res.stderr


def test_inventory_refuses_a_graph_that_is_not_the_mix(budget_0_2):
    from llmtrt.pipelines.precision.inventory import inventory

    inv = inventory(onnx.load(str(budget_0_2 / "model.onnx"), load_external_data=False))
    mix = read_manifest(budget_0_2)["mix"]["linears"]
    assert inv.contradicts_mix({m: LABELS[s] for m, s in mix.items()}) is None
    module, scheme = next((m, s) for m, s in mix.items() if s == "int4-awq")
    problem = inv.contradicts_mix({**{m: LABELS[s] for m, s in mix.items()}, module: "int8-wo"})
    assert problem and f"{module} is int4, not int8-wo" in problem


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_validate_integrity_reads_the_mix(budget_0_2):
    """validate's precision finding checks a mixed artifact against its mix, and fails on a wrong one."""
    import json

    from llmtrt.pipelines.checks.integrity import _precision_findings

    graph = onnx.load(str(budget_0_2 / "model.onnx"), load_external_data=False)
    manifest = read_manifest(budget_0_2)
    assert all(f.passed for f in _precision_findings(graph, manifest))
    wrong = json.loads(json.dumps(manifest))
    module = next(m for m, s in wrong["mix"]["linears"].items() if s == "int8-wo")
    wrong["mix"]["linears"][module] = "int4-awq"
    assert not _precision_findings(graph, wrong)[0].passed


def test_compare_frontier_places_uniform_and_mixed_artifacts_by_their_bytes(budget_0_2, export_dir, tmp_path):
    """frontier.json: one point per artifact at the bytes its written graph stores (fp32 > mix > int4)."""
    import json
    from types import SimpleNamespace

    from llmtrt.pipelines.checks import frontier

    int4 = quantize(export_dir, tmp_path / "int4-rtn", "int4-rtn", SMALL)
    metrics = {name: SimpleNamespace(artifact=str(d), perplexity=p, perplexity_increase=p / 4.0 - 1)
               for name, d, p in (("fp32", export_dir, 4.0), ("int4-rtn", int4, 4.1),
                                  ("int4-awq@ppl+0.2%", budget_0_2, 4.01))}
    paths = frontier.write(metrics, tmp_path)
    pts = {p["precision"]: p for p in json.loads(paths["frontier_json"].read_text())["points"]}
    assert pts["fp32"]["bits_per_weight"] == 32.0
    assert pts["int4-rtn"]["weight_bytes"] < pts["int4-awq@ppl+0.2%"]["weight_bytes"] < pts["fp32"]["weight_bytes"]
    mix = read_manifest(budget_0_2)["weight_bits"]
    assert pts["int4-awq@ppl+0.2%"]["weight_bytes"] == mix["stored_bytes"]
    if _has_matplotlib():
        assert paths["frontier_png"].read_bytes()[:4] == b"\x89PNG"


def test_cli_sensitivity_alone_writes_the_uniform_artifact_with_its_ranking(export_dir, tmp_path):
    import json

    from llmtrt.pipelines.cli import main

    out = tmp_path / "rtn"
    res = CliRunner().invoke(main, ["quantize", str(export_dir), "--to", "int4-rtn", "--out", str(out),
                                    "--calib-samples", "8", "--calib-seq-len", "64", "--sensitivity", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    m = read_manifest(out)
    assert m["precision"] == summary["precision"] == "int4-rtn" and "mix" not in m
    ranking = m["sensitivity"]["groups"]
    assert len(ranking) == 16 and ranking[0]["rank"] == 1 and ranking[0]["mean_kl"] > 0
    assert (out / "sensitivity.md").read_text().count("| model.layers.") == 16
    assert m["weight_bits"]["bits_per_weight"] < 5
