"""``llmtrt generate``: text from an ONNX directory, a TensorRT engine directory or the PyTorch model."""

from __future__ import annotations

import json

import click

from llmtrt.pipelines.cli import main, user_errors
from llmtrt.pipelines.errors import LlmtrtUserError
from llmtrt.pipelines.runtime import huge_pages as hp


@main.command()
@click.argument("artifact", required=False, type=click.Path(file_okay=False))
@click.option("--model", "model_spec", default=None, metavar="PRESET|DIR",
              help="Generate with the fp32 PyTorch model (the reference) instead of an artifact: a preset name "
                   "(bytes-llama, tiny, ...) or an HF checkpoint directory.")
@click.option("--prompt", required=True, help="Text to continue, encoded as the checkpoint does: its tokenizer.json "
                                              "(BOS first when its tokenizer_config.json / tokenizer.json adds one), "
                                              "bytes for bytes-llama.")
@click.option("--no-bos", is_flag=True, help="Do not put the BOS token before the prompt even if the checkpoint adds it.")
@click.option("--chat", is_flag=True, help="Send PROMPT as a user turn through the checkpoint's chat template "
                                           "(tokenizer_config.json chat_template or chat_template.jinja); "
                                           "prints the reply only.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True,
              help="Stop after this many new tokens (earlier at EOS or when the graph's positions run out).")
@click.option("--greedy/--sample", default=True, show_default=True,
              help="--greedy: argmax every step; --sample: temperature + top-p sampling (implied by "
                   "--temperature/--top-p).")
@click.option("--temperature", type=float, default=None, help="Sampling temperature (> 0; default 1.0). Implies --sample.")
@click.option("--top-p", type=float, default=None,
              help="Nucleus sampling: keep the smallest set of tokens whose probability reaches P "
                   "(0 < P <= 1; default 1.0). Implies --sample.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampler (same seed, same text).")
@click.option("--stream", is_flag=True, help="Print text as it is produced.")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="ONNX Runtime execution provider for an ONNX ARTIFACT (auto: CUDA when available).")
@click.option("--precision", default=None,
              help="Which engine of an engine directory holding several (engine.<precision>.plan).")
@click.option("--huge-pages/--no-huge-pages", default=None,
              help="ONNX Runtime on the CPU: move the session's weights onto 2 MiB pages once it is open. "
                   "156M on a 2-core VM: decode 1-12% faster (int4 least), open 0.05-1.8 s slower "
                   "(0.1-0.5 GB moved). Default: "
                   f"on from --max-new-tokens {hp.HUGE_PAGES_FROM_TOKENS}; $LLMTRT_HUGE_PAGES=1/0 sets it.")
@click.option("--json", "as_json", is_flag=True,
              help="Print only a JSON summary (text, new_tokens, prefill_ms, prefill_tokens_per_s, "
                   "decode_tokens_per_s, stop_reason, ...).")
@user_errors
def generate(artifact: str | None, model_spec: str | None, prompt: str, no_bos: bool, chat: bool,
             max_new_tokens: int, greedy: bool,
             temperature: float | None, top_p: float | None, seed: int, stream: bool, provider: str,
             precision: str | None, huge_pages: bool | None, as_json: bool) -> None:
    """Continue PROMPT with the KV cache: prefill the prompt, then one token per step.

    ARTIFACT is a directory written by `llmtrt export` / the precision stage (manifest.json; run with
    ONNX Runtime) or by `llmtrt build` (engine.<precision>.plan + .json; run with TensorRT, needs a
    GPU). With --model instead, the fp32 PyTorch model generates (the reference the others must match
    token for token when greedy). Generation stops at any EOS id of the checkpoint's
    generation_config.json. stdout is the prompt as the model read it followed by the new text, which
    is the whole sequence decoded; prefill and decode speeds go to stderr.

    \b
    Examples:
      llmtrt generate out/onnx --prompt "The for statement" --max-new-tokens 80
      llmtrt generate --model bytes-llama --prompt "The for statement"        (PyTorch reference)
      llmtrt generate out/onnx --prompt "x = " --temperature 0.8 --top-p 0.9 --seed 3 --stream
      llmtrt generate out/engines --precision fp16 --prompt "The for statement"  (GPU)
      llmtrt generate out/onnx --prompt "The for statement" --json
      llmtrt generate out/llama-instruct --chat --prompt "Name three colors."
    """
    from llmtrt.exporter.config import resolve_model
    from llmtrt.pipelines.runtime import generate as gen
    from llmtrt.pipelines.runtime.artifact_runners import open_runner
    from llmtrt.pipelines.runtime.runners import PyTorchRunner
    from llmtrt.pipelines.runtime.tokenizer import load_tokenizer

    if (artifact is None) == (model_spec is None):
        raise LlmtrtUserError("give either an ARTIFACT directory or --model PRESET|DIR (not both, not neither)")
    if temperature is not None or top_p is not None:
        source_of_greedy = click.get_current_context().get_parameter_source("greedy")
        if greedy and source_of_greedy == click.core.ParameterSource.COMMANDLINE:
            raise LlmtrtUserError("--greedy conflicts with --temperature/--top-p; drop one of them")
        greedy = False
    sampling = gen.Sampling(greedy=greedy, temperature=1.0 if temperature is None else temperature,
                            top_p=1.0 if top_p is None else top_p, seed=seed)
    source = gen.model_dir_for(artifact) if artifact is not None else model_spec
    tokenizer = load_tokenizer(source, add_bos=False if no_bos else None)  # before any model is loaded
    if chat:
        tokenizer.chat_ids(prompt)  # no chat template, or one that fails to render: fail now
    if huge_pages is None:
        huge_pages = hp.wanted(max_new_tokens >= hp.HUGE_PAGES_FROM_TOKENS)
    runner = (open_runner(artifact, provider=provider, precision=precision, huge_pages=huge_pages)
              if artifact is not None else PyTorchRunner(resolve_model(model_spec)))

    def on_text(row: int, chunk: str) -> None:
        click.echo(chunk, nl=False)

    streaming = stream and not as_json
    with runner:
        if not as_json:
            click.echo(f"generating with {runner.description}", err=True)
            for note in tokenizer.special.notes:
                click.echo(f"note: {note}", err=True)
        if streaming and not chat:
            click.echo(_prompt_text(tokenizer, prompt), nl=False)
        result = gen.generate(runner, tokenizer, prompt, max_new_tokens=max_new_tokens, sampling=sampling,
                              chat=chat, on_text=on_text if streaming else None)
    _print_result(result, runner, prompt, sampling, chat=chat, stream=stream, as_json=as_json)


def _print_result(result, runner, prompt: str, sampling, *, chat: bool, stream: bool, as_json: bool) -> None:
    s = result.stats
    reason = result.stop_reasons[0]
    if as_json:
        click.echo(json.dumps({
            "text": result.texts[0], "prompt": prompt, "prompt_ids": result.prompt_ids[0],
            "tokens": result.tokens[0], "new_tokens": s.new_tokens,
            "stop_reason": reason, "prompt_tokens": s.prompt_tokens, "prefill_ms": s.prefill_ms,
            "prefill_tokens_per_s": s.prefill_tokens_per_s, "decode_ms": s.decode_ms,
            "decode_tokens_per_s": s.decode_tokens_per_s, "runner": runner.description,
            "huge_pages": (runner.huge_pages.as_dict() if getattr(runner, "huge_pages", None) is not None else None),
            "sampling": {"greedy": sampling.greedy, "temperature": sampling.temperature, "top_p": sampling.top_p,
                         "seed": sampling.seed}}, indent=2))
        return
    if stream:
        click.echo()
    else:
        click.echo(result.texts[0] if chat else result.prompt_texts[0] + result.texts[0])
    if reason == "max_positions":
        click.echo(f"stopped after {s.new_tokens} new tokens: prompt + output fill the {runner.max_positions} "
                   "positions the artifact holds (re-export with a larger --max-positions for longer output)", err=True)
    elif reason == "eos":
        click.echo(f"stopped at the end-of-sequence token after {s.new_tokens} new tokens", err=True)
    click.echo(f"prefill: {s.prompt_tokens} tokens in {s.prefill_ms:.1f} ms ({s.prefill_tokens_per_s:.0f} tokens/s); "
               f"decode: {s.decode_steps} steps in {s.decode_ms:.1f} ms ({s.decode_tokens_per_s:.0f} tokens/s)",
               err=True)


def _prompt_text(tokenizer, prompt: str) -> str:
    """The prompt as the model reads it (its ids decoded): the text the streamed chunks continue."""
    return tokenizer.decode(tokenizer.prompt_ids(prompt))
