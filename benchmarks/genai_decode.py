"""Decode with the onnxruntime-genai runtime on a graph its model builder wrote: the builder's graph as its
users run it (KV cache buffers shared between past and present, preallocated to max_length).

Runs in the benchmark environment (.venv-bench, which has onnxruntime_genai); benchmarks.run calls it as

    .venv-bench/bin/python -m benchmarks.genai_decode MODEL_DIR --prompt 128 --new 128 --repeats 3 --threads 2
    .venv-bench/bin/python -m benchmarks.genai_decode MODEL_DIR --serve --threads 2   # benchmarks.decode

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


def serve(model_dir: str, threads: int) -> None:
    """One model, many passes: for each line ``PROMPT NEW`` on stdin, one prefill + greedy decode, answered
    with one JSON line (seconds and process CPU seconds of the prefill and of the decode, the tokens, the
    prompt's last-position logits). What benchmarks.decode interleaves with our graphs' passes."""
    import sys

    import onnxruntime_genai as og

    config = og.Config(model_dir)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    with open(f"{model_dir}/genai_config.json") as f:
        vocab = json.load(f)["model"]["vocab_size"]
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        prompt_len, new_tokens = (int(x) for x in line.split())
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=prompt_len + new_tokens + 1, batch_size=1)
        generator = og.Generator(model, params)
        t0, c0 = time.perf_counter(), time.process_time()
        generator.append_tokens(prompt_ids(vocab, prompt_len))
        prefill_s, prefill_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        logits = generator.get_logits()
        generator.generate_next_token()  # argmax of the prefill's logits: no forward pass
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(new_tokens):
            generator.generate_next_token()
        decode_s, decode_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        tokens = [int(t) for t in generator.get_sequence(0)[prompt_len:prompt_len + new_tokens]]
        del generator
        print(json.dumps({"prefill_s": prefill_s, "prefill_cpu_s": prefill_cpu_s, "decode_s": decode_s,
                          "decode_cpu_s": decode_cpu_s, "tokens": tokens,
                          "prefill_logits_last": [float(x) for x in logits.reshape(-1)[-vocab:]]}), flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", help="a directory written by onnxruntime_genai.models.builder")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    ap.add_argument("--new", type=int, default=128, help="greedy tokens to decode")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", metavar="PREFIX", help="ORT profiling on; the trace is written to PREFIX_*.json")
    ap.add_argument("--serve", action="store_true", help="load once, then one pass per 'PROMPT NEW' line on stdin")
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.model_dir, args.threads)
        return
    print(json.dumps(measure(args.model_dir, args.prompt, args.new, args.repeats, args.threads, args.profile)))


if __name__ == "__main__":
    main()
