"""What a build does to files without TensorRT: reading a graph without its inline weights, hashing
each weights file once, fusing GEMMs that share an input, mapping weights for the parser."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from llmtrt.exporter import onnx_layout
from llmtrt.pipelines.artifacts import onnx_sha256
from llmtrt.pipelines.engine.digests import Cancelled, Digests
from llmtrt.pipelines.engine.fuse_gemms import fuse_shared_input_gemms
from llmtrt.pipelines.engine.lowering import lower_for_build
from llmtrt.pipelines.engine.mapped_weights import MappedWeights
from llmtrt.pipelines.engine.profiles import max_positions_from_file
from llmtrt.pipelines.errors import LlmtrtUserError

IN, OUTS = 64, (64, 16, 16)


def _ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def qkv_graph(kind: str = "fp32", opset: int = 21) -> onnx.ModelProto:
    """x -> three MatMuls sharing x (q/k/v-like, widths OUTS) -> outputs; weights plain, int8 per
    output channel, or int4 blocked along the input axis, as ``llmtrt quantize`` writes them."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    for i, out in enumerate(OUTS):
        w = f"layer.{'qkv'[i]}_proj.weight_t"
        if kind == "fp32":
            inits.append(nh.from_array(rng.standard_normal((IN, out)).astype(np.float32), w))
            b = w
        else:
            if kind == "int8":
                q = nh.from_array(rng.integers(-127, 128, (IN, out)).astype(np.int8), f"{w}.int8")
                scale, attrs = rng.random(out).astype(np.float32) * 0.01, {"axis": 1}
            else:
                values = rng.integers(-8, 8, IN * out).astype(np.int8)
                packed = ((values[0::2].astype(np.uint8) & 0xF) | ((values[1::2].astype(np.uint8) & 0xF) << 4))
                q = h.make_tensor(f"{w}.int4", TP.INT4, [IN, out], packed.tobytes(), raw=True)
                scale, attrs = rng.random((IN // 16, out)).astype(np.float32) * 0.1, {"axis": 0, "block_size": 16}
            inits += [q, nh.from_array(scale, f"{w}.scale")]
            b = f"{w}.dequantized"
            nodes.append(h.make_node("DequantizeLinear", [q.name, f"{w}.scale"], [b], name=f"dq{i}", **attrs))
        nodes.append(h.make_node("MatMul", ["x", b], [f"y{i}"], name=f"mm{i}"))
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TP.FLOAT, ["b", "s", IN])],
                         [h.make_tensor_value_info(f"y{i}", TP.FLOAT, ["b", "s", o]) for i, o in enumerate(OUTS)],
                         initializer=inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def save_external(model: onnx.ModelProto, path) -> None:
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)


# ---------------------------------------------------------------------------------------------
# GEMM fusion
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fp32", "int8", "int4"])
def test_fused_gemms_compute_what_the_separate_ones_did(tmp_path, kind):
    src = qkv_graph(kind)
    save_external(qkv_graph(kind), tmp_path / "m.onnx")
    model = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    report = fuse_shared_input_gemms(model, tmp_path, tmp_path / "fused.data")
    assert report.groups == [["y0", "y1", "y2"]]
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMul") == 1 and "Split" in ops and ops.count("DequantizeLinear") == (kind != "fp32")
    fused = next(t for t in model.graph.initializer if t.name.startswith("layer.{q,k,v}_proj.weight_t"))
    assert list(fused.dims) == [IN, sum(OUTS)]
    assert (tmp_path / "fused.data").stat().st_size == report.bytes > 0
    from onnx.external_data_helper import load_external_data_for_model

    load_external_data_for_model(model, str(tmp_path))
    x = {"x": np.random.default_rng(1).standard_normal((2, 3, IN)).astype(np.float32)}
    for want, got in zip(_ort(src, x), _ort(model, x), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_gemms_that_differ_are_not_fused(tmp_path):
    model = qkv_graph("fp32")
    model.graph.node[1].input[0] = "x2"  # k_proj reads another tensor
    model.graph.input.append(h.make_tensor_value_info("x2", TP.FLOAT, ["b", "s", IN]))
    report = fuse_shared_input_gemms(model, tmp_path, tmp_path / "fused.data")
    assert report.groups == [["y0", "y2"]]
    too_old = qkv_graph("fp32", opset=11)  # Split takes sizes as an input only from opset 13
    assert fuse_shared_input_gemms(too_old, tmp_path, tmp_path / "old.data").groups == []


def test_lowering_for_a_build_references_inline_weights_in_place(tmp_path, monkeypatch):
    """An export with its weights inline: the lowered graph points at their bytes in the export's
    own file (hard-linked), nothing is copied except the fused GEMM weights."""
    monkeypatch.setattr(onnx_layout, "SMALL_FILE", 0)  # treat the small test file like a large one
    src_dir, out = tmp_path / "export", tmp_path / "engine"
    src_dir.mkdir()
    model = qkv_graph("fp32")
    model.graph.initializer.append(nh.from_array(np.arange(4096, dtype=np.float32), "unused.table"))
    h.set_model_props(model, {"max_position_embeddings": "77"})
    onnx.save(model, str(src_dir / "model.onnx"))
    weightless = onnx_layout.weightless_model(src_dir / "model.onnx")
    assert not any(t.raw_data for t in weightless.graph.initializer if t.name == "unused.table")
    assert max_positions_from_file(src_dir / "model.onnx") == 77
    done = lower_for_build(src_dir / "model.onnx", out / "model.native.onnx", "native", model=weightless)
    assert done.fused_groups == 1 and sorted(os.listdir(out)) == ["model.native.onnx", "model.native.onnx.data",
                                                                   "model.onnx"]
    assert os.path.samefile(out / "model.onnx", src_dir / "model.onnx")  # a link, not a copy
    assert (out / "model.native.onnx").stat().st_size < 4096
    lowered = onnx.load(str(out / "model.native.onnx"), load_external_data=False)
    ext = {e.key: e.value for t in lowered.graph.initializer if t.name == "unused.table" for e in t.external_data}
    assert ext["location"] == "model.onnx"  # onnx's own loader refuses hard-linked data files; TensorRT reads them
    with open(out / "model.onnx", "rb") as f:
        f.seek(int(ext["offset"]))
        data = f.read(int(ext["length"]))
    np.testing.assert_array_equal(np.frombuffer(data, np.float32), np.arange(4096, dtype=np.float32))


def test_a_truncated_file_is_not_an_onnx_layout(tmp_path):
    path = tmp_path / "cut.onnx"
    path.write_bytes(qkv_graph().SerializeToString()[:100])
    with pytest.raises(ValueError, match="truncated|wire type"):
        onnx_layout.scan(path)


# ---------------------------------------------------------------------------------------------
# hashing
# ---------------------------------------------------------------------------------------------
def test_digests_equal_onnx_sha256_and_read_a_shared_weights_file_once(tmp_path, monkeypatch):
    save_external(qkv_graph(), tmp_path / "m.onnx")
    os.link(tmp_path / "m.onnx.data", tmp_path / "linked.data")
    other = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    for t in other.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "linked.data"
    onnx.save(other, str(tmp_path / "other.onnx"))
    digests, reads = Digests(), []
    real = Digests._sha256
    monkeypatch.setattr(Digests, "_sha256", lambda self, path: reads.append(path.name) or real(self, path))
    assert digests.later(tmp_path / "m.onnx").result() == onnx_sha256(tmp_path / "m.onnx")
    assert digests.onnx(tmp_path / "other.onnx") == onnx_sha256(tmp_path / "other.onnx")
    assert sorted(reads) == ["m.onnx", "m.onnx.data", "other.onnx"]  # the hard link was not read again


def test_cancelled_hashing_stops(tmp_path):
    (tmp_path / "big.bin").write_bytes(b"\0" * (3 << 22))
    digests = Digests()
    digests.cancel()
    with pytest.raises(Cancelled):
        digests.file(tmp_path / "big.bin")


# ---------------------------------------------------------------------------------------------
# mapped weights
# ---------------------------------------------------------------------------------------------
def test_mapped_weights_point_at_the_file_bytes_and_survive_trimming(tmp_path):
    import ctypes

    save_external(qkv_graph(), tmp_path / "m.onnx")
    model = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    weights = MappedWeights(model, tmp_path)
    try:
        assert len(weights.entries) == 3 and weights.bytes == 4 * IN * sum(OUTS)
        name, address, length = weights.entries[0]
        want = nh.to_array(onnx.load(str(tmp_path / "m.onnx")).graph.initializer[0]).tobytes()
        with weights.trimmed(interval=0.001):
            weights.trim()
            assert ctypes.string_at(address, length) == want  # dropped pages fault back in, same bytes
    finally:
        weights.close()


def test_initializer_without_data_is_a_user_error(tmp_path):
    model = qkv_graph()
    for t in model.graph.initializer:
        t.ClearField("raw_data")
    with pytest.raises(LlmtrtUserError, match="holds no data"):
        fuse_shared_input_gemms(model, tmp_path, tmp_path / "fused.data")
