"""Streaming export writes the same files as the in-memory export, byte for byte, and runs the same."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from llmtrt.exporter import onnx_export, streaming
from llmtrt.exporter.config import resolve_model
from llmtrt.exporter.errors import LlmtrtUserError
from llmtrt.exporter.files import DATA_FILE, MODEL_FILE
from llmtrt.exporter.onnx_export import ExportOptions, export, use_streaming
from llmtrt.exporter.weights import load_model
from tests.conftest import HAS_TRANSFORMERS, make_hf_checkpoint

pytestmark = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed (pip install 'llmtrt[dev]')")

# hidden 64, vocab 160, MLP 96: every linear weight and the embedding are over SMALL_ELEMENTS, so they
# are streamed; the norm weights are loaded (the optimizer deduplicates those by content).
CASES = {
    "bf16_custom_external": dict(ckpt=dict(dtype=torch.bfloat16), options=dict(dialect="custom", external_data=True)),
    "fp16_tied_inline": dict(ckpt=dict(dtype=torch.float16, tie_word_embeddings=True),
                             options=dict(dialect="custom", external_data=False)),
    "fp32_standard_static": dict(ckpt=dict(dtype=torch.float32, max_shard_size="100KB"),
                                 options=dict(dialect="standard", kv_cache="static", external_data=True)),
    "fp32_decomposed": dict(ckpt=dict(dtype=torch.float32), options=dict(dialect="decomposed", external_data=True)),
    "fp32_custom_unfused": dict(ckpt=dict(dtype=torch.float32),
                                options=dict(dialect="custom", external_data=True, fuse=False)),
    "bf16_standard_last_logits": dict(ckpt=dict(dtype=torch.bfloat16, max_shard_size="100KB"),
                                      options=dict(dialect="standard", external_data=True, logits="last")),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    case = CASES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    source = resolve_model(str(make_hf_checkpoint(tmp / "ckpt", vocab_size=160, **case["ckpt"])))
    plans = []
    lay_out = streaming.lay_out

    def recording_lay_out(proto, external):
        plans.append(lay_out(proto, external))
        return plans[-1]

    memory = export(source, tmp / "memory", ExportOptions(streaming=False, **case["options"]))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(streaming, "lay_out", recording_lay_out)
        streamed = export(source, tmp / "streamed", ExportOptions(streaming=True, **case["options"]))
    return source, memory, streamed, plans[0]


def test_files_are_byte_identical(pair):
    source, memory, streamed, plan = pair
    assert memory.stats["streaming"] is False and streamed.stats["streaming"] is True
    assert streamed.stats["weights_bytes"] == memory.stats["weights_bytes"]
    for name in (MODEL_FILE, DATA_FILE):
        a, b = memory.onnx_path.parent / name, streamed.onnx_path.parent / name
        assert a.exists() == b.exists()
        if a.exists():
            assert a.read_bytes() == b.read_bytes(), f"{name} differs"


def test_weights_were_streamed_not_loaded(pair):
    source, memory, streamed, plan = pair
    streamed_sources = [item for _, item in plan if isinstance(item, str)]
    if streamed.stats["external_data"]:
        assert "model.layers.0.mlp.down_proj.weight|T" in streamed_sources
        assert "model.embed_tokens.weight" in streamed_sources
        qkv = "+".join(f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkv") + "|T"
        assert (qkv in streamed_sources) == bool(streamed.fused)  # a fused weight: its parts, concatenated
        assert ("model.layers.1.self_attn.q_proj.weight|T" in streamed_sources) != bool(streamed.fused)
    else:  # inline: nothing goes to model.onnx.data, placeholders are filled in the graph
        assert plan == []


def test_streamed_graph_matches_pytorch_in_onnxruntime(pair):
    source, memory, streamed, plan = pair
    model = load_model(source)
    cfg = source.config
    ids = torch.tensor([[3, 17, 42, 99, 5]])
    pos = torch.arange(5)[None]
    mask = torch.ones(1, 5, dtype=torch.int64)
    feeds = {"input_ids": ids.numpy(), "position_ids": pos.numpy(), "attention_mask": mask.numpy()}
    if streamed.kv_cache == "static":
        max_len = 8
        cache = [torch.zeros(1, cfg.num_key_value_heads, max_len, cfg.head_dim) for _ in range(2 * cfg.num_hidden_layers)]
        full_mask = torch.zeros(1, max_len, dtype=torch.int64)
        full_mask[:, :5] = 1
        write = torch.zeros(1, dtype=torch.int64)
        with torch.no_grad():
            expected, _ = model(ids, pos, full_mask, cache, write)
        feeds.update(attention_mask=full_mask.numpy(), write_indices=write.numpy())
    else:
        cache = model.empty_cache(1)
        with torch.no_grad():
            expected, _ = model(ids, pos, mask, cache)
    for i in range(cfg.num_hidden_layers):
        feeds[f"past_key_values.{i}.key"] = cache[2 * i].numpy()
        feeds[f"past_key_values.{i}.value"] = cache[2 * i + 1].numpy()
    sess = ort.InferenceSession(str(streamed.onnx_path), providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], feeds)[0]
    if streamed.logits == "last":
        expected = expected[:, -1:]
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4, rtol=1e-4)


def test_checkpoints_stream_by_default(tmp_path, monkeypatch):
    source = resolve_model(str(make_hf_checkpoint(tmp_path / "ckpt", vocab_size=160)))
    assert use_streaming(source, ExportOptions())  # even a small one: same files, less memory and time
    assert use_streaming(source, ExportOptions(streaming=True))
    assert not use_streaming(source, ExportOptions(streaming=False))
    monkeypatch.setattr(onnx_export, "STREAMING_THRESHOLD", 1 << 40)
    assert not use_streaming(source, ExportOptions())
    assert not use_streaming(resolve_model("tiny"), ExportOptions())


def test_streaming_a_random_preset_is_a_user_error(tmp_path):
    with pytest.raises(LlmtrtUserError, match="random-init"):
        export(resolve_model("tiny"), tmp_path / "out", ExportOptions(streaming=True))


def _rewrite_header(path, mutate):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    mutate(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n:])


def test_shape_mismatch_is_named(tmp_path):
    ckpt = make_hf_checkpoint(tmp_path / "ckpt", vocab_size=160)
    source = resolve_model(str(ckpt))

    def transpose_q(header):
        header["model.layers.1.self_attn.q_proj.weight"]["shape"] = [64, 64 + 0][::-1] + [1]

    _rewrite_header(ckpt / "model.safetensors", transpose_q)
    with pytest.raises(LlmtrtUserError, match=r"model.layers.1.self_attn.q_proj.weight"):
        streaming.Checkpoint(source.config, ckpt)


def test_truncated_file_is_a_user_error(tmp_path):
    ckpt = make_hf_checkpoint(tmp_path / "ckpt", vocab_size=160)
    source = resolve_model(str(ckpt))
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-4096])
    with pytest.raises(LlmtrtUserError, match="model.safetensors"):
        export(source, tmp_path / "out", ExportOptions(streaming=True))
    assert not (tmp_path / "out" / MODEL_FILE).exists()
