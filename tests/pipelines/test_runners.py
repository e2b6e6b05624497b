"""Polygraphy runners: the prefill feed round-trips, KV-cache consistency can fail, TensorRT skips with a reason."""

from __future__ import annotations

import numpy as np
import pytest

from llmtrt.exporter.config import resolve_model
from llmtrt.pipelines.checks.validate import GroupTolerance, _kv_consistency, parse_overrides, text_prompts
from llmtrt.pipelines.runtime.decoding import Batch
from llmtrt.pipelines.runtime.runners import (
    ONE_PASS,
    PREFILL,
    DecodePlan,
    PyTorchRunner,
    batch_from_feed,
    decode_name,
    one_pass_batch,
    prefill_feed,
    tensorrt_unavailable,
)

CONFIG = resolve_model("tiny").config
BATCH = Batch.left_padded([[5, 6, 7, 8], [9, 10]])
TOKENS = np.array([[1, 2], [3, 4]], dtype=np.int64)


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
def test_prefill_feed_round_trips(kv_cache):
    plan = DecodePlan(TOKENS, kv_cache, 6)
    feed = prefill_feed(BATCH, CONFIG, plan)
    back = batch_from_feed(feed, plan)
    np.testing.assert_array_equal(back.input_ids, BATCH.input_ids)
    np.testing.assert_array_equal(back.attention_mask, BATCH.attention_mask)
    assert ("write_indices" in feed) == (kv_cache == "static")
    assert feed["past_key_values.1.value"].shape == (2, CONFIG.num_key_value_heads, 6 if kv_cache == "static" else 0,
                                                     CONFIG.head_dim)


def test_a_feed_with_a_past_is_refused():
    plan = DecodePlan(TOKENS)
    feed = prefill_feed(BATCH, CONFIG, plan)
    feed["attention_mask"] = np.ones((2, 6), dtype=np.int64)
    with pytest.raises(ValueError, match="prefill"):
        batch_from_feed(feed, plan)


def test_one_pass_batch_keeps_padding_left():
    full = one_pass_batch(BATCH, TOKENS)
    assert full.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]]
    assert full.position_ids[1].tolist() == [0, 0, 0, 1, 2, 3]


def test_pytorch_runner_outputs_every_step_and_is_self_consistent():
    from polygraphy.common import TensorMetadata

    plan = DecodePlan(TOKENS)
    runner = PyTorchRunner("tiny", plan, TensorMetadata.from_feed_dict(prefill_feed(BATCH, CONFIG, plan)),
                           max_positions=32)
    with runner:
        out = runner.infer(prefill_feed(BATCH, CONFIG, plan))
    assert out[PREFILL].shape == (2, 4, CONFIG.vocab_size)
    assert out[decode_name(2)].shape == (2, 1, CONFIG.vocab_size)
    assert out[ONE_PASS].shape == (2, 3, CONFIG.vocab_size)
    assert np.all(out[PREFILL][1, :2] == 0)  # padding rows zeroed
    assert out["present.0.key"].shape[2] == 6
    row = _kv_consistency("pytorch", out, 2, GroupTolerance(atol=1e-4, rtol=1e-3))
    assert row["passed"] and row["max_absdiff"] < 1e-5
    out[ONE_PASS] = out[ONE_PASS] + np.float32(1e-3)  # a cache bug shows up as stepped != one pass
    assert not _kv_consistency("pytorch", out, 2, GroupTolerance(atol=1e-4, rtol=1e-5))["passed"]


def test_text_prompts_have_decreasing_lengths_and_real_continuations():
    tokens = list(range(100))
    prompts, follow = text_prompts(tokens, 3, 10, 2)
    assert [len(p) for p in prompts] == [10, 5, 1]
    assert prompts[2] == [19]
    assert follow.tolist() == [[10, 11], [17, 18], [20, 21]]


def test_overrides_parse_like_polygraphy():
    assert parse_overrides(["1e-3", "logits:0.5", "logits.decode.2:0"], "--atol") == {
        "": 1e-3, "logits": 0.5, "logits.decode.2": 0.0}


def test_tensorrt_runner_needs_a_gpu(tmp_path):
    import torch

    if not torch.cuda.is_available():
        assert "no CUDA GPU" in tensorrt_unavailable(tmp_path)
        pytest.skip("no CUDA GPU: TensorRT engines cannot run here; the ONNX Runtime path covers the shared runner code")
    assert tensorrt_unavailable(tmp_path) is None
