"""Graph initializers and checkpoint tensors as fp32 arrays, one tensor at a time (what the weight checks read)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class SourceTensors:
    """Checkpoint tensors by name, fp32, one at a time: safetensors reads, or a seeded random init."""

    def __init__(self, source) -> None:
        self.source = source
        self._state = None
        if source.checkpoint_dir is not None:
            from llmtrt.exporter.streaming import Checkpoint

            self._checkpoint = Checkpoint(source.config, source.checkpoint_dir)
        else:
            from llmtrt.exporter.weights import load_model

            model = load_model(source)
            self._state = {k: v.detach().numpy() for k, v in model.state_dict().items()}

    def get(self, name: str) -> np.ndarray:
        """One checkpoint tensor; ``a+b+...`` (a fused weight): the tensors concatenated along axis 0."""
        if "+" in name:
            return np.concatenate([self.get(part) for part in name.split("+")], axis=0)
        if self.source.config.tie_word_embeddings and name == "lm_head.weight":
            name = "model.embed_tokens.weight"
        if self._state is not None:
            return self._state[name]
        return np.concatenate([b.ravel() for b in self._checkpoint.fp32_blocks(name, transpose=False)]).reshape(
            self._checkpoint.shapes[name])


def read_initializer(tensor, base_dir: Path) -> np.ndarray:
    """One initializer's values as float32 (bf16 widened exactly), external data read for it alone."""
    from onnx import TensorProto, numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    t = TensorProto()
    t.CopyFrom(tensor)
    if uses_external_data(t):
        load_external_data_for_tensor(t, str(base_dir))
    if t.data_type == TensorProto.BFLOAT16:
        raw = np.frombuffer(t.raw_data, dtype=np.uint16) if t.raw_data else np.asarray(t.int32_data, np.uint16)
        return (raw.astype(np.uint32) << 16).view(np.float32).reshape(tuple(t.dims))
    return numpy_helper.to_array(t)


def rounded_to(value: np.ndarray, scheme: str) -> np.ndarray:
    """The source value as a ``fp32``/``fp16``/``bf16`` weight stores it."""
    return rounded(value, {"fp32": 1, "fp16": 10, "bf16": 16}[scheme])


def rounded(value: np.ndarray, data_type: int) -> np.ndarray:
    """The source value as the graph's type stores it (fp32 exact, fp16 with clamping, bf16 RNE)."""
    if data_type == 10:
        return np.clip(value, -65504.0, 65504.0).astype(np.float16).astype(np.float32)
    if data_type == 16:
        bits = value.astype(np.float32).view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint32) << 16
        return rounded.view(np.float32)
    return value.astype(np.float32)
