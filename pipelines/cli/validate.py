"""`llmtrt validate`: an artifact's numbers against the fp32 PyTorch model (pipelines/validate.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from llmtrt.exporter.errors import LlmtrtUserError
from llmtrt.pipelines.cli import main, user_errors

EXIT_NUMERICS = 1


@main.command()
@click.argument("artifact_dir", type=click.Path())
@click.option("--text", "text", type=click.Path(dir_okay=False), default=None,
              help="Prompts and decode tokens come from this UTF-8 text [default: configs/text/eval.txt].")
@click.option("--prompt", default=None, help="One prompt instead of --text; decode tokens are PyTorch's greedy ones.")
@click.option("--batch", type=int, default=2, show_default=True,
              help="Prompts per batch; rows have different lengths, so left padding is exercised.")
@click.option("--prompt-tokens", type=int, default=24, show_default=True, help="Tokens in the longest prompt.")
@click.option("--decode-steps", type=int, default=4, show_default=True,
              help="Decode steps after prefill, each feeding present.* back as past_key_values.*.")
@click.option("--atol", default="", metavar="[NAME:]VALUE[,...]",
              help="Absolute tolerance of the max-error check, like Polygraphy's: a default VALUE and/or per output "
                   "group (logits, present) or output name (logits.decode.2), comma-separated.")
@click.option("--rtol", default="", metavar="[NAME:]VALUE[,...]", help="Relative tolerance, same forms as --atol.")
@click.option("--tolerances", type=click.Path(dir_okay=False), default=None,
              help="Tolerances per precision and output [default: configs/tolerances.yaml].")
@click.option("--layerwise", is_flag=True,
              help="Mark every intermediate tensor as an output, compare with an fp32 reference export, and name the "
                   "first node where the error jumps.")
@click.option("--reference", type=click.Path(file_okay=False), default=None,
              help="--layerwise reference: an fp32 export directory [default: re-export the manifest's model].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Write validation.json, inputs.json, outputs.json, reference_outputs.json (Polygraphy JSON) here.")
@click.option("--json", "as_json", is_flag=True, help="Print only the machine-readable report.")
@user_errors
def validate(artifact_dir: str, text: str | None, prompt: str | None, batch: int,
             prompt_tokens: int, decode_steps: int, atol: str, rtol: str,
             tolerances: str | None, layerwise: bool, reference: str | None, out_dir: str | None,
             as_json: bool) -> None:
    """Check ARTIFACT_DIR against the fp32 PyTorch model: an `llmtrt export` / `llmtrt quantize` directory,
    or an `llmtrt build` engine directory (then the ONNX it was built from is checked too, and the
    engine runs where there is a CUDA GPU; otherwise it is skipped with the reason).

    \b
    First the artifact itself: manifest hashes, the graph against the config and the source model,
    every weight against the source checkpoint, the precision inventory. Then real prompts (text ->
    token ids, a left-padded batch) run prefill + N decode steps in PyTorch, ONNX Runtime and TensorRT; Polygraphy compares every step's logits and
    the final KV cache with the tolerances of the artifact's precision. Each backend must also give
    the same logits from prefill + decode as from one forward over all tokens (KV-cache consistency).

    \b
    Exit status: 0 pass, 1 numerics fail, 2 usage or input error.

    \b
    Examples:
      llmtrt validate out/onnx
      llmtrt validate out/onnx --batch 4 --decode-steps 8 --atol logits:1e-3,present:1e-3 --out out/validate
      llmtrt validate out/int8 --layerwise --json
      llmtrt validate out/engines/fp16 --prompt "def main():"      (an engine: ONNX + TensorRT)

    \b
    With --out DIR, the printed `polygraphy run ... --load-inputs DIR/inputs.json --load-outputs
    DIR/reference_outputs.json ...` command replays every prompt's prefill and decode steps by hand
    and gives the same verdict.
    """
    from llmtrt.pipelines.checks.tolerances import parse_overrides
    from llmtrt.pipelines.checks.validate import ValidateOptions
    from llmtrt.pipelines.checks.validate import validate as run_validate

    if text is not None and prompt is not None:
        raise LlmtrtUserError("give --text FILE or --prompt STR, not both")
    options = ValidateOptions(batch=batch, decode_steps=decode_steps, prompt_tokens=prompt_tokens, text=text,
                              prompt=prompt, tolerances=tolerances, atol=parse_overrides(_split(atol), "--atol"),
                              rtol=parse_overrides(_split(rtol), "--rtol"), layerwise=layerwise,
                              reference=reference, out_dir=Path(out_dir) if out_dir else None)
    report = run_validate(artifact_dir, options)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(report.table())
        if report.files:
            click.echo(f"report: {report.files['validation']}")
            click.echo(f"reproduce: {report.files['reproduce']}")
    if not report:
        sys.exit(EXIT_NUMERICS)


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]
