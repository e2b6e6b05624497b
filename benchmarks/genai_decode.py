"""Decode with the onnxruntime-genai runtime on a graph its model builder wrote: the builder's graph as its
users run it (KV cache buffers shared between past and present, preallocated to max_length).

Runs in the benchmark environment (.venv-bench, which has onnxruntime_genai); benchmarks.run calls it as

    .venv-bench/bin/python -m benchmarks.genai_decode MODEL_DIR --prompt 128 --new 128 --repeats 3 --threads 2

and reads the one JSON line it prints: prefill_ms (append_tokens of the prompt: one forward pass),
decode_tok_s (greedy, one forward + argmax per token), tokens (the greedy continuation),
prefill_logits_last (the prompt's last-position logits, for the agreement check). The prompt is
the same ids benchmarks.run feeds every other graph.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def prompt_ids(vocab: int, n: int) -> list[int]:
    return [k * 7919 % vocab for k in range(n)]


def measure(model_dir: str, prompt_len: int, new_tokens: int, repeats: int, threads: int,
            profile_prefix: str | None = None) -> dict:
    import onnxruntime_genai as og

    config = og.Config(model_dir)
    session_options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    if profile_prefix:
        session_options["enable_profiling"] = profile_prefix  # ORT writes PREFIX_<date>.json when the model closes
    config.overlay(json.dumps({"model": {"decoder": {"session_options": session_options}}}))
    model = og.Model(config)
    with open(f"{model_dir}/genai_config.json") as f:
        vocab = json.load(f)["model"]["vocab_size"]
    prompt = prompt_ids(vocab, prompt_len)
    prefills, decodes, tokens = [], [], []
    for _ in range(repeats + 1):  # the first pass warms up
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=prompt_len + new_tokens + 1, batch_size=1)
        generator = og.Generator(model, params)
        t0 = time.perf_counter()
        generator.append_tokens(prompt)  # runs the prompt through the model
        prefills.append(time.perf_counter() - t0)
        logits = generator.get_logits()  # [batch, 1, vocab]: the prompt's last position
        generator.generate_next_token()  # argmax of the prefill's logits: no forward pass
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            generator.generate_next_token()  # forward on the last token, then argmax
        decodes.append(time.perf_counter() - t0)
        tokens = [int(t) for t in generator.get_sequence(0)[prompt_len:prompt_len + new_tokens]]
        del generator
    del model  # closes the session: flushes the profile
    measured = slice(1, None) if repeats else slice(None)  # --repeats 0 (profiling): the one pass is all there is
    return {"prefill_ms": round(1000 * statistics.median(prefills[measured]), 2),
            "decode_tok_s": round(new_tokens / statistics.median(decodes[measured]), 2), "tokens": tokens,
            "prefill_logits_last": [float(x) for x in logits.reshape(-1)[-vocab:]],
            "onnxruntime_genai": og.__version__ if hasattr(og, "__version__") else "?"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", help="a directory written by onnxruntime_genai.models.builder")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    ap.add_argument("--new", type=int, default=128, help="greedy tokens to decode")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", metavar="PREFIX", help="ORT profiling on; the trace is written to PREFIX_*.json")
    args = ap.parse_args(argv)
    print(json.dumps(measure(args.model_dir, args.prompt, args.new, args.repeats, args.threads, args.profile)))


if __name__ == "__main__":
    main()
