"""A precision with an accuracy budget in a pipeline config (``int4-awq@ppl+0.2%``): checked with the
YAML line, planned as a quantize stage cached by its budget, run by the budget search, and reported."""

from __future__ import annotations

import pytest

from llmtrt.exporter.yaml_schema import loads_dataclass
from llmtrt.pipelines.errors import LlmtrtUserError
from llmtrt.pipelines.pipeline.config import PipelineConfig, engine_precision
from llmtrt.pipelines.pipeline.plan import plan

CONFIG = "model: bytes-llama\nprecisions: [fp32, {p}]\ncalibration:\n  samples: 8\n  seq_len: 64\n"


@pytest.mark.parametrize("precision, message", [
    ("int4-awq@ppl+x%", "<string>:2: precisions: 'int4-awq@ppl+x%': bad budget 'ppl+x%'"),
    ("int4-awq@ppl3", "bad budget 'ppl3'"),
    ("fp16@ppl+1%", "<string>:2: precisions: 'fp16@ppl+1%': a budget starts from int4-awq or int4-rtn"),
    ("int5@ppl+1%", "'int5' is not one of"),
])
def test_bad_budget_names_the_line(precision, message):
    with pytest.raises(LlmtrtUserError) as info:
        loads_dataclass(PipelineConfig, CONFIG.format(p=precision))
    assert message in str(info.value)


def test_budget_precision_is_planned_run_cached_by_content_and_reported(tmp_path):
    from llmtrt.pipelines.pipeline import stages
    from llmtrt.pipelines.pipeline.run import stage_key

    cfg = loads_dataclass(PipelineConfig, CONFIG.format(p="int4-awq@ppl+0.2%"))
    assert engine_precision("int4-awq@ppl+0.2%") == "int4" and engine_precision("int8-sq") == "int8"
    steps = plan(cfg, tmp_path)
    export, quantize = steps[0], next(s for s in steps if s.kind == "quantize")
    assert quantize.name == "quantize:int4-awq@ppl+0.2%"
    other = next(s for s in plan(loads_dataclass(PipelineConfig, CONFIG.format(p="int4-awq@ppl+0.5%")), tmp_path)
                 if s.kind == "quantize")
    export.out_dir.mkdir(parents=True)
    export.action(export)
    assert stage_key(quantize) != stage_key(other), "the budget is part of the stage's cache key"
    quantize.out_dir.mkdir(parents=True)
    summary = quantize.action(quantize)
    assert summary["precision"] == "int4-awq@ppl+0.2%" and summary["calib_ppl_increase"] <= 0.002
    assert summary["bits_per_weight"] < 8
    record = {"stage": quantize.name, "status": "ran", "seconds": 1.0, "summary": summary, "passed": True}
    report = stages.report(cfg, tmp_path, [record], 1.0)
    row = next(line for line in open(report["report_md"]) if line.startswith("| quantize:int4-awq@ppl+0.2%"))
    assert "groups_moved=" in row and "bits_per_weight=" in row and "calib_ppl_increase=" in row
