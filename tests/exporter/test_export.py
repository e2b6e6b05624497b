"""Exported graphs run in ONNX Runtime (CPU) and match the PyTorch model, in every dialect."""

import json
from collections import Counter

import numpy as np
import onnx
import pytest

from llmtrt.exporter.config import resolve_model
from llmtrt.exporter.errors import LlmtrtUserError
from llmtrt.exporter.onnx_export import ExportOptions, export, export_model
from llmtrt.exporter.weights import load_model
from llmtrt.pipelines.artifacts import export_artifact, load_exported, write_export_manifest
from llmtrt.pipelines.runtime.decoding import Batch
from tests.conftest import run_ort, run_torch

TOL = 1e-4
DIALECTS = ("custom", "standard", "decomposed")


@pytest.fixture(scope="module")
def tiny_model():
    return load_model(resolve_model("tiny"))


@pytest.fixture(scope="module", params=DIALECTS)
def exported(request, tmp_path_factory, tiny_model):
    out = tmp_path_factory.mktemp(request.param)
    return export_model(tiny_model, out, ExportOptions(dialect=request.param))


@pytest.mark.parametrize("prompts", [[[7, 8, 9, 10, 11]], [[5, 9, 11, 3, 7, 2], [17, 4], [1, 2, 3, 4]]],
                         ids=["batch1", "batch3_left_padded"])
def test_onnxruntime_matches_pytorch(exported, tiny_model, prompts):
    cfg = tiny_model.config
    batch = Batch.left_padded(prompts)
    n = len(prompts)
    decode = np.arange(4 * n, dtype=np.int64).reshape(n, 4) % cfg.vocab_size + 30
    ref = run_torch(tiny_model, batch, decode, 4)
    got = run_ort(exported.onnx_path, cfg, batch, decode, 4)
    valid = batch.attention_mask.astype(bool)
    assert np.abs(got.logits[0] - ref.logits[0])[valid].max() <= TOL
    for a, b in zip(got.logits[1:], ref.logits[1:], strict=False):
        assert np.abs(a - b).max() <= TOL
    # Cache entries of padding tokens are don't-care (runtimes treat fully masked rows differently).
    keys = np.concatenate([valid, np.ones((n, 4), dtype=bool)], axis=1)
    for a, b in zip(got.present, ref.present, strict=False):
        assert a.shape == b.shape
        assert np.abs(a - b).transpose(0, 2, 1, 3)[keys].max() <= TOL


EXPECTED_OPS = {
    "custom": {("llmtrt", "RMSNorm"): 5, ("llmtrt", "RotaryEmbedding"): 2, ("llmtrt", "GroupQueryAttention"): 2},
    "standard": {("", "RMSNormalization"): 5, ("", "RotaryEmbedding"): 2, ("", "Attention"): 2},
    "decomposed": {("", "Softmax"): 2, ("", "ReduceMean"): 5},
}


def test_graph_io_ops_and_functions(exported):
    proto = onnx.load(str(exported.onnx_path))
    inputs = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in proto.graph.input}
    outputs = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in proto.graph.output}
    assert inputs["input_ids"] == ["batch", "sequence_length"]
    assert inputs["attention_mask"] == ["batch", "total_sequence_length"]
    assert inputs["past_key_values.1.value"] == ["batch", 2, "past_sequence_length", 16]
    assert outputs["logits"] == ["batch", "sequence_length", 256]
    assert outputs["present.0.key"] == ["batch", 2, "total_sequence_length", 16]
    ops = Counter((n.domain, n.op_type) for n in proto.graph.node)
    for op, count in EXPECTED_OPS[exported.dialect].items():
        assert ops[op] == count, (op, ops)
    domains = {n.domain for n in proto.graph.node}
    if exported.dialect == "custom":
        assert {f.name for f in proto.functions} == {"RMSNorm", "RotaryEmbedding", "GroupQueryAttention"}
    else:
        assert domains == {""} and not proto.functions
    opset = {o.domain: o.version for o in proto.opset_import}[""]
    assert opset == {"custom": 18, "standard": 23, "decomposed": 17}[exported.dialect]
    # Linear weights are named after their module, [in, out]; q/k/v and gate/up fused by default.
    weights = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    assert weights["model.layers.0.self_attn.qkv_proj.weight_t"] == (64, 64 + 2 * 32)
    assert weights["model.layers.1.mlp.gate_up_proj.weight_t"] == (64, 2 * 160)
    assert weights["model.layers.1.mlp.down_proj.weight_t"] == (160, 64)
    assert not any(name.endswith((".q_proj.weight_t", ".k_proj.weight_t", ".up_proj.weight_t")) for name in weights)
    matmuls = [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert matmuls == ["/model/layers/0/self_attn/qkv_proj/MatMul", "/model/layers/0/self_attn/o_proj/MatMul",
                       "/model/layers/0/mlp/gate_up_proj/MatMul", "/model/layers/0/mlp/down_proj/MatMul",
                       "/model/layers/1/self_attn/qkv_proj/MatMul", "/model/layers/1/self_attn/o_proj/MatMul",
                       "/model/layers/1/mlp/gate_up_proj/MatMul", "/model/layers/1/mlp/down_proj/MatMul",
                       "/lm_head/MatMul"]
    assert exported.fused["model.layers.1.self_attn.qkv_proj"] == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"]
    assert exported.fused["model.layers.0.mlp.gate_up_proj"] == ["model.layers.0.mlp.gate_proj",
                                                                 "model.layers.0.mlp.up_proj"]


def test_fused_weight_is_the_parts_concatenated(exported, tiny_model):
    """qkv_proj.weight_t = [Wq; Wk; Wv]^T and gate_up_proj.weight_t = [Wgate; Wup]^T, exactly; the caller's
    model keeps its checkpoint modules."""
    from onnx import numpy_helper

    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(exported.onnx_path)).graph.initializer}
    state = {k: v.detach().numpy() for k, v in tiny_model.state_dict().items()}
    for module, parts in exported.fused.items():
        want = np.concatenate([state[f"{part}.weight"] for part in parts], axis=0).T
        np.testing.assert_array_equal(weights[f"{module}.weight_t"], want)
    assert not tiny_model.fused and "model.layers.0.self_attn.q_proj.weight" in state


def test_unfused_export_keeps_the_checkpoint_modules(tmp_path, tiny_model):
    exp = export_model(tiny_model, tmp_path, ExportOptions(dialect="standard", fuse=False))
    names = {t.name for t in onnx.load(str(exp.onnx_path)).graph.initializer}
    assert {"model.layers.0.self_attn.q_proj.weight_t", "model.layers.0.mlp.up_proj.weight_t"} <= names
    assert not any("qkv_proj" in n or "gate_up_proj" in n for n in names) and exp.fused == {}
    batch = Batch.left_padded([[5, 9, 11, 3], [17, 4]])
    got, ref = run_ort(exp.onnx_path, tiny_model.config, batch, steps=2), run_torch(tiny_model, batch, steps=2)
    assert max(np.abs(a - b).max() for a, b in zip(got.logits[1:], ref.logits[1:], strict=True)) <= TOL


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
def test_last_logits_graph_returns_the_last_position(tmp_path, tiny_model, dialect, kv_cache):
    """--logits last: logits [batch, 1, vocab] equal to the model's last position, prefill and decode; the
    IO spec and the graph say so."""
    exp = export_model(tiny_model, tmp_path, ExportOptions(dialect=dialect, kv_cache=kv_cache, logits="last"))
    proto = onnx.load(str(exp.onnx_path))
    assert [d.dim_param or d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim] == ["batch", 1, 256]
    assert exp.io.outputs[0].dims == ("batch", 1, 256) and exp.logits == "last"
    batch = Batch.left_padded([[5, 9, 11, 3, 7, 2], [17, 4], [1, 2, 3, 4]])
    decode = np.array([[3, 1, 4], [5, 9, 2], [5, 3, 5]], dtype=np.int64)
    capacity = 16 if kv_cache == "static" else None
    got = run_ort(exp.onnx_path, tiny_model.config, batch, decode, 3, layout=kv_cache, capacity=capacity)
    ref = run_torch(tiny_model, batch, decode, 3)
    assert got.logits[0].shape == (3, 1, 256)
    assert np.abs(got.logits[0] - ref.logits[0][:, -1:]).max() <= TOL
    assert max(np.abs(a - b).max() for a, b in zip(got.logits[1:], ref.logits[1:], strict=True)) <= TOL


def test_manifest_round_trip(exported):
    from llmtrt.exporter.config import resolve_model

    path = write_export_manifest(exported, resolve_model("tiny"))
    raw = json.loads(path.read_text())
    assert raw["ops"] == exported.dialect and len(raw["onnx_sha256"]) == 64
    assert "torch" in raw["versions"] and "onnx" in raw["versions"]
    again = load_exported(path.parent)
    assert again.config == exported.config and again.io == exported.io
    assert raw["logits"] == "all" and raw["fused"] == exported.fused and again.fused == exported.fused


def test_external_data_round_trip(tmp_path, tiny_model):
    exp = export_model(tiny_model, tmp_path, ExportOptions(external_data=True))
    assert (tmp_path / "model.onnx.data").is_file()
    cfg = tiny_model.config
    batch = Batch.left_padded([[1, 2, 3]])
    got = run_ort(exp.onnx_path, cfg, batch)
    ref = run_torch(tiny_model, batch)
    assert np.abs(got.logits[0] - ref.logits[0]).max() <= TOL


def test_hf_checkpoint_export_matches(hf_checkpoint, tmp_path):
    ckpt = hf_checkpoint(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)
    source = resolve_model(str(ckpt))
    exp = export(source, tmp_path / "out")
    model = load_model(source)
    cfg = source.config
    batch = Batch.left_padded([[4, 5, 6, 7], [8, 9]])
    got = run_ort(exp.onnx_path, cfg, batch, steps=3)
    ref = run_torch(model, batch, steps=3)
    assert all(np.abs(a - b)[..., :].max() <= TOL for a, b in zip(got.logits[1:], ref.logits[1:], strict=False))


def test_bad_opset_and_unwritable_out(tmp_path, tiny_model):
    from llmtrt.exporter.config import resolve_model

    with pytest.raises(LlmtrtUserError, match="needs opset >= 23"):
        export_model(tiny_model, tmp_path, ExportOptions(dialect="standard", opset=18))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LlmtrtUserError, match="cannot create"):
        export_artifact(resolve_model("tiny"), blocker / "sub", ExportOptions())


def test_failed_export_leaves_the_previous_artifact(tmp_path, monkeypatch):
    """A crash while writing leaves --out exactly as it was: absent, then the previous complete export."""
    import llmtrt.exporter.onnx_export as onnx_export
    from llmtrt.exporter.config import resolve_model

    out = tmp_path / "out"

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash while saving")

    with monkeypatch.context() as m:
        m.setattr(onnx_export.onnx, "save_model", boom)
        with pytest.raises(RuntimeError):
            export_artifact(resolve_model("tiny"), out, ExportOptions())
    assert list(tmp_path.iterdir()) == []  # no --out, no partial sibling
    export_artifact(resolve_model("tiny"), out, ExportOptions())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with monkeypatch.context() as m:
        m.setattr(onnx_export.onnx, "save_model", boom)
        with pytest.raises(RuntimeError):
            export_artifact(resolve_model("tiny"), out, ExportOptions(dialect="standard"))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("dialect", DIALECTS)
def test_static_kv_cache_matches_growing_cache(tmp_path, tiny_model, dialect):
    """--kv-cache static: same logits as the PyTorch model, prefill + decode, left-padded batch of 3."""
    exp = export_model(tiny_model, tmp_path, ExportOptions(dialect=dialect, kv_cache="static"))
    proto = onnx.load(str(exp.onnx_path))
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in proto.graph.input}
    assert dims["past_key_values.0.key"] == ["batch", 2, "max_cache_length", 16]
    assert dims["write_indices"] == ["batch"]
    if dialect == "standard":
        assert sum(n.op_type == "TensorScatter" for n in proto.graph.node) == 4
    cfg = tiny_model.config
    prompts = [[5, 9, 11, 3, 7, 2], [17, 4], [1, 2, 3, 4]]
    batch = Batch.left_padded(prompts)
    decode = np.array([[3, 1, 4, 1], [5, 9, 2, 6], [5, 3, 5, 8]], dtype=np.int64)
    ref = run_torch(tiny_model, batch, decode, 4)
    eager = run_torch(tiny_model, batch, decode, 4, layout="static", capacity=16)
    got = run_ort(exp.onnx_path, cfg, batch, decode, 4, layout="static", capacity=16)
    valid = batch.attention_mask.astype(bool)
    for res in (eager, got):
        assert np.abs(res.logits[0] - ref.logits[0])[valid].max() <= TOL
        assert max(np.abs(a - b).max() for a, b in zip(res.logits[1:], ref.logits[1:], strict=False)) <= TOL
