"""Greedy generation in onnxruntime-genai from an llmtrt artifact directory, as it is (genai_config.json +
tokenizer files written by `llmtrt export` / `llmtrt quantize`).

Runs in an environment that has onnxruntime_genai (the benchmarks' .venv-bench) and imports nothing of
llmtrt, so it can run where llmtrt is not installed:

    .venv-bench/bin/python tools/genai_generate.py out/onnx --prompt "Once upon a time" --new 32 --add-special-tokens
    .venv-bench/bin/python tools/genai_generate.py out/onnx --ids 1,403,407 --new 32

Prints one JSON line: prompt_ids (what genai's tokenizer made of --prompt, or --ids), tokens (the new
greedy ids, stopping at the model's EOS like genai does), text (genai's decoding of them), version.
"""

from __future__ import annotations

import argparse
import json


def generate(model_dir: str, prompt: str | None, ids: list[int] | None, new_tokens: int,
             add_special_tokens: bool = False) -> dict:
    import onnxruntime_genai as og

    model = og.Model(og.Config(model_dir))
    tokenizer = og.Tokenizer(model) if prompt is not None else None
    if tokenizer is not None and add_special_tokens:  # genai's default is off: no BOS
        tokenizer.update_options(add_special_tokens="true")
    prompt_ids = [int(t) for t in tokenizer.encode(prompt)] if tokenizer is not None else list(ids or [])
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt_ids) + new_tokens, batch_size=1)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt_ids)
    while not generator.is_done():
        generator.generate_next_token()
    sequence = [int(t) for t in generator.get_sequence(0)]
    tokens = sequence[len(prompt_ids):]
    with open(f"{model_dir}/genai_config.json", encoding="utf-8") as f:
        eos = json.load(f)["model"]["eos_token_id"]
    eos = set(eos if isinstance(eos, list) else [eos])
    if tokens and tokens[-1] in eos:  # genai keeps the EOS it stopped at; llmtrt does not count it
        tokens = tokens[:-1]
    text = tokenizer.decode(tokens) if tokenizer is not None else None
    return {"prompt_ids": prompt_ids, "tokens": tokens, "text": text,
            "onnxruntime_genai": getattr(og, "__version__", "?")}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", help="an llmtrt artifact directory with genai_config.json")
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="text, encoded by onnxruntime-genai's tokenizer from the artifact's files")
    group.add_argument("--ids", help="comma-separated prompt token ids (no tokenizer needed)")
    ap.add_argument("--new", type=int, default=32, help="most new tokens (fewer when EOS comes first)")
    ap.add_argument("--add-special-tokens", action="store_true",
                    help="let genai's tokenizer add BOS as tokenizer.json's post-processor does (genai's default: off)")
    args = ap.parse_args(argv)
    ids = [int(x) for x in args.ids.split(",")] if args.ids else None
    print(json.dumps(generate(args.model_dir, args.prompt, ids, args.new, args.add_special_tokens)))


if __name__ == "__main__":
    main()
