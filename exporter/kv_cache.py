"""KV-cache layouts: one registry entry per layout, everything that differs between them in one place.

    layout = get_layout("static")
    layout.io_spec(config)                       # graph inputs/outputs and their symbolic dims
    layout.step_inputs(new_mask, state)          # attention_mask (+ write_indices) for one decode step
    layout.default_profiles(1, 512, 2048)        # TensorRT prefill and decode shape ranges

``dynamic``: the cache grows. ``past_key_values.{i}.*`` are ``[batch, kv_heads, past, head_dim]``, the
graph concatenates the new rows and returns ``present.{i}.*`` of ``past + seq`` rows; the attention
mask spans ``past + seq``. What ONNX Runtime (GenAI) graphs use.

``static``: a fixed ``[batch, kv_heads, max_cache_length, head_dim]`` cache that the graph updates in
place at ``write_indices [batch]`` (opset-24 TensorScatter, TensorRT's KV_CACHE_UPDATE: no per-step
concatenation, buffers can be aliased); the mask spans the whole cache and marks filled slots.

A runner keeps a :class:`CacheState` between steps: the cache tensors (host arrays or device
buffers, the runner's business) and the host mask of the positions cached so far. Left padding keeps
every row of a batch at the same length, so one ``write_indices`` value serves the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from llmtrt.exporter.config import ModelConfig
from llmtrt.exporter.errors import LlmtrtUserError
from llmtrt.exporter.iospec import BATCH, MAX_CACHE, PAST, SEQ, TOTAL, IOSpec, TensorSpec


# --------------------------------------------------------------------------------------------
# shape ranges (TensorRT optimization profiles)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Range:
    """min <= opt <= max for one dimension."""

    min: int
    opt: int
    max: int

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.min, self.opt, self.max)

    def __add__(self, other: Range) -> Range:
        return Range(self.min + other.min, self.opt + other.opt, self.max + other.max)


@dataclass(frozen=True)
class Profile:
    """One optimization profile: ranges for batch and new tokens (seq), plus either cached tokens
    (``past``, dynamic layout) or the fixed cache length (``cache``, static layout)."""

    name: str
    batch: Range
    seq: Range
    past: Range | None = None
    cache: int | None = None

    def __post_init__(self) -> None:
        if (self.past is None) == (self.cache is None):
            raise ValueError(f"profile {self.name!r}: give exactly one of past (dynamic cache) or cache (static)")

    @property
    def layout(self) -> str:
        return "static" if self.cache is not None else "dynamic"

    @property
    def total(self) -> Range:
        """Tokens the attention mask spans: past + seq, or the whole fixed cache."""
        if self.cache is not None:
            return Range(self.cache, self.cache, self.cache)
        return self.past + self.seq

    def ranges(self) -> dict[str, Range]:
        if self.cache is not None:
            return {"batch": self.batch, "seq": self.seq, "cache": self.total}
        return {"batch": self.batch, "seq": self.seq, "past": self.past, "total": self.total}

    def to_dict(self) -> dict:
        if self.cache is not None:
            return {"name": self.name, "kv_cache": self.layout, "batch": asdict(self.batch), "seq": asdict(self.seq),
                    "max_cache_length": self.cache}
        return {"name": self.name, "kv_cache": self.layout, **{k: asdict(v) for k, v in self.ranges().items()}}


# --------------------------------------------------------------------------------------------
# the state a runner keeps between steps
# --------------------------------------------------------------------------------------------
@dataclass
class CacheState:
    """The KV cache between calls: backend tensors [k0, v0, k1, v1, ...] and the host mask of the
    positions cached so far ([batch, length] int64, 0 for left padding)."""

    tensors: list[Any]
    mask: np.ndarray
    capacity: int           # positions the cache can hold (static: its slots)
    backend: Any = None     # what a runner keeps with this cache (ONNX Runtime: the IO binding of its buffers)

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    @property
    def batch(self) -> int:
        return int(self.mask.shape[0])


@dataclass(frozen=True)
class KVLayout:
    """Everything that differs between cache layouts."""

    name: str
    summary: str
    cache_dim: str                   # symbolic name of the cache tensors' sequence axis
    present_dim: str
    mask_dim: str
    extra_inputs: tuple[str, ...]    # graph inputs besides ids, positions, mask and the cache
    min_standard_opset: int          # the standard dialect needs TensorScatter (24) for a static cache
    fixed_capacity: bool             # the cache tensors are allocated at full capacity up front
    _profiles: Callable[..., tuple[Profile, Profile]] = field(repr=False, default=None)

    # -- the graph ----------------------------------------------------------------------------
    def io_spec(self, config: ModelConfig, cache_dtype: str = "float32", logits_dtype: str = "float32",
                logits: str = "all") -> IOSpec:
        """``logits``: "all" ([batch, seq, vocab]) or "last" ([batch, 1, vocab]: the last position only)."""
        kv = (BATCH, config.num_key_value_heads, self.cache_dim, config.head_dim)
        present = (BATCH, config.num_key_value_heads, self.present_dim, config.head_dim)
        inputs = [TensorSpec("input_ids", "int64", (BATCH, SEQ)), TensorSpec("position_ids", "int64", (BATCH, SEQ)),
                  TensorSpec("attention_mask", "int64", (BATCH, self.mask_dim))]
        outputs = [TensorSpec("logits", logits_dtype, (BATCH, SEQ if logits == "all" else 1, config.vocab_size))]
        for i in range(config.num_hidden_layers):
            for kind in ("key", "value"):
                inputs.append(TensorSpec(f"past_key_values.{i}.{kind}", cache_dtype, kv))
                outputs.append(TensorSpec(f"present.{i}.{kind}", cache_dtype, present))
        inputs += [TensorSpec(name, "int64", (BATCH,)) for name in self.extra_inputs]
        return IOSpec(tuple(inputs), tuple(outputs))

    def sample_inputs(self, config: ModelConfig, batch: int = 2, seq: int = 3, past: int = 4, slots: int = 9):
        """Capture arguments of LlamaDecoder.forward; sizes > 1 and distinct so every dim stays symbolic."""
        import torch

        cache_len = slots if self.fixed_capacity else past
        mask_len = slots if self.fixed_capacity else past + seq
        args = [torch.zeros(batch, seq, dtype=torch.int64),
                torch.arange(past, past + seq, dtype=torch.int64).expand(batch, seq).contiguous(),
                torch.ones(batch, mask_len, dtype=torch.int64),
                [torch.zeros(batch, config.num_key_value_heads, cache_len, config.head_dim)
                 for _ in range(2 * config.num_hidden_layers)]]
        if "write_indices" in self.extra_inputs:
            args.append(torch.full((batch,), past, dtype=torch.int64))
        return tuple(args)

    def dynamic_shapes(self, n_cache: int) -> dict[str, Any]:
        import torch

        dim = torch.export.Dim
        batch, seq, cache = dim(BATCH), dim(SEQ), dim(self.cache_dim)
        mask = cache if self.mask_dim == self.cache_dim else dim(self.mask_dim)
        shapes = {"input_ids": {0: batch, 1: seq}, "position_ids": {0: batch, 1: seq},
                  "attention_mask": {0: batch, 1: mask}, "past_key_values": [{0: batch, 2: cache}] * n_cache}
        shapes.update({name: {0: batch} for name in self.extra_inputs})
        return shapes

    # -- running --------------------------------------------------------------------------------
    def cache_shape(self, config: ModelConfig, batch: int, capacity: int) -> tuple[int, int, int, int]:
        """Shape of each cache tensor before the first step (empty, or all slots)."""
        return (batch, config.num_key_value_heads, capacity if self.fixed_capacity else 0, config.head_dim)

    def step_inputs(self, new_mask: np.ndarray, state: CacheState) -> dict[str, np.ndarray]:
        """attention_mask (+ write_indices) for a step adding ``new_mask.shape[1]`` tokens to ``state``."""
        total = np.concatenate([state.mask, new_mask.astype(np.int64)], axis=1)
        if total.shape[1] > state.capacity:
            raise LlmtrtUserError(f"{total.shape[1]} positions do not fit the cache's {state.capacity}; "
                                  "shorten the prompt or output, or use a larger cache")
        if not self.fixed_capacity:
            return {"attention_mask": total}
        mask = np.zeros((total.shape[0], state.capacity), dtype=np.int64)
        mask[:, :total.shape[1]] = total
        return {"attention_mask": mask, "write_indices": np.full((total.shape[0],), state.length, dtype=np.int64)}

    def host_view(self, tensor: np.ndarray, length: int) -> np.ndarray:
        """The cached positions of one cache tensor (static: the first ``length`` slots)."""
        return tensor[:, :, :length] if self.fixed_capacity else tensor

    def default_profiles(self, max_batch: int, max_prompt: int, max_kv: int) -> tuple[Profile, Profile]:
        """(prefill, decode) profiles; ``max_kv`` is the most cached tokens (static: the slots)."""
        return self._profiles(max_batch, max_prompt, max_kv)


def _dynamic_profiles(max_batch: int, max_prompt: int, max_kv: int) -> tuple[Profile, Profile]:
    batch = Range(1, max_batch, max_batch)
    return (Profile("prefill", batch, Range(1, max_prompt, max_prompt), Range(0, 0, 0)),
            Profile("decode", batch, Range(1, 1, 1), Range(1, max(1, max_kv // 2), max_kv)))


def _static_profiles(max_batch: int, max_prompt: int, max_kv: int) -> tuple[Profile, Profile]:
    batch = Range(1, max_batch, max_batch)
    return (Profile("prefill", batch, Range(1, max_prompt, max_prompt), cache=max_kv),
            Profile("decode", batch, Range(1, 1, 1), cache=max_kv))


LAYOUTS: dict[str, KVLayout] = {
    "dynamic": KVLayout("dynamic", "past in, past + seq out (ONNX Runtime)", PAST, TOTAL, TOTAL, (), 23, False,
                        _dynamic_profiles),
    "static": KVLayout("static", "fixed-size cache updated in place at write_indices (TensorRT KV-cache update)",
                       MAX_CACHE, MAX_CACHE, MAX_CACHE, ("write_indices",), 24, True, _static_profiles),
}


def layout_of_inputs(names: set[str] | list[str]) -> KVLayout:
    """The layout a graph with these input names was exported with."""
    names = set(names)
    return max((lay for lay in LAYOUTS.values() if set(lay.extra_inputs) <= names), key=lambda lay: len(lay.extra_inputs))


def get_layout(name: str, where: str = "--kv-cache") -> KVLayout:
    try:
        return LAYOUTS[name]
    except (KeyError, TypeError):
        raise LlmtrtUserError(f"{where} {name!r} is not a KV-cache layout; use one of {', '.join(LAYOUTS)}") from None
