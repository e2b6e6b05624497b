"""`llmtrt compare`: accuracy per precision on held-out text, gated by thresholds (llmtrt.pipelines.checks.compare)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from llmtrt.exporter.errors import LlmtrtUserError
from llmtrt.pipelines.cli import main, user_errors

EXIT_FAILED = 1


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


@main.command()
@click.option("--model", "model_spec", metavar="PRESET|DIR",
              help="Export this model to fp32 ONNX, quantize it to each --precisions and compare them "
                   "(a preset such as bytes-llama, or an HF checkpoint directory).")
@click.option("--artifacts", metavar="DIR1,DIR2,...",
              help="Compare already-built artifact directories instead (each with manifest.json; the "
                   "manifest's precision names the row; one must be fp32).")
@click.option("--precisions", default="fp32,fp16,int8-sq,int8-wo,int4-awq", show_default=True,
              help="With --model: comma-separated precisions; fp32 is always included as the reference. "
                   "Names: fp32 and those of `llmtrt quantize` (fp16, bf16, int8-sq, int8-wo, int4-awq, int4-rtn).")
@click.option("--eval-text", type=click.Path(dir_okay=False), default=None,
              help="Held-out UTF-8 text to score (default: configs/text/eval.txt, bytes-llama's held-out set).")
@click.option("--calib-text", type=click.Path(dir_okay=False), default=None,
              help="With --model: calibration text for the quantized precisions (default: the precision "
                   "step's default, configs/text/calib.txt). Never the eval text.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output directory: compare.json, compare.md, compare.png (and, with --model, one "
                   "artifact directory per precision).")
@click.option("--thresholds", type=click.Path(dir_okay=False), default=None,
              help="Per-precision limits YAML (default: configs/compare_thresholds.yaml).")
@click.option("--max-tokens", type=int, default=None,
              help="Score only the first N tokens of the eval text (default: all of it).")
@click.option("--seq-len", type=int, default=256, show_default=True,
              help="Window length: the text is cut into non-overlapping windows scored independently.")
@click.option("--no-pytorch-check", is_flag=True,
              help="Skip running the fp32 PyTorch model beside the fp32 ONNX (the reference cross-check).")
@click.option("--json", "as_json", is_flag=True, help="Print only compare.json's content.")
@user_errors
def compare(model_spec: str | None, artifacts: str | None, precisions: str, eval_text: str | None,
            calib_text: str | None, out_dir: str, thresholds: str | None, max_tokens: int | None, seq_len: int,
            no_pytorch_check: bool, as_json: bool) -> None:
    """Accuracy of each precision against fp32 on held-out text; exit 1 when a threshold is exceeded.

    \b
    Per precision, over non-overlapping windows of --seq-len tokens:
      perplexity           exp(mean next-token cross-entropy), and its increase over fp32
      top-1 agreement      fraction of positions whose argmax equals fp32's
      mean KL              KL(p_fp32 || p_precision) per position, nats
      max abs logit error  max |logits - fp32 logits|
    The fp32 ONNX export is the reference and is itself checked against the fp32 PyTorch model.
    Artifacts run in ONNX Runtime on CPU. Tokens: bytes for byte-level models (bytes-llama), else
    the checkpoint's tokenizer.json.

    \b
    Exit status: 0 all thresholds met, 1 a threshold exceeded, 2 bad usage or input.

    \b
    Examples:
      llmtrt compare --model bytes-llama --precisions fp32,fp16,int8-wo --out out/compare
      llmtrt compare --artifacts out/fp32,out/int8-sq --eval-text my_eval.txt --out out/compare --json
      llmtrt compare --model ./my-llama --precisions fp32,int4-awq,int4-rtn --calib-text calib.txt \\
          --eval-text eval.txt --max-tokens 4096 --out out/cmp
    """
    from llmtrt.pipelines.checks.accuracy import load_thresholds
    from llmtrt.pipelines.checks.compare import DEFAULT_EVAL_TEXT, compare_artifacts

    if bool(model_spec) == bool(artifacts):
        raise LlmtrtUserError("give exactly one of --model PRESET|DIR (export and quantize here) or "
                              "--artifacts DIR1,DIR2 (compare built artifacts)")
    if max_tokens is not None and max_tokens < 2:
        raise LlmtrtUserError(f"--max-tokens must be at least 2, got {max_tokens}")
    limits = load_thresholds(thresholds) if thresholds else None  # a bad YAML fails before any work
    say = (lambda _m: None) if as_json else (lambda m: click.echo(m, err=True))
    out = Path(out_dir)
    if model_spec:
        built = _build(model_spec, _split(precisions), calib_text, out, say, quiet=as_json)
    else:
        built = _collect(_split(artifacts))
    result = compare_artifacts(built, eval_text=eval_text or DEFAULT_EVAL_TEXT, max_tokens=max_tokens,
                               thresholds=limits, out_dir=out, seq_len=seq_len,
                               pytorch_reference=not no_pytorch_check, progress=say)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(result.table())
        click.echo("")
        for check in result.checks:
            click.echo(str(check))
        for note in result.notes:
            click.echo(f"note: {note}")
        if result.ungated:
            click.echo(f"not gated (no thresholds): {', '.join(result.ungated)}")
        click.echo(f"{'PASSED' if result else 'FAILED'}: {len(result.checks) - len(result.failed)}/"
                   f"{len(result.checks)} checks met; reports in {out}/compare.json, compare.md, compare.png")
    if not result:
        sys.exit(EXIT_FAILED)


def _collect(dirs: list[str]) -> dict[str, str]:
    from llmtrt.pipelines.artifacts import read_manifest

    if not dirs:
        raise LlmtrtUserError("--artifacts: no directories given")
    found: dict[str, str] = {}
    for d in dirs:
        precision = read_manifest(d).get("precision", "fp32")
        if precision in found:
            raise LlmtrtUserError(f"--artifacts: {found[precision]} and {d} are both {precision}; give one per precision")
        found[precision] = d
    return found


def _build(model_spec: str, precisions: list[str], calib_text: str | None, out: Path, say,
           quiet: bool = False) -> dict[str, str]:
    """Export fp32 to OUT/fp32 and quantize each other precision to OUT/<precision>."""
    from llmtrt.exporter.config import resolve_model
    from llmtrt.pipelines.artifacts import export_artifact

    if not precisions:
        raise LlmtrtUserError("--precisions: empty; e.g. --precisions fp32,fp16,int8-wo")
    others = [p for p in dict.fromkeys(precisions) if p != "fp32"]
    quantize, options = _precision_step(others, calib_text, quiet)
    source = resolve_model(model_spec)
    say(f"exporting {source.config.name} to {out / 'fp32'}")
    export_artifact(source, out / "fp32")
    built = {"fp32": str(out / "fp32")}
    for precision in others:
        say(f"quantizing to {precision} in {out / precision}")
        built[precision] = str(quantize(out / "fp32", out / precision, precision, options))
    return built


def _precision_step(precisions: list[str], calib_text: str | None, quiet: bool = False):
    """llmtrt.pipelines.precision.quantize.quantize and its options, after checking every name against its registry."""
    if not precisions:
        return None, None
    import importlib.util

    if importlib.util.find_spec("llmtrt.pipelines.precision.quantize") is None:
        raise LlmtrtUserError(f"--precisions {','.join(precisions)}: the precision step (pipelines/precision.py) "
                              "is not installed in this tree; compare fp32 only or pass --artifacts")
    from llmtrt.pipelines.precision import quantize as step

    unknown = [p for p in precisions if p not in step.PRECISIONS]
    if unknown:
        raise LlmtrtUserError(f"--precisions: unknown {', '.join(unknown)}; choose from fp32, "
                              f"{', '.join(step.PRECISIONS)}")
    import dataclasses

    names = {f.name for f in dataclasses.fields(step.PrecisionOptions)}
    changes = {"calib_text": calib_text} if calib_text is not None else {}
    if "progress" in names:
        changes["progress"] = not quiet
    if "calib_text" in changes and "calib_text" not in names:
        raise LlmtrtUserError("--calib-text: this precision step takes no calibration text option")
    return step.quantize, step.PrecisionOptions(**changes)
