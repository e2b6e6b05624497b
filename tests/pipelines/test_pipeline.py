"""`llmtrt pipeline`: config schema, plan, matrix, stage caching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmtrt.exporter.yaml_schema import loads_dataclass
from llmtrt.pipelines.cli import main
from llmtrt.pipelines.errors import LlmtrtUserError
from llmtrt.pipelines.pipeline.config import PipelineConfig, load_config
from llmtrt.pipelines.pipeline.plan import matrix, plan

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text, message", [
    ("precisions: [fp32]\n", "<string>:1: model: required key is missing"),
    ("model: tiny\nprecisions: [fp32, fp17]\n", "<string>:2: precisions: 'fp17' is not one of"),
    ("model: tiny\ncalibration:\n  samples: many\n", "<string>:3: calibration.samples: expected an integer"),
    ("model: tiny\ntargets:\n  - backend: onnxruntime\n    colour: red\n", "<string>:4: targets[0].colour: unknown key"),
    ("model: tiny\nseed: true\n", "<string>:2: seed: expected an integer, got 'true'"),
    ("model: tiny\nprecisions: [fp16]\n", "precisions must include fp32"),
    ("model: [tiny\n", "invalid YAML"),
    ("", "the file is empty"),
    ("model: tiny\nmodel: small\n", "<string>:2: model: given twice"),
])
def test_config_errors_name_line_and_key(text, message):
    with pytest.raises(LlmtrtUserError, match=None) as info:
        loads_dataclass(PipelineConfig, text)
    assert message in str(info.value)


def test_config_types_and_defaults():
    cfg = loads_dataclass(PipelineConfig, "model: tiny\nprecisions: fp32\ntargets:\n  - target_cc: [8.9, 12.0]\n")
    assert cfg.precisions == ["fp32"]
    assert cfg.targets[0].target_cc == ["8.9", "12.0"]  # numbers stay as written
    assert cfg.targets[0].backend == "tensorrt-rtx" and cfg.calibration.samples > 0


@pytest.mark.parametrize("name", ["demo", "rtx", "jetson-orin", "ci-gate"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / "pipelines" / f"{name}.yaml")
    assert cfg.name == name
    jobs = matrix(cfg)
    assert jobs and all(j["precision"] in cfg.precisions for j in jobs)


def test_matrix_rejects_unknown_precision_for_a_target():
    cfg = loads_dataclass(PipelineConfig, "model: tiny\ntargets:\n  - precisions: [fp16]\n")
    with pytest.raises(LlmtrtUserError, match="not in the pipeline's precisions"):
        matrix(cfg)


def test_matrix_cli_prints_github_include():
    result = CliRunner().invoke(main, ["pipeline", "matrix", str(REPO / "configs/pipelines/rtx.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    jobs = json.loads(result.output)["include"]
    assert {(j["precision"], j["backend"]) for j in jobs} == {
        ("fp16", "tensorrt-rtx"), ("int8-sq", "tensorrt-rtx"), ("int4-awq", "tensorrt-rtx")}
    assert jobs[0]["target_cc"] == "8.6,8.9,12.0"


def test_plan_orders_stages_and_lays_out_the_tree(tmp_path):
    cfg = load_config(REPO / "configs/pipelines/demo.yaml")
    stages = plan(cfg, tmp_path)
    kinds = [s.kind for s in stages]
    assert kinds == sorted(kinds, key=["export", "quantize", "build", "validate", "compare"].index)
    names = {s.name: s for s in stages}
    assert names["export"].out_dir == tmp_path / "onnx" / "custom"
    assert names["quantize:int8-sq"].out_dir == tmp_path / "int8-sq"
    assert names["quantize:int8-sq"].inputs == [tmp_path / "onnx" / "custom"]
    assert names["build:tensorrt-rtx-sm89:fp16"].out_dir == tmp_path / "engines" / "tensorrt-rtx-sm89" / "fp16"
    assert names["build:tensorrt-rtx-sm89:fp16"].inputs == [tmp_path / "fp16"]
    assert "build:tensorrt-rtx-sm89:int8-wo" not in names  # not in that target's precisions
    assert names["compare"].options["precisions"][0] == "fp32"


def test_export_stage_is_cached_and_forced(tmp_path):
    config = tmp_path / "p.yaml"
    config.write_text("name: t\nmodel: tiny\nmax_positions: 64\n")
    runner = CliRunner()
    args = ["pipeline", "run", str(config), "--out", str(tmp_path / "out"), "--only", "export"]
    first = runner.invoke(main, args)
    assert "export: done" in first.output, first.output
    record = json.loads((tmp_path / "out/onnx/standard/stage.json").read_text())
    assert (tmp_path / "out/onnx/standard/model.onnx").is_file() and record["kind"] == "export"
    second = runner.invoke(main, args)
    assert "export: cached" in second.output, second.output
    third = runner.invoke(main, [*args, "--force"])
    assert "export: done" in third.output, third.output
    config.write_text("name: t\nmodel: tiny\nmax_positions: 32\n")  # changed option: runs again
    fourth = runner.invoke(main, args)
    assert "export: done" in fourth.output, fourth.output


def test_only_refuses_missing_upstream(tmp_path):
    config = tmp_path / "p.yaml"
    config.write_text("name: t\nmodel: tiny\nmax_positions: 64\n")
    result = CliRunner().invoke(main, ["pipeline", "run", str(config), "--out", str(tmp_path), "--only", "compare"])
    assert result.exit_code == 2
    assert "no up-to-date result" in result.output
