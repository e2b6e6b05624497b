"""The prefill + decode loop, the same for every runner (runtime/runners.py).

    batch = Batch.left_padded([[5, 6, 7], [8, 9]])
    with runner:
        result = prefill_then_decode(runner, batch, steps=4)      # greedy
    result.logits[0]      # prefill logits [batch, seq, vocab]; result.logits[i]: decode step i
    result.present        # the final cache on the host, [k0, v0, ...] of past + steps positions

Left padding keeps every row at the same length, so a batch advances one position per step for all
rows; positions count each row's real tokens from 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


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

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def width(self) -> int:
        return int(self.input_ids.shape[1])

    def extended(self, tokens: np.ndarray) -> Batch:
        """These prompts followed by ``tokens`` [batch, n] as one left-padded prefill."""
        ids = np.concatenate([self.input_ids, tokens.astype(np.int64)], axis=1)
        mask = np.concatenate([self.attention_mask, np.ones_like(tokens, dtype=np.int64)], axis=1)
        return Batch(ids, mask, positions_from_mask(mask))


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    """Position of each token among its sequence's real tokens (padding gets 0)."""
    return np.clip(np.cumsum(mask, axis=-1) - 1, 0, None).astype(np.int64)


@dataclass
class StepResult:
    logits: list[np.ndarray]  # one [batch, seq, vocab] array per call (prefill first)
    tokens: np.ndarray        # [batch, steps] tokens fed at each decode step
    present: list[np.ndarray]  # the final cache on the host


def prefill_then_decode(runner, batch: Batch, decode_tokens: np.ndarray | None = None, steps: int = 0,
                        capacity: int | None = None) -> StepResult:
    """Prefill the prompts, then ``steps`` decode steps of one token each (the runner must be active).

    The token fed at each decode step is ``decode_tokens[:, i]`` when given (teacher forcing, so every
    backend sees identical inputs), else the greedy argmax of the previous logits. ``capacity``
    (default: prompt + steps) sizes the cache.
    """
    state = runner.new_cache(batch.rows, capacity or batch.width + steps)
    logits = runner.step(batch.input_ids, batch.position_ids, batch.attention_mask, state)
    all_logits = [logits]
    positions = batch.position_ids[:, -1:]
    fed = []
    for i in range(steps):
        token = decode_tokens[:, i:i + 1] if decode_tokens is not None else logits[:, -1:].argmax(-1)
        token = np.ascontiguousarray(token, dtype=np.int64)
        fed.append(token)
        positions = positions + 1
        logits = runner.step(token, positions, np.ones_like(token), state)
        all_logits.append(logits)
    tokens = np.concatenate(fed, axis=1) if fed else np.zeros((batch.rows, 0), dtype=np.int64)
    return StepResult(all_logits, tokens, runner.cache_on_host(state))


def forward(runner, batch: Batch) -> np.ndarray:
    """Logits of one prefill over the whole batch from an empty cache (scoring, KV-cache checks)."""
    state = runner.new_cache(batch.rows, batch.width)
    return runner.step(batch.input_ids, batch.position_ids, batch.attention_mask, state)
