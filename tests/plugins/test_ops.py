"""Each custom op: torch reference == its ONNX function body == its opset-23 standard lowering.

One single-node graph per op, run in ONNX Runtime, swept over shapes and dtypes.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from llmtrt.plugins.registry import DOMAIN, DOMAIN_VERSION, functions, registry

NP_TO_ONNX = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16, np.int64: TensorProto.INT64}
TOL = {np.float32: 1e-5, np.float16: 2e-2}


def run_node(op_type: str, inputs: dict[str, np.ndarray], n_outputs: int, dialect: str, **attrs):
    """One node in ONNX Runtime: ``custom`` (the function body at opset 18), ``custom-17`` (at opset 17, as the
    decomposed dialect inlines it) or ``standard``."""
    op = registry()[op_type]
    node = helper.make_node(op_type, list(inputs), [f"out{i}" for i in range(n_outputs)], domain=DOMAIN, **attrs)
    dialect, _, version = dialect.partition("-")
    opset = 23 if dialect == "standard" else int(version or 18)
    nodes = op.to_standard(node) if dialect == "standard" else [node]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(k, NP_TO_ONNX[v.dtype.type], v.shape) for k, v in inputs.items()],
        [helper.make_empty_tensor_value_info(f"out{i}") for i in range(n_outputs)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid(DOMAIN, DOMAIN_VERSION)])
    if dialect == "custom":
        model.functions.extend(functions(opset))
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)


def as_torch(*arrays):
    return [torch.from_numpy(a) for a in arrays]


@pytest.mark.parametrize("dialect", ["custom", "custom-17", "standard"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 5, 64), (3, 7, 96)])
def test_rms_norm(dialect, dtype, shape):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    w = (1 + 0.1 * rng.standard_normal(shape[-1])).astype(dtype)
    (got,) = run_node("RMSNorm", {"x": x, "w": w}, 1, dialect, epsilon=1e-5)
    ref = registry()["RMSNorm"].reference(*as_torch(x, w), 1e-5).numpy()
    np.testing.assert_allclose(got.astype(np.float32), ref.astype(np.float32), atol=TOL[dtype], rtol=TOL[dtype])


def rope_tables(max_pos, half):
    inv = 1.0 / (10000 ** (np.arange(half) * 2 / (2 * half)))
    ang = np.outer(np.arange(max_pos), inv).astype(np.float32)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


@pytest.mark.parametrize("dialect", ["custom", "custom-17", "standard"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("b, h, s, d", [(1, 1, 1, 8), (2, 4, 5, 16), (3, 2, 9, 64)])
def test_rotary_embedding(dialect, dtype, b, h, s, d):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((b, h, s, d)).astype(dtype)
    pos = rng.integers(0, 40, (b, s)).astype(np.int64)
    cos, sin = rope_tables(64, d // 2)
    cos, sin = cos.astype(dtype), sin.astype(dtype)
    (got,) = run_node("RotaryEmbedding", {"x": x, "pos": pos, "cos": cos, "sin": sin}, 1, dialect)
    ref = registry()["RotaryEmbedding"].reference(*as_torch(x, pos, cos, sin)).numpy()
    np.testing.assert_allclose(got.astype(np.float32), ref.astype(np.float32), atol=TOL[dtype], rtol=TOL[dtype])


def test_rotary_is_half_split_not_interleaved():
    # Pair (0, d/2) rotates; an interleaved implementation would pair (0, 1).
    x = np.zeros((1, 1, 1, 4), np.float32)
    x[..., 0] = 1.0
    cos, sin = np.array([[0.0, 1.0]], np.float32), np.array([[1.0, 0.0]], np.float32)
    ref = registry()["RotaryEmbedding"].reference(*as_torch(x, np.zeros((1, 1), np.int64), cos, sin)).numpy()
    np.testing.assert_allclose(ref[0, 0, 0], [0.0, 0.0, 1.0, 0.0])


def attention_inputs(rng, b, hq, hkv, s, p, d, dtype):
    q = rng.standard_normal((b, hq, s, d)).astype(dtype)
    k = rng.standard_normal((b, hkv, s, d)).astype(dtype)
    v = rng.standard_normal((b, hkv, s, d)).astype(dtype)
    pk = rng.standard_normal((b, hkv, p, d)).astype(dtype)
    pv = rng.standard_normal((b, hkv, p, d)).astype(dtype)
    allowed = np.arange(p + s)[None, :] <= (np.arange(s) + p)[:, None]
    pad = np.ones((b, p + s), bool)
    pad[-1, : min(2, p + s - 1)] = False  # left padding in the last sequence
    ok = allowed[None, None] & pad[:, None, None, :]
    mask = np.where(ok, 0.0, np.finfo(dtype).min).astype(dtype)
    return q, k, v, mask, pk, pv


@pytest.mark.parametrize("dialect", ["custom", "custom-17", "standard"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("b, hq, hkv, s, p, d", [
    (1, 4, 1, 1, 7, 16),    # decode, MQA
    (2, 4, 4, 5, 0, 8),     # prefill, MHA
    (3, 9, 3, 3, 4, 16),    # 3 query heads per KV head, prefill with past
    (2, 8, 2, 1, 12, 32),   # decode, GQA
])
def test_gqa_attention(dialect, dtype, b, hq, hkv, s, p, d):
    rng = np.random.default_rng(2)
    inputs = attention_inputs(rng, b, hq, hkv, s, p, d, dtype)
    names = ["q", "k", "v", "mask", "pk", "pv"]
    scale = d ** -0.5
    got = run_node("GroupQueryAttention", dict(zip(names, inputs, strict=False)), 3, dialect,
                   q_num_heads=hq, kv_num_heads=hkv, scale=scale)
    ref = registry()["GroupQueryAttention"].reference(*as_torch(*inputs), hq, hkv, scale)
    # Rows whose keys are all masked (padding queries) are don't-care.
    live = (inputs[3] == 0).any(-1)[:, 0]  # [b, s]
    y_got, y_ref = got[0].astype(np.float32), ref[0].numpy().astype(np.float32)
    np.testing.assert_allclose(y_got.transpose(0, 2, 1, 3)[live], y_ref.transpose(0, 2, 1, 3)[live],
                               atol=TOL[dtype] * 2, rtol=TOL[dtype])
    for g, r in zip(got[1:], ref[1:], strict=False):
        np.testing.assert_array_equal(g, r.numpy())


def test_gqa_groups_share_kv_heads_in_order():
    # Query heads 0-2 must read KV head 0 and heads 3-5 KV head 1 (not head h % kv_heads).
    b, hq, hkv, s, d = 1, 6, 2, 1, 4
    q = np.ones((b, hq, s, d), np.float32)
    k = np.zeros((b, hkv, s, d), np.float32)
    v = np.stack([np.full((s, d), 1.0), np.full((s, d), 2.0)])[None].astype(np.float32)
    empty = np.zeros((b, hkv, 0, d), np.float32)
    mask = np.zeros((b, 1, s, s), np.float32)
    y = run_node("GroupQueryAttention", {"q": q, "k": k, "v": v, "mask": mask, "pk": empty, "pv": empty}, 3,
                 "custom", q_num_heads=hq, kv_num_heads=hkv, scale=0.5)[0]
    np.testing.assert_allclose(y[0, :, 0, 0], [1, 1, 1, 2, 2, 2])


def test_onnxruntime_fuses_the_rmsnorm_body(tmp_path):
    """The RMSNorm body is written in the pattern ONNX Runtime fuses into one SimplifiedLayerNormalization
    kernel (an edit that breaks the pattern costs ~10 small kernels per norm per step)."""
    x = np.ones((1, 3, 16), np.float32)
    w = numpy_helper.from_array(np.linspace(0.5, 1.5, 16).astype(np.float32), "w")
    node = helper.make_node("RMSNorm", ["x", "w"], ["y"], domain=DOMAIN, epsilon=1e-5)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 16])],
                              [helper.make_empty_tensor_value_info("y")], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])
    model.functions.extend(functions(18))
    model.ir_version = 10
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node] == [
        "SimplifiedLayerNormalization"]


def test_registry_is_complete():
    ops = registry()
    assert set(ops) == {"RMSNorm", "RotaryEmbedding", "GroupQueryAttention", "GroupQueryAttentionStatic"}
    for op in ops.values():
        fn = op.function(18)
        assert fn.domain == DOMAIN and fn.name == op.onnx_op
        ctx = onnx.checker.C.CheckerContext()
        ctx.ir_version, ctx.opset_imports = 10, {"": 18, DOMAIN: DOMAIN_VERSION}
        onnx.checker.check_function(fn, ctx)
        assert onnx.defs.has(op.onnx_op, DOMAIN)
