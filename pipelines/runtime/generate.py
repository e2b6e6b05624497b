"""Text generation with the KV cache from any runner: PyTorch model, ONNX Runtime, a TensorRT engine.

    with open_runner("out/onnx") as runner:                    # or PyTorchRunner(resolve_model("bytes-llama"))
        tok = load_tokenizer("out/onnx")
        result = generate(runner, tok, ["The for statement"], max_new_tokens=32)
    result.texts[0], result.stats.decode_tokens_per_s

The loop is the same for every runner (runtime/runners.py): prefill the (left-padded) prompts in one
call, then one token per call with the runner's cache. Tokens are greedy or temperature + top-p
samples from a seeded numpy Generator, so a seed reproduces a sample on every backend that computes
the same logits. Prompts are encoded as the checkpoint does (BOS first when its tokenizer adds one,
or through its chat template) and the new tokens are detokenized incrementally after the prompt, so
the prompt's text plus the streamed text is the decoded sequence, spaces included.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmtrt.pipelines.errors import LlmtrtUserError
from llmtrt.pipelines.runtime.decoding import Batch
from llmtrt.pipelines.runtime.runners import DecoderRunner

STOP_REASONS = ("max_new_tokens", "eos", "max_positions")


# --------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampling:
    """Greedy (argmax) or temperature + nucleus (top-p) sampling with a seeded numpy Generator."""

    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.greedy:
            if not self.temperature > 0:
                raise LlmtrtUserError(f"--temperature must be > 0, got {self.temperature} (use --greedy for argmax)")
            if not 0 < self.top_p <= 1:
                raise LlmtrtUserError(f"--top-p must be in (0, 1], got {self.top_p}")

    def chooser(self) -> Callable[[np.ndarray], np.ndarray]:
        """A function from last-position logits [batch, vocab] to tokens [batch] (stateful when sampling)."""
        if self.greedy:
            return lambda logits: logits.argmax(-1).astype(np.int64)
        rng = np.random.default_rng(self.seed)

        def sample(logits: np.ndarray) -> np.ndarray:
            z = logits.astype(np.float64) / self.temperature
            probs = np.exp(z - z.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            out = np.empty(len(probs), dtype=np.int64)
            for row, p in enumerate(probs):
                order = np.argsort(-p, kind="stable")  # ties keep the lower id first, like argmax
                cumulative = np.cumsum(p[order])
                # smallest prefix whose mass reaches top_p (the cumsum may end a hair below 1.0)
                keep = min(int(np.searchsorted(cumulative, self.top_p)) + 1, len(p))
                kept = p[order[:keep]]
                out[row] = order[rng.choice(keep, p=kept / kept.sum())]
            return out

        return sample


# --------------------------------------------------------------------------------------------
# the tokenizer behind an artifact
# --------------------------------------------------------------------------------------------
def model_dir_for(artifact: str | Path) -> str:
    """What to hand ``load_tokenizer``: the ONNX directory (its manifest names the model) for any artifact."""
    from llmtrt.pipelines.runtime.artifact_runners import artifact_kind
    from llmtrt.pipelines.runtime.engine_runner import read_engine_manifest

    if artifact_kind(artifact) == "engine":
        return str(Path(read_engine_manifest(artifact)[1]["onnx"]).parent)
    return str(artifact)


# --------------------------------------------------------------------------------------------
# the decode loop
# --------------------------------------------------------------------------------------------
@dataclass
class GenerationStats:
    prompt_tokens: int             # real (unpadded) prompt tokens over the batch
    new_tokens: int                # generated tokens over the batch (EOS not counted)
    prefill_ms: float
    decode_ms: float
    decode_steps: int              # one-token forward calls after prefill
    prefill_tokens_per_s: float
    decode_tokens_per_s: float     # batch * decode_steps / decode time


@dataclass
class Generation:
    tokens: list[list[int]]        # new tokens per prompt, EOS excluded
    stop_reasons: list[str]        # per prompt: max_new_tokens | eos | max_positions
    stats: GenerationStats
    texts: list[str] = field(default_factory=list)         # the text the new tokens add, per prompt
    prompt_ids: list[list[int]] = field(default_factory=list)   # what the model read (BOS, chat template)
    prompt_texts: list[str] = field(default_factory=list)  # decode(prompt ids): the prompt as the model saw it

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "texts": self.texts, "stop_reasons": self.stop_reasons,
                "prompt_ids": self.prompt_ids, **asdict(self.stats)}


def generate_ids(runner: DecoderRunner, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                 sampling: Sampling = Sampling(), eos_ids: Sequence[int] = (), pad_id: int = 0,
                 on_token: Callable[[int, int], None] | None = None, warmup: bool = True) -> Generation:
    """Decode ``max_new_tokens`` tokens for each prompt (left-padded into one batch) with the KV cache.

    A row stops at an EOS id (not included in its tokens) or when the cache is full
    (``runner.max_positions``); the loop ends when every row has stopped. ``on_token(row, token)``
    is called for each kept token as soon as it is chosen (streaming). ``warmup`` runs one untimed
    one-token forward first, so the timings measure steady state, not lazy initialization.
    """
    if max_new_tokens < 1:
        raise LlmtrtUserError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LlmtrtUserError("every prompt needs at least one token (an empty --prompt has none)")
    cfg = runner.config
    bad = sorted({t for p in prompts for t in p if not 0 <= t < cfg.vocab_size})
    if bad:
        raise LlmtrtUserError(f"prompt token ids {bad[:5]} are outside the model's vocabulary (0..{cfg.vocab_size - 1})")
    batch = Batch.left_padded(prompts, pad_id)
    width = batch.input_ids.shape[1]
    if width > runner.max_positions:
        raise LlmtrtUserError(f"the prompt is {width} tokens but {runner.description} holds {runner.max_positions} "
                              "positions; shorten the prompt or re-export with a larger --max-positions")
    # the last chosen token is never fed back, so a full cache still yields one more token
    budget = min(max_new_tokens, runner.max_positions - width + 1)
    capacity = min(runner.max_positions, width + budget - 1)
    choose = sampling.chooser()
    eos = {int(e) for e in eos_ids}
    rows = len(prompts)
    if warmup:
        one = np.zeros((1, 1), dtype=np.int64)
        runner.step(one, one, np.ones_like(one), runner.new_cache(1, 1))
    tokens: list[list[int]] = [[] for _ in range(rows)]
    reasons = [""] * rows

    t0 = time.perf_counter()
    state = runner.new_cache(rows, capacity)
    logits = runner.step(batch.input_ids, batch.position_ids, batch.attention_mask, state)
    prefill_s = time.perf_counter() - t0
    positions = batch.position_ids[:, -1:]
    t1 = time.perf_counter()
    steps = 0
    while True:
        chosen = choose(logits[:, -1])
        for row, token in enumerate(chosen.tolist()):
            if reasons[row]:
                continue
            if token in eos:
                reasons[row] = "eos"
                continue
            tokens[row].append(token)
            if on_token is not None:
                on_token(row, token)
            if len(tokens[row]) == max_new_tokens:
                reasons[row] = "max_new_tokens"
            elif len(tokens[row]) == budget:
                reasons[row] = "max_positions"
        if all(reasons):
            break
        fed = chosen.reshape(rows, 1).astype(np.int64)
        positions = positions + 1
        logits = runner.step(fed, positions, np.ones_like(fed), state)
        steps += 1
    decode_s = time.perf_counter() - t1

    prompt_tokens = int(batch.attention_mask.sum())
    stats = GenerationStats(
        prompt_tokens=prompt_tokens, new_tokens=sum(len(t) for t in tokens),
        prefill_ms=round(prefill_s * 1e3, 3), decode_ms=round(decode_s * 1e3, 3), decode_steps=steps,
        prefill_tokens_per_s=round(prompt_tokens / prefill_s, 1) if prefill_s > 0 else 0.0,
        decode_tokens_per_s=round(rows * steps / decode_s, 1) if steps and decode_s > 0 else 0.0)
    return Generation(tokens, reasons, stats)


def generate(runner: DecoderRunner, tokenizer: Any, prompts: str | Sequence[str], *, max_new_tokens: int = 64,
             sampling: Sampling = Sampling(), eos_ids: Sequence[int] | None = None, chat: bool = False,
             on_text: Callable[[int, str], None] | None = None) -> Generation:
    """Text in, text out: encode as the checkpoint does, :func:`generate_ids`, detokenize incrementally.

    Each prompt becomes ``tokenizer.prompt_ids`` (BOS first when the checkpoint adds it) or, with
    ``chat``, a one-turn conversation through the checkpoint's chat template. Generation stops at any
    of ``eos_ids`` (default: the checkpoint's EOS ids). ``on_text(row, chunk)`` streams text;
    ``result.prompt_texts[i] + result.texts[i] == tokenizer.decode(prompt ids + new ids)``.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    encoded = [tokenizer.chat_ids(p) if chat else tokenizer.prompt_ids(p) for p in prompts]
    streams = [tokenizer.stream(ids) for ids in encoded]
    texts = [""] * len(prompts)

    def emit(row: int, chunk: str) -> None:
        texts[row] += chunk
        if chunk and on_text is not None:
            on_text(row, chunk)

    result = generate_ids(runner, encoded, max_new_tokens=max_new_tokens, sampling=sampling,
                          eos_ids=tokenizer.eos_ids if eos_ids is None else eos_ids,
                          pad_id=tokenizer.pad_id or 0,
                          on_token=lambda row, token: emit(row, streams[row].push(token)))
    for row, stream in enumerate(streams):
        emit(row, stream.finish())
    result.texts = texts
    result.prompt_ids = encoded
    result.prompt_texts = [tokenizer.decode(ids) for ids in encoded]
    return result
