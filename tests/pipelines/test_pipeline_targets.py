"""Every shipped pipeline config can build on the backend release it names, checked against the
capabilities declared per release in pipelines/engine/backends.py; configs that cannot are refused
by `llmtrt pipeline plan` naming the file, the target and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from llmtrt.exporter.yaml_schema import loads_dataclass
from llmtrt.pipelines.cli import main
from llmtrt.pipelines.engine.backends import BACKENDS, ENGINE_PRECISIONS, LOWERING_OPS
from llmtrt.pipelines.errors import LlmtrtUserError
from llmtrt.pipelines.pipeline.config import (
    ENGINE_PRECISION,
    PipelineConfig,
    check_targets,
    load_config,
    target_problems,
)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "configs" / "pipelines").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_configs_build_on_their_named_targets(path):
    cfg = load_config(path)
    check_targets(cfg, path)
    for target in cfg.targets:
        if target.backend == "onnxruntime":
            continue
        assert target.version, f"{path.name}: name the {target.backend} release the target is for (version:)"
        caps = BACKENDS[target.backend].capabilities_for(target.version)
        assert not target_problems(cfg, target)
        assert target.lower != "plugin" or caps.python_plugins
        assert all(ENGINE_PRECISION[p] in caps.precisions for p in target.precisions or cfg.precisions)


def test_declared_capabilities_are_well_formed():
    for backend in BACKENDS.values():
        assert backend.capabilities, backend.name
        for caps in backend.capabilities:
            assert caps.native_ops <= set(LOWERING_OPS) and caps.precisions <= set(ENGINE_PRECISIONS) and caps.source
        ranges = [(c.first, c.last) for c in backend.capabilities]
        assert ranges == sorted(ranges, key=lambda r: r[0]) and ranges[-1][1] is None  # ordered, open-ended
    jetson = BACKENDS["tensorrt"].capabilities_for("10.3")
    assert not jetson.native_ops and not jetson.python_plugins  # docs/plugins.md, docs/support-matrix.md
    assert BACKENDS["tensorrt"].capabilities_for("10.9").python_plugins


JETSON = """
model: tiny
ops: {dialect}
kv_cache: {cache}
precisions: [fp32, fp16]
targets:
  - backend: tensorrt
    version: "10.3"
    lower: {lower}
"""


@pytest.mark.parametrize("dialect, cache, lower, message", [
    ("custom", "dynamic", "plugin", "lower: plugin needs llmtrt's Python plugins"),
    ("standard", "dynamic", "native", "ops: standard needs native Attention, RMSNormalization, RotaryEmbedding"),
    ("standard", "static", "native", "RotaryEmbedding, TensorScatter importers"),
])
def test_configs_that_cannot_build_on_their_target_are_refused(tmp_path, dialect, cache, lower, message):
    path = tmp_path / "orin.yaml"
    path.write_text(JETSON.format(dialect=dialect, cache=cache, lower=lower))
    result = CliRunner().invoke(main, ["pipeline", "plan", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert f"{path}: these targets cannot build as written" in result.stderr
    assert "targets[0] (tensorrt 10.3)" in result.stderr and message in result.stderr
    assert "use " in result.stderr  # the fix
    ok = JETSON.format(dialect="custom", cache=cache, lower="native")
    check_targets(loads_dataclass(PipelineConfig, ok))


@pytest.mark.parametrize("target, message", [
    ("  - backend: tensorrt\n    version: \"9.0\"\n", "no capabilities are declared for this version"),
    ("  - backend: tensorrt\n    version: \"10.3\"\n    target_cc: [\"8.7\"]\n", "target_cc needs tensorrt-rtx"),
    ("  - backend: tensorrt-rtx\n    version: \"1.7\"\n    lower: plugin\n", "lower: plugin needs"),
])
def test_other_target_mistakes_are_named(target, message):
    cfg = loads_dataclass(PipelineConfig, f"model: tiny\ntargets:\n{target}")
    with pytest.raises(LlmtrtUserError, match=message):
        check_targets(cfg)
