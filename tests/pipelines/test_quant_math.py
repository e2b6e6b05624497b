"""llmtrt.pipelines.precision.quant_math against hand-computed values, and against ONNX Runtime's own Q/DQ kernels."""

from __future__ import annotations

import numpy as np
import pytest

from llmtrt.pipelines.precision import quant_math as qm


def test_rounding_is_half_to_even_like_quantize_linear():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 2.4999, 2.5001], dtype=np.float32)
    assert qm.round_half_to_even(x).tolist() == [0, 2, 2, -0, -2, -2, 2, 3]


def test_quantize_saturates_and_adds_zero_point():
    # scale 0.5: 1.25 / 0.5 = 2.5 -> 2 (even); 100 -> 200 -> 127; -100 -> -127 (int8 symmetric range)
    q = qm.quantize(np.array([1.25, 100.0, -100.0, 0.75]), 0.5, 0, -127, 127)
    assert q.tolist() == [2, 127, -127, 2]
    # uint8 with zero point 128: 0.75 / 0.5 = 1.5 -> 2, + 128 = 130
    assert qm.quantize(np.array([0.75, -1000.0]), 0.5, 128, 0, 255).tolist() == [130, 0]
    assert qm.dequantize(np.array([130, 0]), 0.5, 128).tolist() == [1.0, -64.0]


def test_symmetric_scale_and_zero_channel():
    assert qm.symmetric_scale(np.array([127.0, 0.0, 2.54]), 127).tolist() == pytest.approx([1.0, 1.0, 0.02])


def test_int8_per_channel_hand_computed():
    # [in=2, out=3]; column maxima 2, 0.5, 0 -> scales 2/127, 0.5/127, 1 (zero column)
    w = np.array([[1.0, -0.5, 0.0], [-2.0, 0.25, 0.0]], dtype=np.float32)
    q, scale = qm.int8_per_channel(w)
    assert scale.tolist() == pytest.approx([2 / 127, 0.5 / 127, 1.0])
    # 1 / (2/127) = 63.5 -> 64 (half to even); 0.25 / (0.5/127) = 63.5 -> 64
    assert q.tolist() == [[64, -127, 0], [-127, 64, 0]]
    assert q.dtype == np.int8


def test_int4_blocked_layout_and_values():
    # [in=4, out=2], block 2: blocks rows {0,1} and {2,3}; scale = block max / 7
    w = np.array([[0.7, -1.4], [0.35, 0.7], [7.0, 0.0], [-3.5, 0.0]], dtype=np.float32)
    q, scale = qm.int4_blocked(w, 2)
    assert scale.shape == (2, 2)
    np.testing.assert_allclose(scale, [[0.1, 0.2], [1.0, 1.0]], rtol=1e-6)
    # 0.35 / 0.1 = 3.5 -> 4 (even); -3.5 / 1.0 = -3.5 -> -4 (even)
    assert q.tolist() == [[7, -7], [4, 4], [7, 0], [-4, 0]]
    fake = qm.fake_int4_blocked(w, 2)
    np.testing.assert_allclose(fake, [[0.7, -1.4], [0.4, 0.8], [7.0, 0.0], [-4.0, 0.0]], rtol=1e-6)


def test_int4_short_last_block_and_clipped_range():
    w = np.arange(-6, 6, dtype=np.float32).reshape(3, 4) / 10  # in=3, block 2 -> blocks of 2 and 1 rows
    q, scale = qm.int4_blocked(w, 2)
    assert scale.shape == (2, 4) and q.shape == (3, 4)
    assert qm.expand_blocks(scale, 3, 2).shape == (3, 4)
    # a clipped range saturates at -8..7
    q2, s2 = qm.int4_blocked(np.array([[1.0], [-1.0]], dtype=np.float32), 2, amax=np.array([[0.35]]))
    np.testing.assert_allclose(s2, [[0.05]], rtol=1e-6)
    assert q2.ravel().tolist() == [7, -8]


def test_pack_int4_low_nibble_first():
    # values 1, -1 -> nibbles 0x1, 0xF -> byte 0xF1; 7, -8 -> 0x7, 0x8 -> 0x87; odd count pads with 0
    assert qm.pack_int4(np.array([1, -1, 7, -8, 3])) == bytes([0xF1, 0x87, 0x03])
    assert qm.unpack_int4(bytes([0xF1, 0x87, 0x03]), 5).tolist() == [1, -1, 7, -8, 3]
    with pytest.raises(ValueError):
        qm.pack_int4(np.array([8]))


def test_smoothquant_and_awq_scales():
    # s = a^0.5 / w^0.5: a=16, w=4 -> 2; a=1, w=1 -> 1; alpha 1 -> s = a
    assert qm.smoothquant_scales(np.array([16.0, 1.0]), np.array([4.0, 1.0]), 0.5).tolist() == pytest.approx([2, 1])
    assert qm.smoothquant_scales(np.array([16.0]), np.array([4.0]), 1.0).tolist() == pytest.approx([16])
    # mean^1 = [4, 1] normalized by sqrt(4 * 1) = 2 -> [2, 0.5]; ratio 0 -> ones
    assert qm.awq_scales(np.array([4.0, 1.0]), 1.0).tolist() == pytest.approx([2.0, 0.5])
    assert qm.awq_scales(np.array([4.0, 1.0]), 0.0).tolist() == pytest.approx([1.0, 1.0])


def test_awq_fake_quant_matches_quant_math():
    torch = pytest.importorskip("torch")
    from llmtrt.pipelines.precision import awq

    w = np.random.default_rng(3).normal(size=(64, 5)).astype(np.float32)
    w[0, 0] = 0.0
    np.testing.assert_array_equal(awq.fake_int4(torch.from_numpy(w), 32).numpy(), qm.fake_int4_blocked(w, 32))


def test_awq_searches_never_worse_than_round_to_nearest():
    from llmtrt.pipelines.precision import awq

    rng = np.random.default_rng(1)
    w = rng.standard_t(3, size=(64, 8)).astype(np.float32)   # heavy tails: clipping pays
    x = (rng.normal(size=(200, 64)) * np.exp(rng.normal(size=64))).astype(np.float32)  # uneven channels
    amax, clipped, plain = awq.search_clip(x, w, 32)
    assert np.all(amax <= qm.block_amax(w, 32) + 1e-7)

    def block_errors(d):  # each block's own share of the output error, sum_b ||x_b @ d_b||^2
        return sum(float(np.sum((x[:, b:b + 32] @ d[b:b + 32]) ** 2)) for b in (0, 32))

    assert clipped == pytest.approx(block_errors(qm.fake_int4_blocked(w, 32, amax) - w), rel=1e-4)
    assert plain == pytest.approx(block_errors(qm.fake_int4_blocked(w, 32) - w), rel=1e-4)
    assert clipped < plain  # heavy-tailed weights: some block prefers a shrunk range
    s, ratio, err, rtn = awq.search_scales(x, np.abs(x).mean(axis=0), [w], 32, grid=10)
    assert err <= rtn and (ratio == 0) == np.all(s == 1)
    rtn_direct = float(np.sum((x @ (qm.fake_int4_blocked(w, 32) - w)) ** 2))
    assert rtn == pytest.approx(rtn_direct, rel=1e-4)


def test_awq_search_threads_follow_idle_cores(monkeypatch):
    from llmtrt.exporter.errors import LlmtrtUserError
    from llmtrt.pipelines.precision import awq

    monkeypatch.delenv(awq.THREADS_ENV, raising=False)
    from llmtrt.pipelines import cpu

    monkeypatch.setattr(awq.os, "cpu_count", lambda: 2)
    for others, threads in ((0.0, 2), (0.4, 2), (1.0, 1), (5.0, 1)):  # cores busy with other processes
        monkeypatch.setattr(cpu, "_others_busy", lambda others=others: others)
        assert awq.search_threads() == threads, others
    monkeypatch.setenv(awq.THREADS_ENV, "3")
    assert awq.search_threads() == 3
    monkeypatch.setenv(awq.THREADS_ENV, "two")
    with pytest.raises(LlmtrtUserError, match="LLMTRT_SEARCH_THREADS"):
        awq.search_threads()


def test_observers():
    values = np.abs(np.concatenate([np.linspace(0, 1, 10001), [50.0]]))
    assert qm.observe_max(values) == 50.0
    assert qm.observe_percentile(np.arange(101, dtype=np.float64), 99.0) == pytest.approx(99.0)
    assert 0.9 <= qm.observe_entropy(values) < 5.0  # the lone outlier is clipped away
    assert qm.observe_max(np.array([])) == 0.0 and qm.observe_entropy(np.zeros(10)) == 0.0


def test_matches_onnxruntime_quantize_and_blocked_dequantize():
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(2)
    x = (rng.normal(size=(4, 8)) * 3).astype(np.float32)
    x[0, :3] = [0.25, 0.75, -0.25]  # exact halves at scale 0.5
    g = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"])], "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("q", TensorProto.INT8, [4, 8])],
        [numpy_helper.from_array(np.array(0.5, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.tolist() == qm.quantize(x, 0.5, 0, -128, 127).tolist()

    w = rng.normal(size=(6, 3)).astype(np.float32)  # 6 rows, block 4: one full, one short block
    q, scale = qm.int4_blocked(w, 4)
    qt = helper.make_tensor("w", TensorProto.INT4, [6, 3], qm.pack_int4(q), raw=True)
    g = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["w", "s"], ["y"], axis=0, block_size=4)], "dq", [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6, 3])], [qt, numpy_helper.from_array(scale, "s")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
    np.testing.assert_array_equal(got, qm.fake_int4_blocked(w, 4))
