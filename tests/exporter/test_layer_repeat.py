"""Two captured layers cloned into N (exporter/layer_repeat.py) give the graph a full capture gives:
the same nodes and names, the same weights, the same outputs, and the same bytes in model.onnx.data."""

import functools
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from llmtrt.exporter import streaming
from llmtrt.exporter.config import resolve_model
from llmtrt.exporter.files import DATA_FILE, MODEL_FILE
from llmtrt.exporter.onnx_export import ExportOptions, export
from llmtrt.exporter.weights import load_model
from tests.conftest import HAS_TRANSFORMERS, make_hf_checkpoint

pytestmark = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed (pip install 'llmtrt[dev]')")

CASES = {
    "standard_fused_last": dict(ckpt=dict(dtype=torch.bfloat16), options=dict(dialect="standard", logits="last")),
    "custom_static_unfused": dict(ckpt=dict(dtype=torch.float32),
                                  options=dict(dialect="custom", kv_cache="static", fuse=False)),
    "decomposed_tied_inline": dict(ckpt=dict(dtype=torch.float16, tie_word_embeddings=True),
                                   options=dict(dialect="decomposed", external_data=False)),
}
LAYERS = 5


def _export(source, out, options, repeat: bool):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(streaming, "capture", functools.partial(streaming.capture, repeat=repeat))
        return export(source, out, ExportOptions(streaming=True, **options))


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    case = CASES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    ckpt = make_hf_checkpoint(tmp / "ckpt", vocab_size=160, num_hidden_layers=LAYERS, **case["ckpt"])
    source = resolve_model(str(ckpt))
    full = _export(source, tmp / "full", case["options"], repeat=False)
    repeated = _export(source, tmp / "repeated", case["options"], repeat=True)
    return source, full, repeated


def _graph(exported):
    return onnx.load(str(exported.onnx_path), load_external_data=False).graph


def test_two_layers_were_captured(pair):
    _, full, repeated = pair
    assert full.stats["captured_layers"] == LAYERS
    assert repeated.stats["captured_layers"] == 2  # the mechanism under test was used


def test_same_nodes_weights_and_io(pair):
    _, full, repeated = pair
    a, b = _graph(full), _graph(repeated)
    assert [i.name for i in a.input] == [i.name for i in b.input]
    assert [o.name for o in a.output] == [o.name for o in b.output]
    assert [str(i.type) for i in a.input] == [str(i.type) for i in b.input]

    def nodes(g):  # the capture may order independent shape nodes differently (/Shape_1 and /Shape_2 swap
        # names): compare as a multiset of names without their counters
        return sorted((re.sub(r"_\d+$", "", n.name), n.op_type, n.domain, str(n.attribute)) for n in g.node)

    assert nodes(a) == nodes(b)
    named = [n.name for n in b.node if n.name]  # the decomposed op set leaves its inlined nodes unnamed
    assert len(set(named)) == len(named)

    def weights(g):  # constants the optimizer numbered (val_N) compared by content, the rest by name
        named = {t.name: t.SerializeToString() for t in g.initializer if not t.name.startswith("val_")}
        numbered = sorted(onnx.numpy_helper.to_array(t).tobytes() for t in g.initializer if t.name.startswith("val_"))
        return named, numbered

    assert weights(a) == weights(b)
    for layer in range(LAYERS):
        assert any(t.name.startswith(f"model.layers.{layer}.") for t in b.initializer)
    data_a, data_b = (e.onnx_path.parent / DATA_FILE for e in (full, repeated))
    assert data_a.exists() == data_b.exists()
    if data_a.exists():
        assert data_a.read_bytes() == data_b.read_bytes()
    else:
        assert full.stats["external_data"] is False and (repeated.onnx_path.parent / MODEL_FILE).exists()


def _feeds(source, exported, steps: int = 6):
    cfg = source.config
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, cfg.vocab_size, (1, steps)), "position_ids": np.arange(steps)[None]}
    length = 8 if exported.kv_cache == "static" else 0
    feeds["attention_mask"] = np.ones((1, max(length, steps)), np.int64)
    if exported.kv_cache == "static":
        feeds["attention_mask"][:, steps:] = 0
        feeds["write_indices"] = np.zeros(1, np.int64)
    for i in range(cfg.num_hidden_layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, cfg.num_key_value_heads, length, cfg.head_dim), np.float32)
    return feeds


def test_same_outputs_and_pytorch_parity(pair):
    source, full, repeated = pair
    feeds = _feeds(source, repeated)
    outs = []
    for exported in (full, repeated):
        sess = ort.InferenceSession(str(exported.onnx_path), providers=["CPUExecutionProvider"])
        outs.append(dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True)))
    assert outs[0].keys() == outs[1].keys()
    for name in outs[0]:
        np.testing.assert_allclose(outs[1][name], outs[0][name], atol=1e-6, rtol=0, err_msg=name)
    model = load_model(source)
    args = [torch.from_numpy(feeds[k]) for k in ("input_ids", "position_ids", "attention_mask")]
    cache = [torch.from_numpy(feeds[f"past_key_values.{i}.{kind}"])
             for i in range(source.config.num_hidden_layers) for kind in ("key", "value")]
    with torch.no_grad():
        if repeated.kv_cache == "static":
            expected, _ = model(*args, cache, torch.from_numpy(feeds["write_indices"]))
        else:
            expected, _ = model(*args, cache)
    if repeated.logits == "last":
        expected = expected[:, -1:]
    np.testing.assert_allclose(outs[1]["logits"], expected.numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("copy_from", ["model.layers.0.input_layernorm.weight", "model.norm.weight"])
def test_a_layer_sharing_another_modules_weight_is_still_right(copy_from, tmp_path):
    """Layer 1's input norm equal to layer 0's (or to the final norm): the optimizer keeps one initializer
    for both, so the template may read another module's weight, which its clones must not share; either
    the template is refused and every layer is captured, or the merged weight is layer 1's own. Layers
    2 and 3 keep their own norms: the logits still match PyTorch."""
    from safetensors.torch import load_file, save_file

    ckpt = make_hf_checkpoint(tmp_path / "ckpt", vocab_size=160, num_hidden_layers=4)
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["model.layers.1.input_layernorm.weight"] = tensors[copy_from].clone()
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    source = resolve_model(str(ckpt))
    exported = _export(source, tmp_path / "out", {"logits": "last"}, repeat=True)
    if copy_from.startswith("model.layers.0."):
        assert exported.stats["captured_layers"] == 4  # the template read layer 0's weight: refused
    feeds = _feeds(source, exported)
    logits = ort.InferenceSession(str(exported.onnx_path), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    model = load_model(source)
    cache = [torch.from_numpy(feeds[f"past_key_values.{i}.{kind}"]) for i in range(4) for kind in ("key", "value")]
    with torch.no_grad():
        expected, _ = model(*[torch.from_numpy(feeds[k]) for k in ("input_ids", "position_ids", "attention_mask")], cache)
    np.testing.assert_allclose(logits, expected[:, -1:].numpy(), atol=1e-4, rtol=1e-4)


def test_a_template_reading_a_non_layer_weight_is_refused(tmp_path):
    """The optimizer keeps the first of equal small weights; were that the final norm's, the template
    would read ``model.norm.weight`` and its clones would share it. Planted in a two-layer capture."""
    from llmtrt.exporter import layer_repeat

    source = resolve_model(str(make_hf_checkpoint(tmp_path / "ckpt", vocab_size=160, num_hidden_layers=2)))
    checkpoint = streaming.Checkpoint(source.config, source.checkpoint_dir)

    def capture():
        return streaming.capture(checkpoint, source.config, "dynamic", repeat=False)

    def repeat(proto):
        return layer_repeat.repeat_layers(proto, 4, lambda name, shape: b"", streaming.MARK)

    assert repeat(capture()) is not None  # the unplanted capture is cloned
    planted = capture()
    norm = next(n for n in planted.graph.node if "model.layers.1.input_layernorm.weight" in n.input)
    norm.input[list(norm.input).index("model.layers.1.input_layernorm.weight")] = "model.norm.weight"
    assert repeat(planted) is None
