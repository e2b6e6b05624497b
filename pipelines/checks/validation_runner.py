"""One Polygraphy iteration = one whole generation check, run by any backend runner.

:class:`ValidationRunner` wraps a runner of runtime/runners.py. Its feed dict is the graph's
prefill feed (``input_ids``, ``position_ids``, ``attention_mask``, empty ``past_key_values.*``, and
``write_indices`` for a static cache); it runs prefill + ``M`` decode steps, teacher-forced on the
same ``decode_tokens`` for every backend, plus one forward over all ``N + M`` tokens, and returns

    logits.prefill      [batch, N, vocab]      padding rows zeroed
    logits.decode.{i}   [batch, 1, vocab]      i = 1..M
    logits.one_pass     [batch, M + 1, vocab]  one forward over N + M tokens, at the positions that
                                               prefill's last token and each decode step predict from

A graph exported with ``--logits last`` (and the reference run like it) returns the last position
only, so there ``logits.prefill`` is [batch, 1, vocab] and ``logits.one_pass`` [batch, 1, vocab]: the
last decode step's prediction, made in one pass.
    present.{i}.key|value                      the cache after the last decode step, padding zeroed

so Polygraphy's comparison functions see every step by name, and the KV-cache consistency check
(prefill + decode == one pass) is a comparison within one runner's outputs. Left-padding positions
are zeroed: their values are not part of the model's semantics and backends legitimately differ there.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from polygraphy.backend.base import BaseRunner

from llmtrt.exporter.config import ModelConfig
from llmtrt.exporter.kv_cache import KVLayout
from llmtrt.pipelines.runtime.decoding import Batch, forward, prefill_then_decode

PREFILL = "logits.prefill"
ONE_PASS = "logits.one_pass"


def decode_name(step: int) -> str:
    return f"logits.decode.{step}"


@dataclass(frozen=True)
class DecodePlan:
    """What every runner does after the prefill feed: the same tokens, the same cache capacity."""

    decode_tokens: np.ndarray  # [batch, M] int64, fed one per decode step (teacher forcing)
    capacity: int              # cache positions (>= N + M)

    @property
    def steps(self) -> int:
        return int(self.decode_tokens.shape[1])


def prefill_feed(batch: Batch, config: ModelConfig, layout: KVLayout, plan: DecodePlan,
                 cache_dtype=np.float32) -> OrderedDict:
    """The graph's feed dict for the prefill step (an empty dynamic cache, or a zeroed static one)."""
    from llmtrt.exporter.kv_cache import CacheState

    state = CacheState([], np.zeros((batch.rows, 0), dtype=np.int64), plan.capacity)
    feed = OrderedDict(input_ids=batch.input_ids, position_ids=batch.position_ids)
    inputs = layout.step_inputs(batch.attention_mask, state)
    feed["attention_mask"] = inputs.pop("attention_mask")
    shape = layout.cache_shape(config, batch.rows, plan.capacity)
    for i in range(config.num_hidden_layers):
        for kv in ("key", "value"):
            feed[f"past_key_values.{i}.{kv}"] = np.zeros(shape, dtype=cache_dtype)
    feed.update(inputs)
    return feed


def batch_from_feed(feed: dict[str, np.ndarray]) -> Batch:
    """The prompts a prefill feed dict holds (inverse of ``prefill_feed``); refuses a non-empty past."""
    ids = np.asarray(feed["input_ids"], dtype=np.int64)
    seq = ids.shape[1]
    mask = np.asarray(feed["attention_mask"], dtype=np.int64)
    if "write_indices" in feed:
        if np.any(np.asarray(feed["write_indices"]) != 0) or np.any(mask[:, seq:]):
            raise ValueError("a validation feed must be a prefill step: write_indices 0 and nothing cached")
        mask = mask[:, :seq]
    elif mask.shape[1] != seq:
        raise ValueError(f"a validation feed must be a prefill step: attention_mask covers {mask.shape[1]} "
                         f"tokens but input_ids has {seq}")
    return Batch(ids, mask, np.asarray(feed["position_ids"], dtype=np.int64))


class ValidationRunner(BaseRunner):
    """Runs a backend runner through prefill + decode + one pass for each Polygraphy iteration."""

    def __init__(self, runner, plan: DecodePlan, input_metadata) -> None:
        super().__init__(name=runner.name, prefix="llmtrt-validation")
        self.runner, self.plan = runner, plan
        self.input_metadata = input_metadata  # the artifact graph's: every runner takes the same feed
        self.description = runner.description

    def activate_impl(self) -> None:
        self.runner.activate()

    def deactivate_impl(self) -> None:
        self.runner.deactivate()

    def get_input_metadata_impl(self):
        return self.input_metadata

    def infer_impl(self, feed_dict):
        batch = batch_from_feed(feed_dict)
        start = time.perf_counter()
        result = prefill_then_decode(self.runner, batch, self.plan.decode_tokens, steps=self.plan.steps,
                                     capacity=self.plan.capacity)
        full = batch.extended(self.plan.decode_tokens)
        full_logits = forward(self.runner, full)
        self.inference_time = time.perf_counter() - start
        n = batch.width
        outputs = OrderedDict()
        prefill = result.logits[0]  # every position, or the last one (the mask's last columns line up)
        outputs[PREFILL] = _f32(prefill) * batch.attention_mask[:, n - prefill.shape[1]:, None]
        outputs["logits"] = _f32(prefill)  # the graph's own output name, for `polygraphy run`
        for i, logits in enumerate(result.logits[1:], start=1):
            outputs[decode_name(i)] = _f32(logits)
        outputs[ONE_PASS] = _f32(full_logits[:, -(self.plan.steps + 1):])
        real = full.attention_mask[:, None, :, None].astype(np.float32)
        for i in range(self.runner.config.num_hidden_layers):
            outputs[f"present.{i}.key"] = _f32(result.present[2 * i]) * real
            outputs[f"present.{i}.value"] = _f32(result.present[2 * i + 1]) * real
        return outputs


def _f32(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(array, dtype=np.float32))
