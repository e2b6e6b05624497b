"""The runner family: one runner per backend, the validation adapter, and the engine runner's profile
logic checked on CPU (every step's feeds must satisfy the engine manifest's profiles)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from llmtrt.exporter.config import resolve_model
from llmtrt.exporter.errors import LlmtrtUserError
from llmtrt.exporter.kv_cache import get_layout
from llmtrt.pipelines.checks.comparisons import _kv_consistency
from llmtrt.pipelines.checks.tolerances import GroupTolerance, parse_overrides
from llmtrt.pipelines.checks.validate import text_prompts
from llmtrt.pipelines.checks.validation_runner import (
    ONE_PASS,
    PREFILL,
    DecodePlan,
    ValidationRunner,
    batch_from_feed,
    decode_name,
    prefill_feed,
)
from llmtrt.pipelines.runtime.decoding import Batch, prefill_then_decode
from llmtrt.pipelines.runtime.engine_runner import TensorRTRunner, select_profile
from llmtrt.pipelines.runtime.runners import OnnxRuntimeRunner, PyTorchRunner

SOURCE = resolve_model("tiny")
CONFIG = SOURCE.config
BATCH = Batch.left_padded([[5, 6, 7, 8], [9, 10]])
TOKENS = np.array([[1, 2], [3, 4]], dtype=np.int64)


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
def test_prefill_feed_round_trips(kv_cache):
    layout = get_layout(kv_cache)
    feed = prefill_feed(BATCH, CONFIG, layout, DecodePlan(TOKENS, 6))
    back = batch_from_feed(feed)
    np.testing.assert_array_equal(back.input_ids, BATCH.input_ids)
    np.testing.assert_array_equal(back.attention_mask, BATCH.attention_mask)
    assert ("write_indices" in feed) == layout.fixed_capacity
    assert feed["past_key_values.1.value"].shape == (2, CONFIG.num_key_value_heads, 6 if layout.fixed_capacity else 0,
                                                     CONFIG.head_dim)


def test_a_feed_with_a_past_is_refused():
    feed = prefill_feed(BATCH, CONFIG, get_layout("dynamic"), DecodePlan(TOKENS, 6))
    feed["attention_mask"] = np.ones((2, 6), dtype=np.int64)
    with pytest.raises(ValueError, match="prefill"):
        batch_from_feed(feed)


def test_extended_batch_keeps_padding_left():
    full = BATCH.extended(TOKENS)
    assert full.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]]
    assert full.position_ids[1].tolist() == [0, 0, 0, 1, 2, 3]


def test_validation_runner_outputs_every_step_and_is_self_consistent():
    from polygraphy.common import TensorMetadata

    plan = DecodePlan(TOKENS, 6)
    feed = prefill_feed(BATCH, CONFIG, get_layout("dynamic"), plan)
    runner = ValidationRunner(PyTorchRunner(SOURCE, max_positions=32), plan, TensorMetadata.from_feed_dict(feed))
    with runner:
        out = runner.infer(feed)
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


def test_a_cache_that_cannot_hold_the_tokens_is_a_user_error():
    with PyTorchRunner(SOURCE, max_positions=8) as runner:
        with pytest.raises(LlmtrtUserError, match="exceed the 8"):
            runner.new_cache(1, 9)
        state = runner.new_cache(1, 4)
        ids = np.array([[1, 2, 3, 4, 5]], dtype=np.int64)
        with pytest.raises(LlmtrtUserError, match="do not fit the cache's 4"):
            runner.step(ids, np.arange(5)[None], np.ones_like(ids), state)


# --------------------------------------------------------------------------------------------
# the engine runner on CPU: profiles chosen from the manifest, feeds checked against them
# --------------------------------------------------------------------------------------------
def test_select_profile_picks_the_first_that_fits_and_names_the_shapes():
    profiles = [{"name": "prefill", "shapes": {"input_ids": {"min": [1, 1], "max": [1, 16]},
                                               "past_key_values.0.key": {"min": [1, 2, 0, 16], "max": [1, 2, 0, 16]}}},
                {"name": "decode", "shapes": {"input_ids": {"min": [1, 1], "max": [1, 1]},
                                              "past_key_values.0.key": {"min": [1, 2, 1, 16], "max": [1, 2, 31, 16]}}}]
    assert select_profile(profiles, {"input_ids": (1, 5), "past_key_values.0.key": (1, 2, 0, 16)}) == 0
    assert select_profile(profiles, {"input_ids": (1, 1), "past_key_values.0.key": (1, 2, 7, 16)}) == 1
    with pytest.raises(LlmtrtUserError, match="no optimization profile.*input_ids=\\[1, 17\\]"):
        select_profile(profiles, {"input_ids": (1, 17), "past_key_values.0.key": (1, 2, 0, 16)})


class _CheckingExecutor:
    """Stands in for the GPU: runs the source ONNX in ONNX Runtime and records every call's shapes and
    profile, after checking them against the manifest as TensorRT would."""

    def __init__(self, onnx_path, profiles):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        self.profiles, self.calls = profiles, []

    def activate(self):
        pass

    def deactivate(self):
        pass

    def alloc(self, shape, dtype):
        return np.zeros(shape, dtype=dtype)

    def to_host(self, tensor):
        return np.asarray(tensor)

    def infer(self, feeds, profile):
        ranges = self.profiles[profile]["shapes"]
        for name, array in feeds.items():
            lo, hi = ranges[name]["min"], ranges[name]["max"]
            assert all(a <= s <= b for s, a, b in zip(array.shape, lo, hi, strict=True)), (name, array.shape, lo, hi)
        self.calls.append((profile, feeds["input_ids"].shape))
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(None, dict(feeds)), strict=True))

    def keep(self, present, past):
        return present


@pytest.mark.rtx
@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
def test_engine_runner_feeds_satisfy_the_manifest_profiles(tmp_path, kv_cache):
    """Build a real TensorRT-RTX engine (CPU, ahead of time), then drive it through the engine runner with
    an ONNX Runtime stand-in for the GPU: every step's shapes must fit a profile, prefill and decode
    must pick theirs, a static engine runs at its pinned cache length, and the logits equal PyTorch."""
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed (pip install 'llmtrt[rtx]')")
    from llmtrt.exporter.onnx_export import ExportOptions
    from llmtrt.pipelines.artifacts import export_artifact
    from llmtrt.pipelines.engine.from_export import build_from_export

    ops = "standard" if kv_cache == "static" else "custom"
    export_artifact(SOURCE, tmp_path / "onnx", ExportOptions(dialect=ops, kv_cache=kv_cache, max_positions=64))
    build_from_export(tmp_path / "onnx", tmp_path / "engine", backend="tensorrt-rtx", max_batch=2,
                      max_prompt=16, max_kv=32 if kv_cache == "static" else 31)
    manifest = json.loads(next((tmp_path / "engine").glob("engine.*.json")).read_text())
    executor = _CheckingExecutor(tmp_path / "onnx" / "model.onnx", manifest["profiles"])
    runner = TensorRTRunner(tmp_path / "engine", executor=executor)
    assert runner.fixed_cache_length == (32 if kv_cache == "static" else None)
    with runner:
        got = prefill_then_decode(runner, BATCH, TOKENS, steps=2)
    chosen = [c[0] for c in executor.calls]  # prefill, then decode twice: each call's profile covers it
    names = [manifest["profiles"][i]["name"] for i in chosen]
    assert len(chosen) == 3 and all("prefill" in names[0] for _ in [0]) and all("decode" in n for n in names[1:])
    with PyTorchRunner(SOURCE, max_positions=64) as reference:
        ref = prefill_then_decode(reference, BATCH, TOKENS, steps=2)
    valid = BATCH.attention_mask.astype(bool)
    assert np.abs(got.logits[0] - ref.logits[0])[valid].max() < 1e-4
    assert max(np.abs(a - b).max() for a, b in zip(got.logits[1:], ref.logits[1:], strict=True)) < 1e-4
    with runner:  # a prompt longer than the prefill profile is refused with the shapes named
        with pytest.raises(LlmtrtUserError, match="no optimization profile"):
            prefill_then_decode(runner, Batch.left_padded([list(range(1, 20))]))


def test_engine_runner_needs_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the no-GPU message does not apply")
    onnx_dir = tmp_path / "onnx"
    from llmtrt.pipelines.artifacts import export_artifact

    export_artifact(SOURCE, onnx_dir)
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "engine.fp32.plan").write_bytes(b"not a plan")
    (engine / "engine.fp32.json").write_text(json.dumps({
        "kind": "tensorrt-engine", "plan": "engine.fp32.plan", "precision": "fp32", "backend": {"name": "tensorrt"},
        "onnx": str(onnx_dir / "model.onnx"), "profiles": [], "kv_cache": "dynamic"}))
    with pytest.raises(LlmtrtUserError, match=f"need a GPU.*llmtrt generate {onnx_dir}"):
        with TensorRTRunner(engine):
            pass


def test_onnxruntime_runner_infer_is_one_graph_call(tmp_path):
    from llmtrt.pipelines.artifacts import export_artifact

    export_artifact(SOURCE, tmp_path / "onnx")
    with OnnxRuntimeRunner.from_artifact(tmp_path / "onnx") as runner:
        feed = prefill_feed(BATCH, CONFIG, runner.layout, DecodePlan(TOKENS, 6))
        out = runner.infer(feed)
    assert out["logits"].shape == (2, 4, CONFIG.vocab_size) and out["present.1.value"].shape[2] == 4


def test_ort_spinning_follows_idle_cores_and_the_environment(monkeypatch, tmp_path):
    """ONNX Runtime's worker threads spin only while the cores are idle; $LLMTRT_ORT_SPINNING overrides,
    and a bad value is a clear error; the choice reaches the session's config."""
    from llmtrt.exporter.errors import LlmtrtUserError
    from llmtrt.pipelines.runtime import runners

    monkeypatch.delenv(runners.SPINNING_ENV, raising=False)
    import os

    from llmtrt.pipelines import cpu

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    for others, spin in ((0.0, True), (0.4, True), (0.6, False), (3.0, False)):  # cores busy with other processes
        monkeypatch.setattr(cpu, "_others_busy", lambda others=others: others)
        assert runners.spinning_wanted(2) is spin, others
    monkeypatch.setattr(cpu, "_others_busy", lambda: None)  # no /proc: the load average, our own thread idle
    for load, spin in ((0.2, True), (1.4, True), (1.6, False), (4.0, False)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert runners.spinning_wanted(2) is spin, load
    monkeypatch.setenv(runners.SPINNING_ENV, "1")
    assert runners.spinning_wanted(2) is True
    monkeypatch.setenv(runners.SPINNING_ENV, "off")
    assert runners.spinning_wanted(2) is False
    monkeypatch.setenv(runners.SPINNING_ENV, "sometimes")
    with pytest.raises(LlmtrtUserError, match="LLMTRT_ORT_SPINNING"):
        runners.spinning_wanted(2)

    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    for spinning, entry in ((True, "1"), (False, "0")):
        opts = ort.SessionOptions()
        runners.ort_session(path, options=opts, spinning=spinning)
        assert opts.get_session_config_entry("session.intra_op.allow_spinning") == entry


def test_idle_cores_counts_other_processes_not_this_one(monkeypatch):
    """A busy thread of this process leaves the cores "idle" for llmtrt's choices; a busy other process does not."""
    import subprocess
    import sys
    import threading
    import time

    from llmtrt.pipelines import cpu

    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc on this platform: idle_cores falls back to the load average")

    def sample() -> float:
        monkeypatch.setattr(cpu, "_cached", None)
        return cpu._others_busy()

    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    time.sleep(0.05)
    own_busy = sample()
    stop.set()
    spinner.join()
    other = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"])
    try:
        time.sleep(0.1)
        other_busy = sample()
    finally:
        other.kill()
        other.wait()
    assert other_busy - own_busy > 0.5, (own_busy, other_busy)
