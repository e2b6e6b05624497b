"""The prefill + decode loop, one step function per backend.

A *stepper* maps ``(input_ids, position_ids, attention_mask, past)`` (numpy int64 arrays and a list
of cache arrays ``[k0, v0, k1, v1, ...]``) to ``(logits, present)``. The loop below feeds
``present`` back as ``past``, so every backend (PyTorch, ONNX Runtime, TensorRT) runs exactly the
same sequence of calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Cache = list[np.ndarray]
Stepper = Callable[[np.ndarray, np.ndarray, np.ndarray, Cache], tuple[np.ndarray, Cache]]


@dataclass
class Batch:
    """Left-padded prompts: padding on the left, positions counting from each prompt's first token."""

    input_ids: np.ndarray       # [batch, seq] int64
    attention_mask: np.ndarray  # [batch, seq] int64
    position_ids: np.ndarray    # [batch, seq] int64

    @classmethod
    def left_padded(cls, prompts: Sequence[Sequence[int]], pad_id: int = 0) -> Batch:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        width = max(len(p) for p in prompts)
        ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(prompts), width), dtype=np.int64)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = prompt
            mask[row, width - len(prompt):] = 1
        return cls(ids, mask, positions_from_mask(mask))


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    """Position of each token among its sequence's real tokens (padding gets 0)."""
    return np.clip(np.cumsum(mask, axis=-1) - 1, 0, None).astype(np.int64)


def empty_cache(num_layers: int, batch: int, kv_heads: int, head_dim: int, dtype=np.float32) -> Cache:
    return [np.zeros((batch, kv_heads, 0, head_dim), dtype=dtype) for _ in range(2 * num_layers)]


@dataclass
class StepResult:
    logits: list[np.ndarray]  # one [batch, seq, vocab] array per step (prefill first)
    tokens: np.ndarray        # [batch, steps] tokens fed at each decode step
    present: Cache            # final cache


def prefill_then_decode(step: Stepper, batch: Batch, cache: Cache, decode_tokens: np.ndarray | None = None,
                        steps: int = 0) -> StepResult:
    """Prefill the prompts, then ``steps`` decode steps of one token each.

    The token fed at each decode step comes from ``decode_tokens[:, i]`` when given (teacher forcing,
    so backends see identical inputs), else it is the greedy argmax of the previous logits.
    """
    logits, present = step(batch.input_ids, batch.position_ids, batch.attention_mask, cache)
    all_logits = [logits]
    mask = batch.attention_mask
    positions = batch.position_ids[:, -1:]
    fed = []
    for i in range(steps):
        token = decode_tokens[:, i:i + 1] if decode_tokens is not None else logits[:, -1:].argmax(-1)
        token = token.astype(np.int64)
        fed.append(token)
        mask = np.concatenate([mask, np.ones_like(token)], axis=1)
        positions = positions + 1
        logits, present = step(token, positions, mask, present)
        all_logits.append(logits)
    tokens = np.concatenate(fed, axis=1) if fed else np.zeros((len(mask), 0), dtype=np.int64)
    return StepResult(all_logits, tokens, present)


def torch_stepper(model) -> Stepper:
    """The fp32 PyTorch reference as a stepper."""
    import torch

    def step(input_ids, position_ids, attention_mask, past):
        with torch.no_grad():
            logits, present = model(torch.from_numpy(input_ids), torch.from_numpy(position_ids),
                                    torch.from_numpy(attention_mask), [torch.from_numpy(p) for p in past])
        return logits.numpy(), [p.numpy() for p in present]

    return step


def ort_stepper(session) -> Stepper:
    """An onnxruntime.InferenceSession on an llmtrt graph as a stepper."""
    names = [i.name for i in session.get_inputs()]
    cache_names = [n for n in names if n.startswith("past_key_values.")]
    dtypes = {i.name: _ORT_TYPES.get(i.type, np.float32) for i in session.get_inputs()}

    def step(input_ids, position_ids, attention_mask, past, write_indices=None):
        feeds = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": attention_mask}
        feeds.update({n: p.astype(dtypes[n], copy=False) for n, p in zip(cache_names, past, strict=False)})
        if write_indices is not None:
            feeds["write_indices"] = write_indices
        outs = session.run(None, feeds)
        return outs[0], outs[1:]

    return step


StaticStepper = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Cache], tuple[np.ndarray, Cache]]


def static_cache_adapter(step: StaticStepper, max_cache_len: int) -> Stepper:
    """Run a static-cache graph behind the growing-cache interface, so the same loop and checks apply.

    Each call lays ``past`` into a zeroed [batch, kv_heads, max_cache_len, head_dim] cache, marks the
    filled slots in a max_cache_len attention mask, writes the new rows at slot ``past`` (left
    padding keeps every row aligned) and returns the first past + seq slots of the updated cache.
    """

    def adapted(input_ids, position_ids, attention_mask, past):
        batch, seq = input_ids.shape
        total = attention_mask.shape[1]
        if total > max_cache_len:
            raise ValueError(f"{total} tokens do not fit a static cache of {max_cache_len}")
        cache = []
        for p in past:
            full = np.zeros((*p.shape[:2], max_cache_len, p.shape[3]), dtype=p.dtype)
            full[:, :, : p.shape[2]] = p
            cache.append(full)
        mask = np.zeros((batch, max_cache_len), dtype=np.int64)
        mask[:, :total] = attention_mask
        write_indices = np.full((batch,), total - seq, dtype=np.int64)
        logits, present = step(input_ids, position_ids, mask, write_indices, cache)
        return logits, [c[:, :, :total] for c in present]

    return adapted


def torch_static_stepper(model) -> StaticStepper:
    import torch

    def step(input_ids, position_ids, attention_mask, write_indices, cache):
        with torch.no_grad():
            logits, present = model(torch.from_numpy(input_ids), torch.from_numpy(position_ids),
                                    torch.from_numpy(attention_mask), [torch.from_numpy(c) for c in cache],
                                    torch.from_numpy(write_indices))
        return logits.numpy(), [p.numpy() for p in present]

    return step


def ort_static_stepper(session) -> StaticStepper:
    dynamic = ort_stepper(session)

    def step(input_ids, position_ids, attention_mask, write_indices, cache):
        return dynamic(input_ids, position_ids, attention_mask, cache, write_indices=write_indices)

    return step


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
