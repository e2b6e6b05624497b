"""`llmtrt build` end to end on `llmtrt export --model tiny`: every dialect, growing and static cache.

TensorRT-RTX builds ahead of time on a CPU, so these run without a GPU whenever
``tensorrt_rtx_bindings`` imports; the `tensorrt` backend tests need the full package.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from llmtrt.pipelines.cli import main
from llmtrt.pipelines.engine import lowering

HAS_RTX = importlib.util.find_spec("tensorrt_rtx_bindings") is not None
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
rtx = pytest.mark.skipif(not HAS_RTX, reason="TensorRT-RTX not installed (pip install 'llmtrt[rtx]')")
trt_only = pytest.mark.skipif(not HAS_TRT, reason="full TensorRT not installed (pip install 'llmtrt[tensorrt]'); "
                                                  "it needs a CUDA GPU machine")
MAX_SEQ = 64          # rotary table length of the test exports (keeps the static cache small)
DIALECTS = ("custom", "standard", "decomposed")
CACHES = ("dynamic", "static")


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{(dialect, kv_cache): export dir}, each made once by `llmtrt export --model tiny`."""
    root = tmp_path_factory.mktemp("exports")
    cache: dict[tuple[str, str], str] = {}

    def get(dialect: str, kv_cache: str) -> str:
        if (dialect, kv_cache) not in cache:
            out = root / f"{dialect}-{kv_cache}"
            result = invoke("export", "--model", "tiny", "--out", str(out), "--ops", dialect, "--kv-cache", kv_cache,
                            "--max-positions", str(MAX_SEQ), "--json")
            assert result.exit_code == 0, result.output
            cache[dialect, kv_cache] = str(out)
        return cache[dialect, kv_cache]

    return get


def test_help_teaches():
    result = invoke("build", "--help")
    assert result.exit_code == 0
    for text in ("EXPORT_DIR", "--lower", "--target-cc", "--profiles", "Examples:", "llmtrt quantize --to fp16",
                 "max_cache_length"):
        assert text in result.output


# (dialect, lower) pairs that build; the others are refused with the listed-node error (below).
BUILDS = [("custom", "native"), ("custom", "inline"), ("standard", "native"), ("decomposed", "native"),
          ("decomposed", "inline")]


@rtx
@pytest.mark.parametrize("kv_cache", CACHES)
@pytest.mark.parametrize("dialect, lower", BUILDS)
def test_build_tiny(exports, tmp_path, dialect, lower, kv_cache):
    export_dir = exports(dialect, kv_cache)
    out = tmp_path / "eng"
    result = invoke("build", export_dir, "--out", str(out), "--backend", "tensorrt-rtx", "--lower", lower,
                    "--target-cc", "8.9", "--max-batch", "2", "--max-prompt", "16", "--max-kv", "48", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    export = json.loads((Path(export_dir) / "manifest.json").read_text())
    mf = json.loads((out / "engine.fp32.json").read_text())
    plan = out / "engine.fp32.plan"
    assert summary["plan"] == str(plan) and plan.stat().st_size == mf["plan_bytes"] > 0
    assert mf["plan_sha256"] == hashlib.sha256(plan.read_bytes()).hexdigest()
    assert mf["precision"] == summary["precision"] == "fp32"  # from the export manifest
    assert mf["backend"]["name"] == "tensorrt-rtx" and mf["target_compute_capabilities"] == ["SM89"]
    assert mf["onnx_sha256"] == export["onnx_sha256"] and mf["onnx"].endswith(f"{dialect}-{kv_cache}/model.onnx")
    assert mf["export"] == {**mf["export"], "ops": dialect, "kv_cache": kv_cache, "config_name": "tiny",
                            "onnx_sha256": export["onnx_sha256"]}
    assert mf["lowering"]["mode"] == lower and (out / f"model.{lower}.onnx").is_file()
    assert mf["network"]["num_layers"] == summary["layers"] > 0
    # one optimization profile covering prefill and decode: TensorRT-RTX stores the weights per profile
    [profile] = mf["profiles"]
    assert profile["name"] == "prefill+decode" and [p["name"] for p in profile["covers"]] == ["prefill", "decode"]
    shapes = profile["shapes"]
    types = {layer["type"] for layer in mf["network"]["layers"]}
    if kv_cache == "static":
        assert all(p["max_cache_length"] == 48 and "past" not in p for p in [profile, *profile["covers"]])
        assert shapes["past_key_values.1.value"] == {"min": [1, 2, 48, 16], "opt": [2, 2, 48, 16],
                                                     "max": [2, 2, 48, 16]}
        assert shapes["write_indices"] == {"min": [1], "opt": [2], "max": [2]}
        assert shapes["input_ids"] == {"min": [1, 1], "opt": [2, 1], "max": [2, 16]}
        assert mf["lowering"]["pinned_dims"] == {"max_cache_length": 48}
    else:
        assert profile["covers"][1]["past"] == {"min": 1, "opt": 24, "max": 48}
        assert profile["past"] == {"min": 0, "opt": 24, "max": 48}
        assert shapes["attention_mask"] == {"min": [1, 1], "opt": [2, 25], "max": [2, 49]}  # never past + prompt
        assert shapes["past_key_values.0.key"] == {"min": [1, 2, 0, 16], "opt": [2, 2, 24, 16], "max": [2, 2, 48, 16]}
    if lower == "native" and dialect != "decomposed":
        assert {"ROTARY_EMBEDDING", "ATTENTION_INPUT"} <= types
        assert ("KV_CACHE_UPDATE" in types) == (kv_cache == "static")  # TensorScatter: in-place cache update
    else:
        assert "ATTENTION_INPUT" not in types
    assert not [p.name for p in out.iterdir() if p.name.endswith(".partial")]


@rtx
def test_static_native_lowering_matches_function_bodies(exports):
    """The TensorScatter + Attention rewrite, minus the TensorRT-only attribute, equals the exported graph."""
    import onnxruntime as ort

    src = onnx.load(f"{exports('custom', 'static')}/model.onnx")
    lowered = lowering.lower(src, "native", dims={"max_cache_length": 24})
    attention = [n for n in lowered.graph.node if n.op_type == "Attention"]
    assert {n.op_type for n in lowered.graph.node} >= {"TensorScatter", "Attention", "RotaryEmbedding"}
    assert [o.version for o in lowered.opset_import if o.domain == ""] == [24] and not lowering.custom_nodes(lowered)
    for node in attention:
        kept = [a for a in node.attribute if a.name != "TRT_decomposable"]
        assert len(kept) == len(node.attribute) - 1
        del node.attribute[:]
        node.attribute.extend(kept)
    rng = np.random.default_rng(0)
    b, s, cache = 2, 3, 24
    write = np.array([5, 2], np.int64)
    mask = (np.arange(cache)[None, :] < (write + s)[:, None]).astype(np.int64)
    feeds = {"input_ids": rng.integers(0, 256, (b, s)), "position_ids": write[:, None] + np.arange(s)[None, :],
             "attention_mask": mask, "write_indices": write}
    for i in range(2):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = rng.standard_normal((b, 2, cache, 16)).astype(np.float32)
    options = ort.SessionOptions()
    options.log_severity_level = 3

    def run(model):
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)

    names = [o.name for o in src.graph.output]
    for name, want, got in zip(names, run(src), run(lowered), strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5, err_msg=name)


@rtx
def test_standard_inline_lists_nodes_and_suggests_native(exports, tmp_path):
    result = invoke("build", exports("standard", "dynamic"), "--out", str(tmp_path), "--lower", "inline",
                    "--backend", "tensorrt-rtx", "--max-prompt", "8", "--max-kv", "16")
    assert result.exit_code == 2
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error: ")]  # the nodes joined with "; "
    assert "TensorRT cannot import 2 node(s)" in line
    assert line.count("(Attention): ") == 2 and line.count("softmax precision") == 2
    assert "try `--lower native`" in result.stderr and not list(tmp_path.glob("engine.*"))


@rtx
def test_plugin_without_libraries_is_refused_per_node(exports, tmp_path):
    result = invoke("build", exports("custom", "dynamic"), "--out", str(tmp_path), "--lower", "plugin",
                    "--backend", "tensorrt-rtx", "--max-prompt", "8", "--max-kv", "16")
    assert result.exit_code == 2
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error: ")]
    failing = [part for part in line.split("; ") if "(llmtrt::" in part]
    assert len(failing) == 4  # 2 layers x (RotaryEmbedding of the fused q|k + GroupQueryAttention); RMSNorm has no clash
    assert all("llmtrt::" in line for line in failing) and "`--lower native`" in result.stderr


@rtx
def test_fp16_on_fp32_graph_says_run_quantize(exports, tmp_path):
    result = invoke("build", exports("custom", "dynamic"), "--out", str(tmp_path), "--precision", "fp16",
                    "--backend", "tensorrt-rtx")
    assert result.exit_code == 2
    assert "llmtrt quantize --to fp16" in result.stderr and not list(tmp_path.glob("engine.*"))


@rtx
def test_profiles_yaml(exports, tmp_path):
    yaml_path = tmp_path / "profiles.yaml"
    yaml_path.write_text("max_cache_length: 32\nprefill: {batch: 1, seq: [1, 8, 16]}\ndecode: {batch: 1, seq: 1}\n")
    out = tmp_path / "eng"
    result = invoke("build", exports("custom", "static"), "--out", str(out), "--profiles", str(yaml_path), "--json")
    assert result.exit_code == 0, result.output
    mf = json.loads((out / "engine.fp32.json").read_text())
    assert [(p["name"], p["seq"]["max"], p["max_cache_length"]) for p in mf["profiles"][0]["covers"]] == [
        ("prefill", 16, 32), ("decode", 1, 32)]
    separate = invoke("build", exports("custom", "static"), "--out", str(out), "--profiles", str(yaml_path),
                      "--separate-profiles", "--json")
    assert separate.exit_code == 0, separate.output
    mf = json.loads((out / "engine.fp32.json").read_text())
    assert [(p["name"], p["seq"]["max"], p["max_cache_length"]) for p in mf["profiles"]] == [
        ("prefill", 16, 32), ("decode", 1, 32)] and not mf["builder"]["profiles_merged"]
    clash = invoke("build", exports("custom", "static"), "--out", str(out), "--profiles", str(yaml_path),
                   "--max-kv", "8")
    assert clash.exit_code == 2 and "both set profiles" in clash.stderr
    dynamic = invoke("build", exports("custom", "dynamic"), "--out", str(out), "--profiles", str(yaml_path))
    assert dynamic.exit_code == 2 and "max_cache_length is for static-cache graphs" in dynamic.stderr


@rtx
@pytest.mark.parametrize("args, match", [
    (["--max-kv", str(MAX_SEQ + 1)], f"max_cache_length {MAX_SEQ + 1} exceeds the model's max positions ({MAX_SEQ}"),
    (["--max-prompt", "40", "--max-kv", "32"], "seq max (40) exceeds max_cache_length (32)"),
])
def test_static_profile_errors(exports, tmp_path, args, match):
    result = invoke("build", exports("custom", "static"), "--out", str(tmp_path), *args)
    assert result.exit_code == 2 and match in result.stderr


def test_missing_manifest_is_a_user_error(tmp_path):
    result = invoke("build", str(tmp_path), "--out", str(tmp_path / "eng"))
    assert result.exit_code == 2 and "no manifest.json" in result.stderr


@rtx
def test_changed_onnx_is_refused(exports, tmp_path):
    import shutil

    copy = tmp_path / "export"
    shutil.copytree(exports("decomposed", "dynamic"), copy)
    model = onnx.load(str(copy / "model.onnx"))
    model.doc_string = "edited"
    onnx.save(model, str(copy / "model.onnx"))
    result = invoke("build", str(copy), "--out", str(tmp_path / "eng"))
    assert result.exit_code == 2 and "sha256 differs" in result.stderr


@trt_only
def test_tensorrt_backend_builds_tiny(exports, tmp_path):
    out = tmp_path / "eng"
    result = invoke("build", exports("custom", "dynamic"), "--out", str(out), "--backend", "tensorrt",
                    "--max-prompt", "16", "--max-kv", "48", "--timing-cache", str(tmp_path / "timing.cache"), "--json")
    assert result.exit_code == 0, result.output
    mf = json.loads((out / "engine.fp32.json").read_text())
    assert mf["backend"]["name"] == "tensorrt" and mf["network"]["num_layers"] > 0
    assert (tmp_path / "timing.cache").stat().st_size > 0


@trt_only
def test_tensorrt_backend_refuses_target_cc(exports, tmp_path):
    result = invoke("build", exports("custom", "dynamic"), "--out", str(tmp_path), "--backend", "tensorrt",
                    "--target-cc", "8.9")
    assert result.exit_code == 2 and "--target-cc needs TensorRT-RTX" in result.stderr
