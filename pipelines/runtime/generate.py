"""Text generation with the KV cache from any runner: PyTorch model, ONNX Runtime, a TensorRT engine.

    with open_runner("out/onnx") as runner:                    # or PyTorchRunner(resolve_model("bytes-llama"))
        tok = load_tokenizer("out/onnx")
        result = generate(runner, tok, ["The for statement"], max_new_tokens=32)
    result.texts[0], result.stats.decode_tokens_per_s

The loop is the same for every runner (runtime/runners.py): prefill the (left-padded) prompts in one
call, then one token per call with the runner's cache. Tokens are greedy or temperature + top-p
samples from a seeded numpy Generator, so a seed reproduces a sample on every backend that computes
the same logits.
"""

from __future__ import annotations

import codecs
import json
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
# model facts: tokenizer source and EOS ids
# --------------------------------------------------------------------------------------------
def model_dir_for(artifact: str | Path) -> str:
    """What to hand ``load_tokenizer``: the ONNX directory (its manifest names the model) for any artifact."""
    from llmtrt.pipelines.runtime.artifact_runners import artifact_kind
    from llmtrt.pipelines.runtime.engine_runner import read_engine_manifest

    if artifact_kind(artifact) == "engine":
        return str(Path(read_engine_manifest(artifact)[1]["onnx"]).parent)
    return str(artifact)


def eos_token_ids(model: str | Path) -> list[int]:
    """``eos_token_id`` from generation_config.json (else config.json) of the checkpoint behind ``model``
    (a preset, an HF dir, or an artifact whose manifest names one); [] when there is none (bytes-llama)."""
    from llmtrt.exporter.config import resolve_model

    path = Path(model)
    spec = str(model)
    if path.is_dir() and (path / "manifest.json").is_file():
        spec = json.loads((path / "manifest.json").read_text(encoding="utf-8")).get("model_source") or ""
    try:
        checkpoint = resolve_model(spec).checkpoint_dir if spec else None
    except LlmtrtUserError:
        return []
    if checkpoint is None:
        return []
    for name in ("generation_config.json", "config.json"):
        file = checkpoint / name
        if not file.is_file():
            continue
        value = json.loads(file.read_text(encoding="utf-8")).get("eos_token_id")
        if value is not None:
            return [int(v) for v in (value if isinstance(value, list) else [value])]
    return []


# --------------------------------------------------------------------------------------------
# incremental detokenization
# --------------------------------------------------------------------------------------------
class TextStream:
    """Decode tokens as they arrive, never emitting half a character.

    Byte tokenizers go through an incremental UTF-8 decoder (an incomplete multi-byte sequence is
    held back until its last byte arrives); other tokenizers re-decode the whole sequence and emit
    the new suffix once it no longer ends in U+FFFD. ``finish()`` flushes, so the concatenated
    chunks equal ``tokenizer.decode(all ids)``.
    """

    def __init__(self, tokenizer: Any) -> None:
        from llmtrt.pipelines.runtime.tokenizer import ByteTokenizer

        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""
        self._bytes = codecs.getincrementaldecoder("utf-8")(errors="replace") \
            if isinstance(tokenizer, ByteTokenizer) else None

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        if self._bytes is not None:
            chunk = self._bytes.decode(bytes([int(token)]))
        else:
            text = self.tokenizer.decode(self.ids)
            if text.endswith("\ufffd") or not text.startswith(self.emitted):
                return ""
            chunk = text[len(self.emitted):]
        self.emitted += chunk
        return chunk

    def finish(self) -> str:
        if self._bytes is not None:
            chunk = self._bytes.decode(b"", final=True)
        else:
            text = self.tokenizer.decode(self.ids)
            chunk = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted += chunk
        return chunk


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
    texts: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "texts": self.texts, "stop_reasons": self.stop_reasons,
                **asdict(self.stats)}


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
                              "positions; shorten the prompt or re-export with a larger --max-seq")
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
             sampling: Sampling = Sampling(), eos_ids: Sequence[int] = (),
             on_text: Callable[[int, str], None] | None = None) -> Generation:
    """Text in, text out: encode, :func:`generate_ids`, decode. ``on_text(row, chunk)`` streams text."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    streams = [TextStream(tokenizer) for _ in prompts]

    def on_token(row: int, token: int) -> None:
        chunk = streams[row].push(token)
        if chunk and on_text is not None:
            on_text(row, chunk)

    result = generate_ids(runner, [tokenizer.encode(p) for p in prompts], max_new_tokens=max_new_tokens,
                          sampling=sampling, eos_ids=eos_ids, on_token=on_token)
    for row, stream in enumerate(streams):
        tail = stream.finish()
        if tail and on_text is not None:
            on_text(row, tail)
    result.texts = [tokenizer.decode(t) for t in result.tokens]
    return result
