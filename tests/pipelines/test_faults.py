"""The planted-fault suite: every fault tools/plant_fault.py knows must make `llmtrt validate` fail, for
fp32, fp16, int8-sq and int4-awq artifacts of the built-in model in all three dialects (catch rate
100 %), while the clean artifacts pass. A check is only a check once it has failed."""

from __future__ import annotations

import shutil

import pytest

from llmtrt.exporter.config import resolve_model
from llmtrt.exporter.onnx_export import ExportOptions
from llmtrt.pipelines.artifacts import export_artifact
from llmtrt.pipelines.checks.validate import ValidateOptions, validate
from tools.plant_fault import FAULTS, plant

DIALECTS = ("custom", "standard", "decomposed")
PRECISIONS = ("fp32", "fp16", "int8-sq", "int4-awq")
OPTIONS = ValidateOptions(batch=2, decode_steps=2, prompt_tokens=12)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    from llmtrt.pipelines.precision.quantize import PrecisionOptions, quantize

    root = tmp_path_factory.mktemp("faults")
    built = {}
    for ops in DIALECTS:
        fp32 = root / f"fp32-{ops}"
        export_artifact(resolve_model("bytes-llama"), fp32, ExportOptions(dialect=ops))
        built[("fp32", ops)] = fp32
        for precision in PRECISIONS[1:]:
            out = root / f"{precision}-{ops}"
            quantize(fp32, out, precision, PrecisionOptions(progress=False, calib_samples=4))
            built[(precision, ops)] = out
    return built


CASES = [(p, d) for p in PRECISIONS for d in DIALECTS]


@pytest.mark.slow
@pytest.mark.parametrize("precision, ops", CASES, ids=[f"{p}-{d}" for p, d in CASES])
def test_clean_artifact_passes_and_every_planted_fault_fails(artifacts, tmp_path, precision, ops):
    artifact = artifacts[(precision, ops)]
    clean = validate(artifact, OPTIONS)
    assert clean, clean.table()
    missed = []
    for name in FAULTS:
        faulty = tmp_path / name
        plant(artifact, name, faulty)
        report = validate(faulty, OPTIONS)
        if report:
            missed.append(name)
        shutil.rmtree(faulty)
    assert not missed, f"{precision} {ops}: validate passed the planted fault(s) {missed}"
