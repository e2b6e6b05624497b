"""emulate_bf16 runs a bf16 artifact on ONNX Runtime CPU the way a GPU computes it (bf16 storage,
fp32 arithmetic, every result rounded to bf16), checked against PyTorch running the same weights in
bf16; a graph that skips the rounding is caught by the same check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from llmtrt.pipelines.precision.bf16_emulation import emulate_bf16
from llmtrt.pipelines.precision.quant_math import bf16_bits_to_fp32, round_to_bf16, to_bf16_bits
from llmtrt.pipelines.precision.quantize import PrecisionOptions, quantize

REPO = Path(__file__).resolve().parents[2]


def test_bf16_rounding_is_nearest_even_and_exact_back():
    x = np.array([1.0, 1.00390625, 1.01171875, -3.0e38, np.inf, 1e-40], dtype=np.float32)
    bits = to_bf16_bits(x)
    # 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0); 1 + 3*2^-8 ties up to 1 + 2^-6
    assert bf16_bits_to_fp32(bits)[:3].tolist() == [1.0, 1.0, 1.015625]
    assert np.isfinite(bf16_bits_to_fp32(bits)[3]) and np.isinf(bf16_bits_to_fp32(bits)[4])
    assert np.array_equal(round_to_bf16(round_to_bf16(x)), round_to_bf16(x))
    assert round_to_bf16(np.float32(-30000.0)) == -29952.0  # the attention mask value stays finite


def _ids(batch: int = 4, n: int = 128) -> np.ndarray:
    data = (REPO / "configs" / "text" / "eval.txt").read_bytes()[: batch * n]
    return np.frombuffer(data, dtype=np.uint8).astype(np.int64).reshape(batch, n)


def _run_onnx(model: onnx.ModelProto, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    b, n = ids.shape
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)
    feeds = {"input_ids": ids, "position_ids": positions, "attention_mask": mask}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((b, i.shape[1], 0, i.shape[3]), dtype=np.float32)
    return session.run(["logits"], feeds)[0]


def _torch_logits(dtype: torch.dtype, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    from llmtrt.exporter.config import resolve_model
    from llmtrt.exporter.weights import load_model

    model = load_model(resolve_model("bytes-llama")).to(dtype)
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)
    with torch.no_grad():
        out = model(torch.from_numpy(ids), torch.from_numpy(positions), torch.from_numpy(mask),
                    model.empty_cache(ids.shape[0], dtype))[0]
    return out.float().numpy()


def _without_rounding(model: onnx.ModelProto) -> onnx.ModelProto:
    """The planted fault: the emulated graph with its rounding Casts removed (bf16 weights, fp32 math)."""
    keep = [n for n in model.graph.node if not n.name.startswith("/bf16_emulation/")]
    for n in keep:
        n.output[:] = [o.removesuffix(".fp32_unrounded") for o in n.output]
        n.input[:] = [i.removesuffix(".bf16_rounded") for i in n.input]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


@pytest.mark.parametrize("dialect", ["custom", "decomposed"])
def test_emulated_bf16_matches_pytorch_bf16(dialect, tmp_path):
    from llmtrt.exporter.config import resolve_model
    from llmtrt.exporter.onnx_export import ExportOptions
    from llmtrt.pipelines.artifacts import export_artifact

    export_artifact(resolve_model("bytes-llama"), tmp_path / "fp32", ExportOptions(dialect=dialect))
    out = quantize(tmp_path / "fp32", tmp_path / "bf16", "bf16", PrecisionOptions(progress=False))
    bf16 = onnx.load(str(out / "model.onnx"))
    assert {t.data_type for t in bf16.graph.initializer if len(t.dims) == 2} == {onnx.TensorProto.BFLOAT16}

    ids = _ids()
    mask = np.ones_like(ids)
    mask[1, :40] = 0  # a left-padded row: its first queries see no key at all (must stay finite)
    emulated = _run_onnx(emulate_bf16(bf16), ids, mask)
    reference = _torch_logits(torch.bfloat16, ids, mask)
    fp32 = _torch_logits(torch.float32, ids, mask)
    live = mask.astype(bool)
    assert np.isfinite(emulated).all()

    def gap(a):
        return float(np.abs(a[live] - reference[live]).mean())

    print(f"{dialect}: mean |emulated - torch bf16| {gap(emulated):.4f}, mean |fp32 - torch bf16| {gap(fp32):.4f}, "
          f"bit-identical {np.mean(emulated[live] == reference[live]):.3f}")
    assert gap(emulated) < 0.75 * gap(fp32)
    assert np.mean(emulated[live].argmax(-1) == reference[live].argmax(-1)) >= 0.98
    unrounded = _run_onnx(_without_rounding(emulate_bf16(bf16)), ids, mask)
    assert gap(unrounded) > 0.75 * gap(fp32)  # the check fails on an emulation that does not round


def test_runner_runs_a_bf16_artifact_through_the_emulation(tmp_path):
    """validate, compare and generate open a bf16 artifact through OnnxRuntimeRunner: on CPU it runs the
    emulation (bf16-rounded results, not a silent fp32 run) and says so in its description."""
    from llmtrt.exporter.config import resolve_model
    from llmtrt.exporter.onnx_export import ExportOptions
    from llmtrt.pipelines.artifacts import export_artifact
    from llmtrt.pipelines.runtime.decoding import Batch, forward
    from llmtrt.pipelines.runtime.runners import OnnxRuntimeRunner

    export_artifact(resolve_model("bytes-llama"), tmp_path / "fp32", ExportOptions())
    quantize(tmp_path / "fp32", tmp_path / "bf16", "bf16", PrecisionOptions(progress=False))
    ids = _ids(2, 32)
    batch = Batch.left_padded(ids.tolist())
    with OnnxRuntimeRunner.from_artifact(tmp_path / "bf16") as runner, \
            OnnxRuntimeRunner.from_artifact(tmp_path / "fp32") as reference:
        assert runner.bf16_emulated and "bf16 emulated" in runner.description
        assert not reference.bf16_emulated
        got, want = forward(runner, batch), forward(reference, batch)
    assert np.isfinite(got).all() and not np.array_equal(got, want)
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.95
    emulated = _run_onnx(emulate_bf16(onnx.load(str(tmp_path / "bf16" / "model.onnx"))), ids, np.ones_like(ids))
    assert np.abs(got - emulated).max() <= 1e-3 * np.abs(emulated).max()  # the same emulated graph
