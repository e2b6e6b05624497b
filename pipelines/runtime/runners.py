"""Polygraphy runners that own the prefill + decode loop: PyTorch fp32 reference, ONNX Runtime, TensorRT.

One Polygraphy *iteration* is one whole generation check. The feed dict is the exported graph's
prefill feed (``input_ids``, ``position_ids``, ``attention_mask``, empty ``past_key_values.*``, and
``write_indices`` for a static cache), so ``polygraphy run model.onnx --onnxrt --load-inputs
inputs.json`` replays exactly the first step by hand. Each runner then runs prefill + ``M`` decode
steps, feeding ``present.*`` back as ``past_key_values.*`` (teacher-forced on the same
``decode_tokens`` for every backend), plus one forward over the whole ``N + M`` tokens, and returns

    logits.prefill      [batch, N, vocab]     (``logits``: the same, padding rows kept, for by-hand replays)
    logits.decode.{i}   [batch, 1, vocab]     i = 1..M
    logits.one_pass     [batch, M + 1, vocab] one forward over N + M tokens, at the positions that
                                              prefill's last token and each decode step predict from
    present.{i}.key|value                     the cache after the last decode step

Logits and cache rows of left-padding positions are zeroed: a fully masked softmax is undefined
and backends legitimately differ there.

so Polygraphy's comparison functions see every step by name, and the KV-cache consistency check
(prefill + decode == one pass) is a comparison within one runner's outputs.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from llmtrt.exporter.config import ModelConfig
from llmtrt.exporter.errors import LlmtrtUserError
from llmtrt.pipelines.runtime.decoding import (
    Batch,
    Stepper,
    empty_cache,
    ort_static_stepper,
    ort_stepper,
    positions_from_mask,
    prefill_then_decode,
    static_cache_adapter,
    torch_stepper,
)

PREFILL = "logits.prefill"
RAW_PREFILL = "logits"  # prefill logits unmasked, as the graph returns them (not gated: padding rows differ)
ONE_PASS = "logits.one_pass"


def decode_name(step: int) -> str:
    return f"logits.decode.{step}"


@dataclass(frozen=True)
class DecodePlan:
    """What every runner does after the prefill feed: the same tokens, the same cache layout."""

    decode_tokens: np.ndarray  # [batch, M] int64, fed one per decode step (teacher forcing)
    kv_cache: str = "dynamic"  # the artifact's layout; "static" graphs run through static_cache_adapter
    max_cache_len: int = 0     # static layout: slots in the fixed-size cache (>= N + M)

    @property
    def steps(self) -> int:
        return int(self.decode_tokens.shape[1])


def graph_input_metadata(onnx_path: str | Path) -> TensorMetadata:
    """Names, numpy dtypes and shapes (None for symbolic dims) of a graph's inputs, without loading weights."""
    import onnx
    from onnx import helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    meta = TensorMetadata()
    initializers = {i.name for i in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        t = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        meta.add(value.name, np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)), dims)
    return meta


def prefill_feed(batch: Batch, config: ModelConfig, plan: DecodePlan, cache_dtype=np.float32) -> OrderedDict:
    """The graph's feed dict for the prefill step (empty dynamic cache, or a zeroed static one at slot 0)."""
    n, seq = batch.input_ids.shape
    feed = OrderedDict(input_ids=batch.input_ids, position_ids=batch.position_ids)
    if plan.kv_cache == "static":
        mask = np.zeros((n, plan.max_cache_len), dtype=np.int64)
        mask[:, :seq] = batch.attention_mask
        feed["attention_mask"] = mask
        length = plan.max_cache_len
    else:
        feed["attention_mask"] = batch.attention_mask
        length = 0
    for i in range(config.num_hidden_layers):
        for kv in ("key", "value"):
            feed[f"past_key_values.{i}.{kv}"] = np.zeros(
                (n, config.num_key_value_heads, length, config.head_dim), dtype=cache_dtype)
    if plan.kv_cache == "static":
        feed["write_indices"] = np.zeros((n,), dtype=np.int64)
    return feed


def batch_from_feed(feed: dict[str, np.ndarray], plan: DecodePlan) -> Batch:
    """The prompts a prefill feed dict holds (inverse of ``prefill_feed``); refuses a non-empty past."""
    ids = np.asarray(feed["input_ids"], dtype=np.int64)
    seq = ids.shape[1]
    mask = np.asarray(feed["attention_mask"], dtype=np.int64)
    if plan.kv_cache == "static":
        if np.any(np.asarray(feed.get("write_indices", 0)) != 0) or np.any(mask[:, seq:]):
            raise ValueError("a validation feed must be a prefill step: write_indices 0 and nothing cached")
        mask = mask[:, :seq]
    elif mask.shape[1] != seq:
        raise ValueError(f"a validation feed must be a prefill step: attention_mask covers {mask.shape[1]} "
                         f"tokens but input_ids has {seq}")
    return Batch(ids, mask, np.asarray(feed["position_ids"], dtype=np.int64))


def one_pass_batch(batch: Batch, decode_tokens: np.ndarray) -> Batch:
    """Prompts followed by the decode tokens, as one left-padded prefill (padding stays on the left)."""
    ids = np.concatenate([batch.input_ids, decode_tokens.astype(np.int64)], axis=1)
    mask = np.concatenate([batch.attention_mask, np.ones_like(decode_tokens, dtype=np.int64)], axis=1)
    return Batch(ids, mask, positions_from_mask(mask))


class DecodeLoopRunner(BaseRunner):
    """Base: subclasses provide ``make_stepper()`` (after ``activate``), ``config`` and ``cache_dtype``."""

    def __init__(self, plan: DecodePlan, input_metadata: TensorMetadata, config: ModelConfig,
                 name: str | None = None, prefix: str = "llmtrt-runner") -> None:
        super().__init__(name=name, prefix=prefix)
        self.plan = plan
        self.config = config
        self.input_metadata = input_metadata
        self.cache_dtype = np.float32
        self.description = self.name

    def make_stepper(self) -> Stepper:
        raise NotImplementedError

    def get_input_metadata_impl(self):
        return self.input_metadata

    def infer_impl(self, feed_dict):
        batch = batch_from_feed(feed_dict, self.plan)
        step = self.make_stepper()
        c = self.config
        start = time.perf_counter()
        cache = empty_cache(c.num_hidden_layers, len(batch.input_ids), c.num_key_value_heads, c.head_dim,
                            dtype=self.cache_dtype)
        result = prefill_then_decode(step, batch, cache, self.plan.decode_tokens, steps=self.plan.steps)
        full_logits, _ = step(*_step_args(one_pass_batch(batch, self.plan.decode_tokens)),
                              empty_cache(c.num_hidden_layers, len(batch.input_ids), c.num_key_value_heads,
                                          c.head_dim, dtype=self.cache_dtype))
        self.inference_time = time.perf_counter() - start
        n = batch.input_ids.shape[1]
        outputs = OrderedDict()
        # left padding is not part of the model's semantics: its logits and cache rows are whatever a
        # fully masked softmax gives on each backend, so they are zeroed before any comparison
        outputs[PREFILL] = _f32(result.logits[0]) * batch.attention_mask[:, :, None]
        outputs[RAW_PREFILL] = _f32(result.logits[0])  # the graph's own output name, for `polygraphy run`
        for i, logits in enumerate(result.logits[1:], start=1):
            outputs[decode_name(i)] = _f32(logits)
        outputs[ONE_PASS] = _f32(full_logits[:, n - 1:])
        real = one_pass_batch(batch, self.plan.decode_tokens).attention_mask[:, None, :, None].astype(np.float32)
        for i in range(c.num_hidden_layers):
            outputs[f"present.{i}.key"] = _f32(result.present[2 * i]) * real
            outputs[f"present.{i}.value"] = _f32(result.present[2 * i + 1]) * real
        return outputs


def _step_args(batch: Batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return batch.input_ids, batch.position_ids, batch.attention_mask


def _f32(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(array, dtype=np.float32))


class PyTorchRunner(DecodeLoopRunner):
    """The fp32 PyTorch model (llmtrt.exporter.model) behind an artifact: the reference every backend is held to."""

    def __init__(self, model_source: str, plan: DecodePlan, input_metadata: TensorMetadata, *, seed: int = 0,
                 max_positions: int | None = None, name: str = "pytorch-fp32") -> None:
        from llmtrt.exporter.config import resolve_model

        self.source = resolve_model(model_source, seed=seed)
        super().__init__(plan, input_metadata, self.source.config, name=name)
        self.max_positions = max_positions
        self.model = None
        kind = f"weights {self.source.checkpoint_dir}" if self.source.is_checkpoint else f"random init seed {seed}"
        self.description = f"PyTorch fp32 {model_source} ({kind})"

    def activate_impl(self):
        from llmtrt.exporter.weights import load_model

        self.model = load_model(self.source, max_positions=self.max_positions)

    def deactivate_impl(self):
        self.model = None

    def make_stepper(self) -> Stepper:
        return torch_stepper(self.model)  # the reference always runs the growing cache


def ort_session_loader(onnx_path: str | Path, providers: tuple[str, ...] = ("CPUExecutionProvider",)
                       ) -> Callable[[], object]:
    """A lazy loader (Polygraphy style) for an ONNX Runtime session; errors name the file."""

    def load():
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # static caches log a TensorScatter copy note per node per step
        try:
            return ort.InferenceSession(str(onnx_path), options, providers=list(providers))
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise LlmtrtUserError(f"{onnx_path}: ONNX Runtime cannot load it ({str(exc)[:300]})") from None

    return load


class OnnxRuntimeRunner(DecodeLoopRunner):
    """An exported (or precision-converted) ONNX directory in ONNX Runtime."""

    def __init__(self, onnx_path: str | Path, config: ModelConfig, plan: DecodePlan, *, name: str = "onnxruntime",
                 session_loader: Callable[[], object] | None = None) -> None:
        import onnxruntime as ort

        self.onnx_path = Path(onnx_path)
        super().__init__(plan, graph_input_metadata(self.onnx_path), config, name=name)
        if "past_key_values.0.key" in self.input_metadata:
            self.cache_dtype = np.dtype(self.input_metadata["past_key_values.0.key"].dtype.numpy())
        self.session_loader = session_loader or ort_session_loader(self.onnx_path)
        self.session = None
        self.description = f"ONNX Runtime {ort.__version__} CPU ({self.onnx_path}, {plan.kv_cache} cache)"

    def activate_impl(self):
        self.session = self.session_loader()

    def deactivate_impl(self):
        self.session = None

    def make_stepper(self) -> Stepper:
        if self.plan.kv_cache == "static":
            return static_cache_adapter(ort_static_stepper(self.session), self.plan.max_cache_len)
        return ort_stepper(self.session)


def tensorrt_unavailable(engine_dir: str | Path) -> str | None:
    """Why a TensorRT engine cannot run here (None when it can): engines need a CUDA GPU."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return "torch is not installed"
    if not torch.cuda.is_available():
        return f"no CUDA GPU on this machine, so the engine in {engine_dir} cannot run (validated ONNX Runtime only)"
    return None


class TensorRTRunner(DecodeLoopRunner):
    """A ``llmtrt build`` engine directory, run through llmtrt.pipelines.runtime.generate's engine executor (needs a GPU)."""

    def __init__(self, engine_dir: str | Path, config: ModelConfig, plan: DecodePlan, input_metadata: TensorMetadata,
                 *, precision: str | None = None, name: str = "tensorrt") -> None:
        super().__init__(plan, input_metadata, config, name=name)
        self.engine_dir = Path(engine_dir)
        self.precision = precision
        self.engine = None
        self.description = f"TensorRT engine {self.engine_dir}"

    def activate_impl(self):
        from llmtrt.pipelines.runtime.generate import TensorRTRunner as EngineExecutor

        self.engine = EngineExecutor(self.engine_dir, self.precision)
        self.cache_dtype = self.engine.cache_dtype
        self.description = self.engine.description

    def deactivate_impl(self):
        if self.engine is not None:
            self.engine.close()
        self.engine = None
        self.cache_dtype = np.float32
        self.description = f"TensorRT engine {self.engine_dir}"

    def make_stepper(self) -> Stepper:
        # the executor's stepper applies static_cache_adapter itself for a static-cache engine
        return self.engine.stepper(self.plan.max_cache_len)
