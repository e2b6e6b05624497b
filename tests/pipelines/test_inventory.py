"""The precision inventory reads what the written graph computes in, and catches graphs that only
claim a precision: each check here first fails on a graph built to be wrong."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from llmtrt.pipelines.precision.inventory import KEPT_METADATA, Inventory, inventory


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    from llmtrt.exporter.config import resolve_model
    from llmtrt.pipelines.artifacts import export_artifact

    out = tmp_path_factory.mktemp("inv") / "fp32"
    export_artifact(resolve_model("bytes-llama"), out)
    return out


def _fp16_storage_fp32_compute(model: onnx.ModelProto) -> onnx.ModelProto:
    """The old bug: weights stored fp16 but cast back to fp32, every MatMul computing in fp32."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    nodes = []
    for n in g.node:
        if n.op_type == "MatMul" and n.input[1] in inits:
            t = inits[n.input[1]]
            half = numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name + ".fp16")
            g.initializer.append(half)
            nodes.append(helper.make_node("Cast", [half.name], [t.name + ".back"], to=TensorProto.FLOAT))
            n.input[1] = t.name + ".back"
        nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    return model


def test_fp32_export_and_a_fake_fp16_graph(export_dir):
    model = onnx.load(str(export_dir / "model.onnx"))
    inv = inventory(model)
    assert len(inv.linears) == 17 and inv.shares()["flops"] == {"fp32": 1.0}
    assert inv.contradicts("fp32") is None
    assert "only 0.0% of linear-layer FLOPs are fp16" in inv.contradicts("fp16")
    head = [x for x in inv.linears if x.role == "lm_head"]
    assert len(head) == 1 and head[0].module == "lm_head" and head[0].weight["initializer"] == "lm_head.weight"
    assert {a.softmax for a in inv.attention} == {"fp32"} and {n.reduction for n in inv.norms} == {"fp32"}

    fake = inventory(_fp16_storage_fp32_compute(model))
    assert fake.shares()["flops"] == {"fp32": 1.0}  # fp16 storage does not make an fp16 MatMul
    assert all(x.weight["storage"] == "fp16" and x.weight["scheme"] == "cast to fp32" for x in fake.linears
               if x.role == "linear")
    assert fake.contradicts("fp16") is not None


def test_the_manifest_of_an_export_carries_the_inventory(export_dir):
    from llmtrt.pipelines.artifacts import read_manifest

    recorded = Inventory.from_dict(read_manifest(export_dir)["precision_inventory"])
    assert recorded == inventory(onnx.load(str(export_dir / "model.onnx"), load_external_data=False))
    assert recorded.shares()["flops"] == {"fp32": 1.0}


def test_quantized_schemes_and_kept_linears():
    """A two-linear graph: one int4 blocked (DequantizeLinear), one int8 W8A8, one fp16 linear."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])
    inits = [
        helper.make_tensor("a.weight_t.int4", TensorProto.INT4, [8, 8], b"\x11" * 32, raw=True),
        numpy_helper.from_array(np.ones((2, 8), np.float32), "a.weight_t.scale"),
        numpy_helper.from_array(np.ones((8, 8), np.int8), "b.weight_t.int8"),
        numpy_helper.from_array(np.ones(8, np.float32), "b.weight_t.scale"),
        numpy_helper.from_array(np.array(0.1, np.float32), "b.input.scale"),
        numpy_helper.from_array(np.array(0, np.int8), "b.input.zero_point"),
        numpy_helper.from_array(np.ones((8, 4), np.float16), "lm_head.weight_t"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["a.weight_t.int4", "a.weight_t.scale"], ["wa"], axis=0, block_size=4),
        helper.make_node("MatMul", ["x", "wa"], ["ha"], name="/a/MatMul"),
        helper.make_node("QuantizeLinear", ["ha", "b.input.scale", "b.input.zero_point"], ["hq"]),
        helper.make_node("DequantizeLinear", ["hq", "b.input.scale", "b.input.zero_point"], ["hd"]),
        helper.make_node("DequantizeLinear", ["b.weight_t.int8", "b.weight_t.scale"], ["wb"], axis=1),
        helper.make_node("MatMul", ["hd", "wb"], ["hb"], name="/b/MatMul"),
        helper.make_node("Cast", ["hb"], ["h16"], to=TensorProto.FLOAT16),
        helper.make_node("MatMul", ["h16", "lm_head.weight_t"], ["l16"], name="/lm_head/MatMul"),
        helper.make_node("Cast", ["l16"], ["logits"], to=TensorProto.FLOAT),
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 21)])
    inv = inventory(model)
    a, b, head = (inv.linear(m) for m in ("a", "b", "lm_head"))
    assert (a.precision, a.weight["block_size"], a.weight["bits"], a.activation) == ("int4", 4, 4, "fp32")
    assert (b.precision, b.activation, b.weight["axis"]) == ("int8", "int8 per-tensor", 1)
    assert (head.precision, head.role, head.output) == ("fp16", "lm_head", "fp16")
    assert a.weight_bytes == 32 + 2 * 8 * 4 and head.weight_bytes == 8 * 4 * 2
    assert inv.contradicts("int4") is not None  # 1/3 of the FLOPs are int4
    model.metadata_props.add(key=KEPT_METADATA, value=json.dumps({"b": "kept", "lm_head": "kept"}))
    kept = inventory(model)
    assert kept.contradicts("int4") is None and kept.linear("b").kept == "kept"
    assert "kept: lm_head (kept)" in kept.summary()
    with pytest.raises(ValueError, match="unknown precision"):
        inv.contradicts("int3")


def test_build_refuses_an_fp16_label_on_fp32_arithmetic(export_dir):
    """The old false verdict: fp16 weights cast back to fp32 before every MatMul hold fp16 tensors, so a
    check of 'is there fp16 in the graph' passes; build's --precision check reads the inventory and refuses."""
    from llmtrt.pipelines.engine.precision_check import check_precision
    from llmtrt.pipelines.errors import LlmtrtUserError

    fake = _fp16_storage_fp32_compute(onnx.load(str(export_dir / "model.onnx")))
    with pytest.raises(LlmtrtUserError, match=r"--precision fp16: the graph is not what it says: only 0\.0%"):
        check_precision(fake, "fp16")
    check_precision(onnx.load(str(export_dir / "model.onnx")), "fp32")
