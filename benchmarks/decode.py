"""Decode timing: prefill latency and greedy tokens/s of our graphs (through llmtrt's ONNX Runtime runner)
and of transformers' eager PyTorch, on the same checkpoint and prompt."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from benchmarks.common import THREADS, median_time, prompt_ids


def ort_decode(onnx_path: Path, config, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    """Prefill latency and greedy decode tokens/s; ``_prefill_logits`` (last position) and ``_tokens`` (the
    greedy continuation) are returned for agreement checks between graphs and dropped from the report."""
    import numpy as np

    from llmtrt.pipelines.runtime.runners import OnnxRuntimeRunner

    prompt = prompt_ids(config.vocab_size, prompt_len)
    positions = np.arange(prompt_len, dtype=np.int64)[None]
    ones = np.ones_like(prompt)
    with OnnxRuntimeRunner(onnx_path, config, threads=THREADS) as runner:
        capacity = prompt_len + new_tokens
        first_logits = runner.step(prompt, positions, ones, runner.new_cache(1, capacity))  # warm-up
        prefill = median_time(lambda: runner.step(prompt, positions, ones, runner.new_cache(1, capacity)), repeats)
        tokens: list[int] = []

        def decode():
            tokens.clear()
            state = runner.new_cache(1, capacity)
            logits = runner.step(prompt, positions, ones, state)
            one = np.ones((1, 1), dtype=np.int64)
            t0 = time.perf_counter()
            for k in range(new_tokens):
                token = logits[:, -1:].argmax(-1).astype(np.int64)
                tokens.append(int(token[0, 0]))
                logits = runner.step(token, np.array([[prompt_len + k]], dtype=np.int64), one, state)
            return time.perf_counter() - t0

        seconds = statistics.median(decode() for _ in range(repeats))
    return {"prefill_ms": round(1000 * prefill, 2), "decode_tok_s": round(new_tokens / seconds, 2),
            "_prefill_logits": first_logits[0, -1], "_tokens": list(tokens)}


def torch_eager_decode(checkpoint_dir: Path, config, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(THREADS)
    model = LlamaForCausalLM.from_pretrained(str(checkpoint_dir), torch_dtype=torch.float32).eval()
    prompt = torch.from_numpy(prompt_ids(config.vocab_size, prompt_len))

    def prefill():
        with torch.no_grad():
            return model(prompt, use_cache=True)

    first_logits = prefill().logits[0, -1].numpy()
    prefill_s = median_time(prefill, repeats)
    tokens: list[int] = []

    def decode():
        tokens.clear()
        out = prefill()
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(new_tokens):
                token = out.logits[:, -1:].argmax(-1)
                tokens.append(int(token[0, 0]))
                out = model(token, past_key_values=out.past_key_values, use_cache=True)
        return time.perf_counter() - t0

    seconds = statistics.median(decode() for _ in range(repeats))
    return {"prefill_ms": round(1000 * prefill_s, 2), "decode_tok_s": round(new_tokens / seconds, 2),
            "_prefill_logits": first_logits, "_tokens": list(tokens)}


