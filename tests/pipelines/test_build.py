"""Engine builds on hand-made graphs: lowering, profiles, manifests, refusals, atomic writes.

TensorRT-RTX builds ahead of time on a CPU, so the build tests run without a GPU whenever
``tensorrt_rtx_bindings`` imports; full-TensorRT tests need ``tensorrt``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time

import numpy as np
import onnx
import pytest
from onnx import AttributeProto
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from llmtrt.pipelines.artifacts import onnx_sha256
from llmtrt.pipelines.engine import backends, build, lowering, plugin_setup
from llmtrt.pipelines.engine.profiles import (
    Profile,
    Range,
    decode_profile,
    graph_input_dims,
    prefill_profile,
    profile_shapes,
    profiles_from_yaml,
    static_profiles,
    validate_profiles,
)
from llmtrt.pipelines.errors import LlmtrtUserError

HAS_RTX = importlib.util.find_spec("tensorrt_rtx_bindings") is not None
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
rtx = pytest.mark.skipif(not HAS_RTX, reason="TensorRT-RTX not installed (pip install 'llmtrt[rtx]')")
trt_only = pytest.mark.skipif(not HAS_TRT, reason="full TensorRT not installed (pip install 'llmtrt[tensorrt]'); "
                                                  "it needs a CUDA GPU machine")

B, S, P, T = "batch", "sequence_length", "past_sequence_length", "total_sequence_length"
HID, HQ, HKV, D, MAXPOS = 32, 4, 2, 8, 64
PROFILES = (prefill_profile(2, 16), decode_profile(2, 48))


# ---------------------------------------------------------------------------------------------
# minimal llmtrt ops with ONNX function bodies, and a one-layer decoder block using them
# ---------------------------------------------------------------------------------------------
def _ref_attr(out: str, attr: str, kind: int) -> onnx.NodeProto:
    node = h.make_node("Constant", [], [out])
    ref = h.make_attribute_ref("value_float" if kind == AttributeProto.FLOAT else "value_int", kind)
    ref.ref_attr_name = attr
    node.attribute.append(ref)
    return node


def _ints(out: str, vals: list[int]) -> onnx.NodeProto:
    return h.make_node("Constant", [], [out], value_ints=vals)


def llmtrt_functions(opset: int = 23) -> list[onnx.FunctionProto]:
    """RMSNorm, RotaryEmbedding (half-split) and GroupQueryAttention in primitive ops."""
    imports = [h.make_opsetid("", opset)]
    rms = h.make_function("llmtrt", "RMSNorm", ["X", "scale"], ["Y"], [
        h.make_node("Mul", ["X", "X"], ["x2"]), _ints("axes", [-1]),
        h.make_node("ReduceMean", ["x2", "axes"], ["ms"], keepdims=1),
        _ref_attr("eps", "epsilon", AttributeProto.FLOAT), h.make_node("CastLike", ["eps", "X"], ["eps_t"]),
        h.make_node("Add", ["ms", "eps_t"], ["v"]), h.make_node("Sqrt", ["v"], ["rms"]),
        h.make_node("Div", ["X", "rms"], ["xn"]), h.make_node("Mul", ["xn", "scale"], ["Y"])],
        imports, attributes=["epsilon"])
    rope = h.make_function("llmtrt", "RotaryEmbedding", ["X", "position_ids", "cos_cache", "sin_cache"], ["Y"], [
        h.make_node("Gather", ["cos_cache", "position_ids"], ["c3"]), h.make_node("Gather", ["sin_cache", "position_ids"], ["s3"]),
        _ints("ax1", [1]), h.make_node("Unsqueeze", ["c3", "ax1"], ["c"]), h.make_node("Unsqueeze", ["s3", "ax1"], ["s"]),
        h.make_node("Split", ["X"], ["x1", "x2"], axis=-1, num_outputs=2),
        h.make_node("Mul", ["x1", "c"], ["a"]), h.make_node("Mul", ["x2", "s"], ["b"]), h.make_node("Sub", ["a", "b"], ["y1"]),
        h.make_node("Mul", ["x2", "c"], ["e"]), h.make_node("Mul", ["x1", "s"], ["f"]), h.make_node("Add", ["e", "f"], ["y2"]),
        h.make_node("Concat", ["y1", "y2"], ["Y"], axis=-1)], imports, attributes=["interleaved"])
    gqa = h.make_function("llmtrt", "GroupQueryAttention", ["Q", "K", "V", "attn_mask", "past_key", "past_value"],
                          ["Y", "present_key", "present_value"], [
        h.make_node("Concat", ["past_key", "K"], ["present_key"], axis=2),
        h.make_node("Concat", ["past_value", "V"], ["present_value"], axis=2),
        h.make_node("Shape", ["Q"], ["qs"]), h.make_node("Shape", ["K"], ["ks"]),
        _ints("i0", [0]), _ints("i1", [1]), _ints("i2", [2]), _ints("i4", [4]), _ints("m1", [-1]),
        h.make_node("Slice", ["qs", "i0", "i1"], ["bd"]), h.make_node("Slice", ["ks", "i1", "i2"], ["hkv"]),
        h.make_node("Slice", ["qs", "i2", "i4"], ["sd"]),
        h.make_node("Concat", ["bd", "hkv", "m1", "sd"], ["q5s"], axis=0),
        h.make_node("Reshape", ["Q", "q5s"], ["q5"]),                       # [B, Hkv, G, S, D]
        _ints("ax2", [2]), h.make_node("Unsqueeze", ["present_key", "ax2"], ["k5"]),
        h.make_node("Unsqueeze", ["present_value", "ax2"], ["v5"]),
        h.make_node("Transpose", ["k5"], ["k5t"], perm=[0, 1, 2, 4, 3]),
        _ref_attr("sc", "scale", AttributeProto.FLOAT), h.make_node("CastLike", ["sc", "Q"], ["sc_t"]),
        h.make_node("Mul", ["q5", "sc_t"], ["q5x"]), h.make_node("MatMul", ["q5x", "k5t"], ["scores"]),
        h.make_node("Unsqueeze", ["attn_mask", "ax2"], ["m5"]), h.make_node("Add", ["scores", "m5"], ["sm"]),
        h.make_node("Softmax", ["sm"], ["probs"], axis=-1), h.make_node("MatMul", ["probs", "v5"], ["y5"]),
        h.make_node("Reshape", ["y5", "qs"], ["Y"])], imports, attributes=["q_num_heads", "kv_num_heads", "scale"])
    return [rms, rope, gqa]


def decoder_block(dtype: int = TP.FLOAT, opset: int = 23, head_dim: int = D, functions: bool = True) -> onnx.ModelProto:
    """x -> RMSNorm -> q/k/v -> RoPE -> GQA(past) -> o_proj, with the real graph's KV/mask IO names."""
    npdt = np.float16 if dtype == TP.FLOAT16 else np.float32
    rng = np.random.default_rng(0)
    d = head_dim
    inv = 1.0 / (10000 ** (np.arange(0, d, 2) / d))
    freqs = np.outer(np.arange(MAXPOS), inv)

    def w(name, *shape):
        return nh.from_array((rng.standard_normal(shape) * 0.2).astype(npdt), name)

    consts = {"shape_q": [0, 0, HQ, d], "shape_kv": [0, 0, HKV, d], "shape_o": [0, 0, HQ * d], "ax12": [1, 2],
              **{f"c{i}": [i] for i in range(5)}}
    inits = [w("w_norm", HID), w("wq", HID, HQ * d), w("wk", HID, HKV * d), w("wv", HID, HKV * d), w("wo", HQ * d, HID),
             nh.from_array(np.cos(freqs).astype(npdt), "cos_cache"), nh.from_array(np.sin(freqs).astype(npdt), "sin_cache"),
             nh.from_array(np.array(1.0, npdt), "one"), nh.from_array(np.array(-10000.0, npdt), "neg"),
             *(nh.from_array(np.array(v, np.int64), k) for k, v in consts.items())]
    L = "llmtrt"
    nodes = [h.make_node("RMSNorm", ["x", "w_norm"], ["hn"], domain=L, epsilon=1e-5, name="norm")]
    for t, shape in (("q", "shape_q"), ("k", "shape_kv"), ("v", "shape_kv")):
        nodes += [h.make_node("MatMul", ["hn", f"w{t}"], [f"{t}2"], name=f"{t}_proj"),
                  h.make_node("Reshape", [f"{t}2", shape], [f"{t}3"]),
                  h.make_node("Transpose", [f"{t}3"], [f"{t}4"], perm=[0, 2, 1, 3])]
    nodes += [
        h.make_node("RotaryEmbedding", ["q4", "position_ids", "cos_cache", "sin_cache"], ["qr"], domain=L, interleaved=0,
                    name="rope_q"),
        h.make_node("RotaryEmbedding", ["k4", "position_ids", "cos_cache", "sin_cache"], ["kr"], domain=L, interleaved=0,
                    name="rope_k"),
        h.make_node("Cast", ["attention_mask"], ["am"], to=dtype), h.make_node("Sub", ["one", "am"], ["am_inv"]),
        h.make_node("Mul", ["am_inv", "neg"], ["am_add"]), h.make_node("Unsqueeze", ["am_add", "ax12"], ["am4"]),
        h.make_node("Shape", ["qr"], ["qshape"]), h.make_node("Shape", ["am4"], ["mshape"]),
        h.make_node("Slice", ["qshape", "c2", "c3"], ["s_dim"]), h.make_node("Slice", ["mshape", "c0", "c2"], ["b1"]),
        h.make_node("Slice", ["mshape", "c3", "c4"], ["t_dim"]),
        h.make_node("Concat", ["b1", "s_dim", "t_dim"], ["mask_shape"], axis=0),
        h.make_node("Expand", ["am4", "mask_shape"], ["mask"]),                 # additive [B, 1, S, T]
        h.make_node("GroupQueryAttention", ["qr", "kr", "v4", "mask", "past_key_values.0.key", "past_key_values.0.value"],
                    ["attn", "present.0.key", "present.0.value"], domain=L, q_num_heads=HQ, kv_num_heads=HKV,
                    scale=float(d) ** -0.5, name="gqa"),
        h.make_node("Transpose", ["attn"], ["attn_t"], perm=[0, 2, 1, 3]),
        h.make_node("Reshape", ["attn_t", "shape_o"], ["attn2"]), h.make_node("MatMul", ["attn2", "wo"], ["y"], name="o_proj")]
    vi = h.make_tensor_value_info
    inputs = [vi("x", dtype, [B, S, HID]), vi("position_ids", TP.INT64, [B, S]), vi("attention_mask", TP.INT64, [B, T]),
              vi("past_key_values.0.key", dtype, [B, HKV, P, d]), vi("past_key_values.0.value", dtype, [B, HKV, P, d])]
    outputs = [vi("y", dtype, [B, S, HID]), vi("present.0.key", dtype, [B, HKV, T, d]),
               vi("present.0.value", dtype, [B, HKV, T, d])]
    model = h.make_model(h.make_graph(nodes, "block", inputs, outputs, initializer=inits),
                         opset_imports=[h.make_opsetid("", opset), h.make_opsetid(L, 1)],
                         functions=llmtrt_functions(opset) if functions else [])
    model.ir_version = 10
    h.set_model_props(model, {"max_position_embeddings": str(MAXPOS)})
    return model


def single_node(op_type: str, with_function: bool, dtype: int = TP.FLOAT) -> onnx.ModelProto:
    """x -> llmtrt::<op_type> -> y; the function (if any) is Relu."""
    funcs = [h.make_function("llmtrt", op_type, ["X"], ["Y"], [h.make_node("Relu", ["X"], ["Y"])],
                             [h.make_opsetid("", 23)])] if with_function else []
    node = h.make_node(op_type, ["x"], ["y"], domain="llmtrt", name=f"{op_type.lower()}0")
    g = h.make_graph([node], "g", [h.make_tensor_value_info("x", dtype, [B, S, HID])],
                     [h.make_tensor_value_info("y", dtype, [B, S, HID])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 23), h.make_opsetid("llmtrt", 1)], functions=funcs)
    m.ir_version = 10
    return m


def feeds(npdt=np.float32, b=2, s=3, p=4, d=D) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    mask = np.ones((b, p + s), np.int64)
    mask[0, :2] = 0
    return {"x": rng.standard_normal((b, s, HID)).astype(npdt),
            "position_ids": np.tile(np.arange(p, p + s), (b, 1)).astype(np.int64), "attention_mask": mask,
            "past_key_values.0.key": rng.standard_normal((b, HKV, p, d)).astype(npdt),
            "past_key_values.0.value": rng.standard_normal((b, HKV, p, d)).astype(npdt)}


def ort_run(model: onnx.ModelProto, inputs: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, inputs)


def save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, str(path))
    return str(path)


# ---------------------------------------------------------------------------------------------
# profiles (no TensorRT needed)
# ---------------------------------------------------------------------------------------------
def test_profile_shapes_follow_graph_dims():
    dims = graph_input_dims(decoder_block())
    prefill, decode = (profile_shapes(p, dims) for p in PROFILES)
    assert prefill["past_key_values.0.key"] == ((1, HKV, 0, D), (2, HKV, 0, D), (2, HKV, 0, D))
    assert prefill["attention_mask"] == ((1, 1), (2, 16), (2, 16))
    assert decode["x"] == ((1, 1, HID), (2, 1, HID), (2, 1, HID))
    assert decode["attention_mask"] == ((1, 2), (2, 25), (2, 49))  # total = past + seq


@pytest.mark.parametrize("profile, match", [
    (Profile("p", Range(1, 4, 2), Range(1, 1, 1), Range(0, 0, 0)), "min <= opt <= max"),
    (Profile("p", Range(0, 1, 1), Range(1, 1, 1), Range(0, 0, 0)), "batch min must be >= 1"),
    (decode_profile(1, MAXPOS), "exceeds the model's max_position_embeddings"),
])
def test_profile_validation(profile, match):
    with pytest.raises(LlmtrtUserError, match=match):
        validate_profiles([profile], MAXPOS)


def test_profile_unknown_dynamic_dim():
    with pytest.raises(LlmtrtUserError, match="no profile range covers"):
        profile_shapes(PROFILES[0], {"x": ("batch", "mystery")})


STATIC_DIMS = {"x": (B, S, HID), "attention_mask": (B, "max_cache_length"), "write_indices": (B,),
               "past_key_values.0.key": (B, HKV, "max_cache_length", D)}


def test_static_profiles_fix_the_cache_length():
    prefill, decode = (profile_shapes(p, STATIC_DIMS) for p in static_profiles(2, 16, 32))
    assert prefill["past_key_values.0.key"] == ((1, HKV, 32, D), (2, HKV, 32, D), (2, HKV, 32, D))
    assert prefill["x"] == ((1, 1, HID), (2, 16, HID), (2, 16, HID))
    assert decode["attention_mask"] == ((1, 32), (2, 32), (2, 32)) and decode["write_indices"] == ((1,), (2,), (2,))
    assert static_profiles(1, 4, 8)[1].to_dict() == {
        "name": "decode", "kv_cache": "static", "batch": {"min": 1, "opt": 1, "max": 1},
        "seq": {"min": 1, "opt": 1, "max": 1}, "max_cache_length": 8}


@pytest.mark.parametrize("profiles, match", [
    (static_profiles(1, 40, 32), r"seq max \(40\) exceeds max_cache_length \(32\)"),
    (static_profiles(1, 8, MAXPOS + 1), "exceeds the model's max positions"),
    ([static_profiles(1, 8, 32)[0], static_profiles(1, 8, 16)[1]], "every profile must use the same cache"),
    ([PROFILES[0], static_profiles(1, 8, 16)[1]], "every profile must use the same cache"),
])
def test_static_profile_validation(profiles, match):
    with pytest.raises(LlmtrtUserError, match=match):
        validate_profiles(profiles, MAXPOS)


def test_profile_layout_must_match_graph():
    with pytest.raises(LlmtrtUserError, match="belongs to a static cache"):
        profile_shapes(PROFILES[1], STATIC_DIMS)
    with pytest.raises(LlmtrtUserError, match="belongs to a growing cache"):
        profile_shapes(static_profiles(1, 4, 8)[0], graph_input_dims(decoder_block()))
    with pytest.raises(ValueError, match="exactly one of past"):
        Profile("p", Range(1, 1, 1), Range(1, 1, 1))


def test_profiles_from_yaml(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("prefill: {batch: [1, 1, 4], seq: {min: 1, opt: 8, max: 16}, past: 0}\n"
                    "decode: {batch: [1, 1, 4], seq: 1, past: [1, 8, 47]}\n")
    assert profiles_from_yaml(path) == [prefill_profile(4, 16, opt_batch=1, opt_prompt=8),
                                        decode_profile(4, 47, opt_batch=1, opt_past=8)]
    path.write_text("max_cache_length: 32\nprefill: {batch: 1, seq: [1, 8, 16]}\n")
    assert profiles_from_yaml(path, "static") == [Profile("prefill", Range(1, 1, 1), Range(1, 8, 16), cache=32)]
    for text, match in [("prefill: {batch: 1, seq: 1, past: 0, beam: 2}\n", r"p.yaml:1: prefill.beam: unknown key"),
                        ("prefill: {batch: 1, seq: 1}\n", "missing key past"),
                        ("prefill: {batch: [1, 2], seq: 1, past: 0}\n", r"p.yaml:1: batch: expected"),
                        ("prefill: {batch: 1, seq: [1, 8, 4], past: 0}\n", r"p.yaml:1: seq must satisfy min <= opt"),
                        ("prefill: [", "invalid YAML")]:
        path.write_text(text)
        with pytest.raises(LlmtrtUserError, match=match):
            profiles_from_yaml(path)
    path.write_text("prefill: {batch: 1, seq: [1, 8, 16]}\n")
    with pytest.raises(LlmtrtUserError, match="set max_cache_length"):
        profiles_from_yaml(path, "static")


def test_pin_dims_fixes_the_static_cache_axis():
    model = lowering.lower(decoder_block(), "inline", dims={"past_sequence_length": 24})
    dims = graph_input_dims(model)
    assert dims["past_key_values.0.key"] == (B, HKV, 24, D) and dims["attention_mask"] == (B, T)


@pytest.mark.parametrize("precision", ["int8-sq", "int4-awq"])
def test_precision_names_with_a_method_are_checked_by_family(precision):
    with pytest.raises(LlmtrtUserError, match="QuantizeLinear"):
        build.check_precision(decoder_block(), precision)


# ---------------------------------------------------------------------------------------------
# lowering (ONNX Runtime checks the rewrites keep the function semantics)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opset", [18, 23])
def test_lowerings_match_function_bodies(opset):
    model = decoder_block(opset=opset)
    ref = ort_run(model, feeds())
    inlined = lowering.lower(model, "inline")
    native = lowering.lower(model, "native", decomposable=False)  # ORT rejects the TRT-only attribute
    assert not inlined.functions and not lowering.custom_nodes(inlined)
    assert {n.op_type for n in native.graph.node} >= {"RMSNormalization", "RotaryEmbedding", "Attention"}
    assert [(o.domain, o.version) for o in native.opset_import] == [("", 23)]
    for got in (ort_run(inlined, feeds()), ort_run(native, feeds())):
        for a, b in zip(ref, got, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_native_lowering_falls_back_to_inline_per_op():
    lowered = lowering.lower(decoder_block(), "native", supported=lambda op: op != "Attention")
    ops = {n.op_type for n in lowered.graph.node}
    assert {"RMSNormalization", "RotaryEmbedding", "Softmax"} <= ops and "Attention" not in ops
    assert next(n for n in lowered.graph.node if n.op_type == "Softmax")  # GQA body inlined


def test_native_attention_is_decomposable_by_default():
    attn = next(n for n in lowering.lower(decoder_block(), "native").graph.node if n.op_type == "Attention")
    assert {a.name: h.get_attribute_value(a) for a in attn.attribute}["TRT_decomposable"] == 1


def test_plugin_lowering_keeps_custom_nodes_and_unknown_mode_errors():
    assert len(lowering.custom_nodes(lowering.lower(decoder_block(), "plugin"))) == 4
    with pytest.raises(LlmtrtUserError, match="unknown --lower"):
        lowering.lower(decoder_block(), "magic")


# ---------------------------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------------------------
def test_missing_backend_says_what_to_install(monkeypatch):
    monkeypatch.setattr(backends, "_try_import", lambda name: None)
    with pytest.raises(LlmtrtUserError, match=r"pip install 'llmtrt\[rtx\]'"):
        backends.get_backend("tensorrt-rtx")
    with pytest.raises(LlmtrtUserError, match=r"llmtrt\[tensorrt\]'.*llmtrt\[rtx\]'"):
        backends.detect_backend()


@pytest.mark.skipif(HAS_TRT, reason="detect prefers full TensorRT when it is installed")
@rtx
def test_detect_picks_rtx_without_tensorrt():
    backend = backends.detect_backend()
    assert backend.name == "tensorrt-rtx" and backend.supports_target_cc
    assert all(backend.native_ops().values())


@rtx
def test_target_cc_names():
    trt = backends.get_backend("tensorrt-rtx").module()
    assert [backends.normalize_cc(c, trt) for c in ("8.9", "sm_120", 86)] == ["SM89", "SM120", "SM86"]
    with pytest.raises(LlmtrtUserError, match="does not build for SM90"):
        backends.normalize_cc("9.0", trt)


@trt_only
def test_tensorrt_network_is_strongly_typed_and_has_no_target_cc():
    backend = backends.get_backend("tensorrt")
    trt = backend.module()
    builder = trt.Builder(backend.logger())
    network = backend.create_network(builder)
    assert network.get_flag(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    with pytest.raises(LlmtrtUserError, match="--target-cc needs TensorRT-RTX"):
        backend.set_target_cc(builder.create_builder_config(), ["8.9"])


# ---------------------------------------------------------------------------------------------
# builds (TensorRT-RTX, CPU ahead-of-time)
# ---------------------------------------------------------------------------------------------
@rtx
@pytest.mark.parametrize("precision, dtype, mode", [
    ("fp32", TP.FLOAT, "native"), ("fp16", TP.FLOAT16, "native"), ("fp32", TP.FLOAT, "inline")])
def test_build_writes_plan_and_manifest(tmp_path, precision, dtype, mode):
    onnx_path = save(lowering.lower(decoder_block(dtype), mode), tmp_path / "model.onnx")
    result = build.build_engine(onnx_path, tmp_path / "eng", precision=precision, backend="tensorrt-rtx",
                                target_cc=["8.9", "12.0"], profiles=PROFILES, opt_level=2, workspace_mb=256)
    plan, mf = result.plan_path, json.loads(result.manifest_path.read_text())
    assert plan.name == f"engine.{precision}.plan" and result.manifest_path.name == f"engine.{precision}.json"
    assert mf["plan_sha256"] == hashlib.sha256(plan.read_bytes()).hexdigest()
    assert mf["onnx_sha256"] == onnx_sha256(tmp_path / "model.onnx")
    assert mf["backend"]["name"] == "tensorrt-rtx" and mf["backend"]["version"].startswith("1.")
    assert mf["target_compute_capabilities"] == ["SM89", "SM120"]
    # TensorRT-RTX stores weights per optimization profile: prefill and decode share one (their union)
    [profile] = mf["profiles"]
    assert profile["name"] == "prefill+decode" and [p["name"] for p in profile["covers"]] == ["prefill", "decode"]
    assert profile["shapes"]["attention_mask"] == {"min": [1, 1], "opt": [2, 25], "max": [2, 49]}
    assert profile["shapes"]["past_key_values.0.key"] == {"min": [1, HKV, 0, D], "opt": [2, HKV, 24, D],
                                                          "max": [2, HKV, 48, D]}
    assert mf["builder"]["profiles_merged"] and mf["builder"]["plan_streamed"]
    assert mf["weights"]["bytes"] > 0 and mf["refit"] == {"required": False} and not mf["weights"]["stripped"]
    assert mf["stats"]["build_seconds"] > 0 and mf["stats"]["peak_rss_bytes"] > 0
    assert mf["network"]["num_layers"] == len(mf["network"]["layers"]) > 0
    types = {layer["type"] for layer in mf["network"]["layers"]}
    if mode == "native":
        assert {"ROTARY_EMBEDDING", "ATTENTION_INPUT"} <= types
    assert ("HALF" in mf["network"]["precisions"]) == (precision == "fp16")
    assert not [p for p in os.listdir(plan.parent) if p.endswith(".partial")]


@rtx
def test_custom_nodes_without_lowering_are_refused(tmp_path):
    with pytest.raises(build.UnsupportedNodesError) as info:
        build.build_engine(save(decoder_block(), tmp_path / "m.onnx"), tmp_path, precision="fp32",
                           backend="tensorrt-rtx", profiles=PROFILES)
    assert {f.node for f in info.value.failures} == {"rope_q", "rope_k", "gqa"}  # RMSNorm has no clash
    assert "--lower native" in str(info.value) and not list(tmp_path.glob("*.plan"))


@rtx
def test_function_node_without_builtin_importer_is_inlined_by_parser(tmp_path):
    result = build.build_engine(save(single_node("RMSNorm", True), tmp_path / "m.onnx"), tmp_path, precision="fp32",
                                backend="tensorrt-rtx", profiles=PROFILES[:1])
    assert [layer["type"] for layer in result.manifest["network"]["layers"]] == ["ACTIVATION"]


@rtx
def test_unsupported_node_error_lists_every_node(tmp_path):
    model = single_node("Frobnicate", False)
    model.graph.node.append(h.make_node("Zork", ["y"], ["z"], domain="llmtrt", name="zork0"))
    model.graph.output[0].name = "z"
    with pytest.raises(build.UnsupportedNodesError) as info:
        build.build_engine(save(model, tmp_path / "m.onnx"), tmp_path, precision="fp32", backend="tensorrt-rtx",
                           profiles=PROFILES[:1])
    assert [(f.node, f.op_type) for f in info.value.failures] == [("frobnicate0", "Frobnicate"), ("zork0", "Zork")]
    assert "Plugin not found" in info.value.failures[0].message
    assert "--lower" in str(info.value)


@rtx
def test_fp32_attention_without_decomposable_reports_build_error(tmp_path):
    onnx_path = save(lowering.lower(decoder_block(), "native", decomposable=False), tmp_path / "m.onnx")
    with pytest.raises(LlmtrtUserError, match="not supported by a dedicated kernel") as info:
        build.build_engine(onnx_path, tmp_path, precision="fp32", backend="tensorrt-rtx", profiles=PROFILES)
    assert "--lower" in str(info.value)


@rtx
@pytest.mark.parametrize("precision, dtype, match", [
    ("fp16", TP.FLOAT, "no fp16 tensors"), ("fp32", TP.FLOAT16, "weights are fp16"), ("int8", TP.FLOAT, "QuantizeLinear")])
def test_precision_must_match_graph(tmp_path, precision, dtype, match):
    onnx_path = save(lowering.lower(decoder_block(dtype), "native"), tmp_path / "m.onnx")
    with pytest.raises(LlmtrtUserError, match=match):
        build.build_engine(onnx_path, tmp_path, precision=precision, backend="tensorrt-rtx", profiles=PROFILES)
    assert not list(tmp_path.glob("engine.*"))


@rtx
def test_profiles_checked_against_model_max_positions(tmp_path):
    onnx_path = save(lowering.lower(decoder_block(), "native"), tmp_path / "m.onnx")
    with pytest.raises(LlmtrtUserError, match="max_position_embeddings"):
        build.build_engine(onnx_path, tmp_path, precision="fp32", backend="tensorrt-rtx",
                           profiles=[decode_profile(1, MAXPOS)])


@rtx
def test_interrupted_write_leaves_no_valid_looking_plan(tmp_path, monkeypatch):
    onnx_path = save(lowering.lower(decoder_block(), "native"), tmp_path / "m.onnx")
    out = tmp_path / "eng"
    first = build.build_engine(onnx_path, out, precision="fp32", backend="tensorrt-rtx", profiles=PROFILES,
                               timing_cache=tmp_path / "cache.bin")
    assert first.manifest["builder"]["timing_cache"].startswith("ignored")
    real_replace = os.replace

    def killed(src, dst):
        if str(dst).endswith(".plan"):
            raise KeyboardInterrupt  # the process dies while the new plan is being moved in
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        build.build_engine(onnx_path, out, precision="fp32", backend="tensorrt-rtx", profiles=PROFILES)
    assert not first.manifest_path.exists()  # the old plan is no longer vouched for
    assert sorted(os.listdir(out)) == ["engine.fp32.plan"]  # no temp files left behind


@rtx
def test_python_plugins_are_refused_on_rtx(tmp_path):
    trt = backends.get_backend("tensorrt-rtx").module()

    class Creator(trt.IPluginCreatorV3One):
        def __init__(self):
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_namespace, self.plugin_version = "LlmtrtTestPlug", "", "1"
            self.field_names = trt.PluginFieldCollection([])

        def create_plugin(self, name, fc, phase):  # pragma: no cover - would abort the process
            raise AssertionError("the parser must never reach the plugin")

    registry = trt.get_plugin_registry()
    creator = Creator()
    assert registry.register_creator(creator, "")
    try:
        with pytest.raises(LlmtrtUserError, match="aborts the process"):
            build.build_engine(save(single_node("LlmtrtTestPlug", False), tmp_path / "m.onnx"), tmp_path,
                               precision="fp32", backend="tensorrt-rtx", profiles=PROFILES[:1])
    finally:
        registry.deregister_creator(creator)


@rtx
def test_preflight_turns_an_abort_into_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(plugin_setup, "_PREFLIGHT", "import os; os.abort()")
    with pytest.raises(LlmtrtUserError, match="aborted while importing plugin nodes"):
        plugin_setup.preflight_parse(backends.get_backend("tensorrt-rtx"), tmp_path / "m.onnx", [], True)


@rtx
def test_lowered_file_keeps_external_weights_reachable(tmp_path):
    src = tmp_path / "export" / "model.onnx"
    src.parent.mkdir()
    onnx.save(decoder_block(), str(src), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    dst = lowering.lower_file(src, tmp_path / "lowered" / "model.native.onnx", "native")
    locations = {e.value for t in onnx.load(str(dst), load_external_data=False).graph.initializer
                 for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}  # TensorRT refuses '../' in external-data paths
    result = build.build_engine(dst, tmp_path / "eng", precision="fp32", backend="tensorrt-rtx", profiles=PROFILES)
    assert result.plan_path.stat().st_size == result.manifest["plan_bytes"]
    assert result.manifest["onnx_sha256"] != hashlib.sha256(dst.read_bytes()).hexdigest()  # weights hashed too


def test_plan_writer_hashes_every_chunk_it_writes(tmp_path):
    """The plan writer hashes large chunks on a thread while it writes them, small ones inline: the
    file and the sha256 must both be the chunks in order, whichever path each took. Each chunk's
    buffer is overwritten once ``write`` returns, as TensorRT reuses it, and the hash is slow, so a
    writer that returned before its hash thread had read the chunk would hash the overwritten bytes."""
    from llmtrt.pipelines.engine import network

    class FakeTrt:
        class IStreamWriter:
            def __init__(self) -> None:
                pass

    rng = np.random.default_rng(0)
    sizes = [10, network.OVERLAP_HASH_BYTES + 3, 1, 3 * network.OVERLAP_HASH_BYTES, network.OVERLAP_HASH_BYTES - 1]
    chunks = [rng.bytes(n) for n in sizes]
    class SlowSha:
        def __init__(self) -> None:
            self.sha = hashlib.sha256()

        def update(self, data) -> None:
            time.sleep(0.02)
            self.sha.update(data)

    sha = SlowSha()
    with open(tmp_path / "plan", "wb") as out:
        writer = network._stream_writer(FakeTrt, out, sha)
        for chunk in chunks:
            buffer = bytearray(chunk)
            assert writer.write(buffer) == len(chunk)
            buffer[:] = bytes(len(chunk))
    whole = b"".join(chunks)
    assert writer.written == len(whole)
    assert (tmp_path / "plan").read_bytes() == whole
    assert sha.sha.hexdigest() == hashlib.sha256(whole).hexdigest()
