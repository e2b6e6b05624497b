"""`llmtrt build` refuses bad flags before it reads or hashes anything heavy; weight-stripped plans
say how to refit them; TensorRT-RTX gets one optimization profile so the plan holds the weights once."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmtrt.exporter import onnx_layout
from llmtrt.pipelines.cli import main
from llmtrt.pipelines.engine import backends, digests, from_export
from llmtrt.pipelines.engine.manifest import BuildFacts, refit_section
from llmtrt.pipelines.errors import LlmtrtUserError

HAS_RTX = importlib.util.find_spec("tensorrt_rtx_bindings") is not None
rtx = pytest.mark.skipif(not HAS_RTX, reason="TensorRT-RTX not installed (pip install 'llmtrt[rtx]')")
MAX_SEQ = 64


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("export") / "tiny"
    result = invoke("export", "--model", "tiny", "--out", str(out), "--max-positions", str(MAX_SEQ), "--json")
    assert result.exit_code == 0, result.output
    return str(out)


@pytest.fixture
def nothing_heavy(monkeypatch):
    """Fail the test if the build hashes a file or reads the graph before refusing."""
    def heavy(*_args, **_kwargs):
        raise AssertionError("hashed or loaded a file before checking the flags")

    monkeypatch.setattr(digests.Digests, "file", heavy)
    monkeypatch.setattr(onnx_layout, "weightless_model", heavy)


@rtx
@pytest.mark.parametrize("args, message", [
    (["--max-kv", "5000"], f"exceeds the model's max_position_embeddings ({MAX_SEQ})"),
    (["--max-prompt", "0"], "--max-prompt must be >= 1"),
    (["--target-cc", "9.9"], "does not build for SM99"),
    (["--target-cc", "abc"], "expected a compute capability like 8.9"),
    (["--precision", "fp17"], "unknown --precision 'fp17'"),
    (["--plugins", "/nonexistent/libplug.so"], "--plugins /nonexistent/libplug.so: no such file"),
])
def test_bad_flags_are_refused_before_any_hashing_or_loading(export_dir, tmp_path, nothing_heavy, args, message):
    result = invoke("build", export_dir, "--out", str(tmp_path / "eng"), "--backend", "tensorrt-rtx", *args)
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert not (tmp_path / "eng").exists()


@rtx
def test_the_guard_trips_when_a_build_gets_past_the_checks(export_dir, tmp_path, nothing_heavy):
    with pytest.raises(AssertionError, match="before checking the flags"):
        invoke("build", export_dir, "--out", str(tmp_path / "eng"), "--backend", "tensorrt-rtx", "--max-kv", "32")


@rtx
@pytest.mark.parametrize("kwargs, message", [
    ({"opt_level": 7}, "--opt-level must be 0..5"), ({"workspace_mb": 0}, "--workspace-mb must be >= 1"),
    ({"lower": "magic"}, "unknown --lower 'magic'"),
])
def test_library_flag_checks_come_first_too(export_dir, tmp_path, nothing_heavy, kwargs, message):
    with pytest.raises(LlmtrtUserError, match=message):
        from_export.build_from_export(export_dir, tmp_path / "eng", backend="tensorrt-rtx", **kwargs)


@rtx
@pytest.mark.skipif(backends.cuda_driver_present(), reason="this machine has the CUDA driver: weight-stripped "
                                                           "builds are allowed here")
def test_strip_weights_without_the_driver_is_refused_first(export_dir, tmp_path, nothing_heavy):
    result = invoke("build", export_dir, "--out", str(tmp_path / "eng"), "--backend", "tensorrt-rtx",
                    "--strip-weights")
    assert result.exit_code == 2 and "libcuda.so.1" in result.stderr and "drop --strip-weights" in result.stderr


def test_light_flag_lists_match_the_registries():
    from llmtrt.pipelines.engine import flags, lowering, precision_check

    assert set(flags.PRECISION_FAMILIES) == set(precision_check.PRECISION_CHECKS)
    assert set(flags.LOWER_MODES) == set(lowering.LOWERINGS)


def test_a_backend_without_stripping_refuses_it():
    plain = backends.Backend(name="plain", module_name="x", pip_hint="", supports_target_cc=False,
                             supports_timing_cache=False, supports_python_plugins=False,
                             plugin_parse_may_abort=False, inspects_built_engine=False)
    with pytest.raises(LlmtrtUserError, match="cannot build weight-stripped plans"):
        plain.check_strip_weights()


def test_a_stripped_plan_manifest_names_its_refit_source(tmp_path):
    import onnx
    from onnx import helper as h

    model = h.make_model(h.make_graph([], "g", [], []))
    weight = model.graph.initializer.add()
    weight.name, weight.data_type, weight.dims[:] = "w", onnx.TensorProto.FLOAT, [4]
    for key, value in (("location", "model.native.onnx.data"), ("offset", "0"), ("length", "16")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    facts = BuildFacts(backend=backends.BACKENDS["tensorrt-rtx"], precision="fp32", plan_path=tmp_path / "p.plan",
                       plan=None, onnx_path=tmp_path / "model.native.onnx", built_sha256="ab" * 32, model=model,
                       profiles=[], cc_names=[], builder={}, stats={}, strip_weights=True)
    refit = refit_section(facts, 16)
    assert refit["required"] and refit["onnx"] == "model.native.onnx" and refit["onnx_sha256"] == "ab" * 32
    assert refit["weights_files"] == ["model.native.onnx.data"] and "OnnxParserRefitter" in refit["how"]
    assert refit["builder_flags"] == ["REFIT", "STRIP_PLAN"]
    assert refit_section(BuildFacts(**{**facts.__dict__, "strip_weights": False}), 16) == {"required": False}


@rtx
@pytest.mark.skipif(not backends.cuda_driver_present(), reason="TensorRT-RTX builds weight-stripped plans only "
                                                               "with the NVIDIA driver (libcuda.so.1) installed")
def test_stripped_plan_is_small_and_names_its_refit_source(tmp_path):
    src = tmp_path / "export"
    assert invoke("export", "--model", "bytes-llama", "--out", str(src), "--json").exit_code == 0
    full = json.loads(invoke("build", str(src), "--out", str(tmp_path / "full"), "--json").stdout)
    stripped = json.loads(invoke("build", str(src), "--out", str(tmp_path / "eng"), "--strip-weights",
                                 "--json").stdout)
    mf = json.loads((tmp_path / "eng" / "engine.fp32.json").read_text())
    assert stripped["plan_bytes"] < full["plan_bytes"] - 0.9 * mf["weights"]["bytes"]
    assert mf["refit"]["required"] and (tmp_path / "eng" / mf["refit"]["onnx"]).is_file()


@rtx
def test_one_profile_holds_the_weights_once(tmp_path):
    """TensorRT-RTX stores the weights per optimization profile: two profiles -> about twice the plan."""
    src = tmp_path / "export"  # unfused, so the build's own fusion of GEMMs sharing an input has work to do
    assert invoke("export", "--model", "bytes-llama", "--out", str(src), "--no-fuse", "--json").exit_code == 0
    sizes = {}
    for name, extra in (("merged", []), ("separate", ["--separate-profiles"])):
        result = invoke("build", str(src), "--out", str(tmp_path / name), "--backend", "tensorrt-rtx",
                        "--target-cc", "8.9", "--max-kv", "255", "--max-prompt", "64", "--json", *extra)
        assert result.exit_code == 0, result.output
        sizes[name] = json.loads(result.stdout)
    weights = sizes["merged"]["weights_bytes"]
    assert sizes["separate"]["plan_bytes"] - sizes["merged"]["plan_bytes"] > 0.9 * weights
    assert sizes["merged"]["plan_bytes"] < weights + 8 * 2**20  # the weights once, plus kernels
    mf = json.loads((Path(tmp_path) / "merged" / "engine.fp32.json").read_text())
    assert mf["lowering"]["fused_gemm_groups"] > 0 and mf["builder"]["plan_streamed"]
