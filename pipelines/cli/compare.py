"""`llmtrt compare`: accuracy per precision on held-out text, gated by thresholds (llmtrt.pipelines.checks.compare)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from llmtrt.exporter.errors import LlmtrtUserError
from llmtrt.pipelines.cli import main, user_errors

EXIT_FAILED = 1


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


@main.command()
@click.argument("artifacts", nargs=-1, type=click.Path())
@click.option("--model", "model_spec", metavar="PRESET|DIR",
              help="Export this model to fp32 ONNX, quantize it to each --precisions and compare them "
                   "(a preset such as bytes-llama, or an HF checkpoint directory).")
@click.option("--precisions", default="fp32,fp16,bf16,int8-sq,int8-wo,int4-awq", show_default=True,
              help="With --model: comma-separated precisions; fp32 is always included as the reference. "
                   "Names: fp32 and those of `llmtrt quantize` (fp16, bf16, int8-sq, int8-wo, int4-awq, int4-rtn).")
@click.option("--eval-text", type=click.Path(dir_okay=False), default=None,
              help="Held-out UTF-8 text to score (default: configs/text/eval.txt, bytes-llama's held-out set).")
@click.option("--calib-text", type=click.Path(dir_okay=False), default=None,
              help="With --model: calibration text for the calibrated precisions (fp16, int8-sq, int4-awq); "
                   "required for any checkpoint but the built-in bytes-llama (whose default is "
                   "configs/text/calib.txt). Must not be the eval text.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output directory: compare.json, compare.md, compare.png (and, with --model, one "
                   "artifact directory per precision).")
@click.option("--thresholds", type=click.Path(dir_okay=False), default=None,
              help="Per-precision limits YAML (default: configs/compare_thresholds.yaml).")
@click.option("--max-tokens", type=int, default=None,
              help="Score only the first N tokens of the eval text (default: all of it).")
@click.option("--seq-len", type=int, default=256, show_default=True,
              help="Window length: the text is cut into non-overlapping windows scored independently.")
@click.option("--no-bos", is_flag=True,
              help="Do not start each window with the BOS token even if the checkpoint's tokenizer adds it.")
@click.option("--no-pytorch-check", is_flag=True,
              help="Skip running the fp32 PyTorch model beside the fp32 ONNX (the reference cross-check).")
@click.option("--json", "as_json", is_flag=True, help="Print only compare.json's content.")
@user_errors
def compare(artifacts: tuple[str, ...], model_spec: str | None, precisions: str, eval_text: str | None,
            calib_text: str | None, out_dir: str, thresholds: str | None, max_tokens: int | None, seq_len: int,
            no_bos: bool, no_pytorch_check: bool, as_json: bool) -> None:
    """Accuracy of each precision against fp32 on held-out text; exit 1 when a threshold is exceeded.

    ARTIFACTS are artifact directories (manifest.json; one per precision, one of them fp32, the
    reference); or give --model instead to export and quantize them here.

    \b
    Per precision, over non-overlapping windows of --seq-len tokens:
      perplexity           exp(mean next-token cross-entropy), and its increase over fp32
      top-1 agreement      fraction of positions whose argmax equals fp32's
      mean KL              KL(p_fp32 || p_precision) per position, nats
      max abs logit error  max |logits - fp32 logits|
    The fp32 ONNX export is the reference and is itself checked against the fp32 PyTorch model.
    Artifacts run in ONNX Runtime on CPU. Tokens: bytes for byte-level models (bytes-llama), else
    the checkpoint's tokenizer.json; each window starts with BOS when the checkpoint's tokenizer adds
    one (tokenizer_config.json add_bos_token, or tokenizer.json's post-processor).
    With --model, everything the run needs (tokenizer, eval and calibration text, precision names,
    a writable --out) is checked before the export starts.

    \b
    Exit status: 0 all thresholds met, 1 a threshold exceeded, 2 bad usage or input.

    \b
    Examples:
      llmtrt compare --model bytes-llama --precisions fp32,fp16,int8-wo --out out/compare
      llmtrt compare out/fp32 out/int8-sq --eval-text my_eval.txt --out out/compare --json
      llmtrt compare --model ./my-llama --precisions fp32,int4-awq,int4-rtn --calib-text calib.txt \\
          --eval-text eval.txt --max-tokens 4096 --out out/cmp
    """
    from llmtrt.exporter.files import check_out_dir
    from llmtrt.pipelines.checks.accuracy import load_thresholds
    from llmtrt.pipelines.checks.compare import DEFAULT_EVAL_TEXT, compare_artifacts

    if bool(model_spec) == bool(artifacts):
        raise LlmtrtUserError("give exactly one of --model PRESET|DIR (export and quantize here) or "
                              "ARTIFACT directories (compare built artifacts)")
    if max_tokens is not None and max_tokens < 2:
        raise LlmtrtUserError(f"--max-tokens must be at least 2, got {max_tokens}")
    limits = load_thresholds(thresholds) if thresholds else None  # a bad YAML fails before any work
    say = (lambda _m: None) if as_json else (lambda m: click.echo(m, err=True))
    out = check_out_dir(out_dir)
    add_bos = False if no_bos else None
    eval_text = eval_text or str(DEFAULT_EVAL_TEXT)
    if model_spec:
        plan = _plan(model_spec, _split(precisions), calib_text, eval_text, max_tokens, seq_len, add_bos, as_json)
        built = _build(plan, out, say)
    else:
        built = _collect(list(artifacts))
    result = compare_artifacts(built, eval_text=eval_text, max_tokens=max_tokens, thresholds=limits, out_dir=out,
                               seq_len=seq_len, pytorch_reference=not no_pytorch_check, progress=say,
                               add_bos=add_bos)
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
        raise LlmtrtUserError("no ARTIFACT directories given")
    found: dict[str, str] = {}
    for d in dirs:
        precision = read_manifest(d).get("precision", "fp32")
        if precision in found:
            raise LlmtrtUserError(f"{found[precision]} and {d} are both {precision}; give one artifact per precision")
        found[precision] = d
    return found


@dataclass(frozen=True)
class _Plan:
    """What `compare --model` will do, every input checked."""

    source: Any
    others: list[str]              # precisions besides fp32
    quantize: Any                  # llmtrt.pipelines.precision.quantize.quantize (None with fp32 only)
    options: Any                   # its PrecisionOptions


def _plan(model_spec: str, precisions: list[str], calib_text: str | None, eval_text: str, max_tokens: int | None,
          seq_len: int, add_bos: bool | None, quiet: bool) -> _Plan:
    """Check everything the run needs before the export starts: the model's config and tokenizer, the
    eval text, the precision names, and calibration text that is not the eval text."""
    from llmtrt.exporter.config import resolve_model
    from llmtrt.pipelines.checks.compare import read_eval_tokens
    from llmtrt.pipelines.runtime.tokenizer import load_tokenizer

    if not precisions:
        raise LlmtrtUserError("--precisions: empty; e.g. --precisions fp32,fp16,int8-wo")
    source = resolve_model(model_spec)
    if seq_len > source.config.max_position_embeddings:
        raise LlmtrtUserError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings "
                              f"{source.config.max_position_embeddings}")
    tokenizer = load_tokenizer(model_spec, add_bos=add_bos)
    read_eval_tokens(eval_text, tokenizer, max_tokens)
    others = [p for p in dict.fromkeys(precisions) if p != "fp32"]
    quantize, options = _precision_step(others, calib_text, quiet, add_bos)
    if quantize is not None:
        _check_calibration_text(source, others, calib_text, eval_text)
    return _Plan(source, others, quantize, options)


def _check_calibration_text(source, precisions: list[str], calib_text: str | None, eval_text: str) -> None:
    from llmtrt.exporter.config import MODELS_DIR
    from llmtrt.exporter.files import sha256_file
    from llmtrt.pipelines.precision.calibration import DEFAULT_CALIB_TEXT, read_calibration_text
    from llmtrt.pipelines.precision.quantize import PRECISIONS

    calibrated = [p for p in precisions if PRECISIONS[p].calibrated]
    if not calibrated:
        return
    builtin = source.checkpoint_dir is None or Path(source.checkpoint_dir).resolve().parent == MODELS_DIR.resolve()
    if calib_text is None and not builtin:
        raise LlmtrtUserError(f"--calib-text is required: {', '.join(calibrated)} calibrate(s) on text like the "
                              f"model's inputs, and the default ({DEFAULT_CALIB_TEXT.name}) is the built-in model's "
                              f"Python documentation, not text for {source.checkpoint_dir.name}; pass --calib-text "
                              "FILE (disjoint from --eval-text)")
    text = Path(calib_text) if calib_text is not None else DEFAULT_CALIB_TEXT
    read_calibration_text(text)
    if sha256_file(text) == sha256_file(eval_text):
        raise LlmtrtUserError(f"--calib-text {text} has the same content as --eval-text {eval_text}; calibrating on "
                              "the text that is scored hides quantization error: use disjoint texts")


def _build(plan: _Plan, out: Path, say) -> dict[str, str]:
    """Export fp32 to OUT/fp32 and quantize each other precision to OUT/<precision>, each written whole."""
    from llmtrt.pipelines.artifacts import export_artifact

    say(f"exporting {plan.source.config.name} to {out / 'fp32'}")
    export_artifact(plan.source, out / "fp32")
    built = {"fp32": str(out / "fp32")}
    for precision in plan.others:
        say(f"quantizing to {precision} in {out / precision}")
        built[precision] = str(plan.quantize(out / "fp32", out / precision, precision, plan.options))
    return built


def _precision_step(precisions: list[str], calib_text: str | None, quiet: bool = False, add_bos: bool | None = None):
    """llmtrt.pipelines.precision.quantize.quantize and its options, after checking every name against its registry."""
    if not precisions:
        return None, None
    import importlib.util

    if importlib.util.find_spec("llmtrt.pipelines.precision.quantize") is None:
        raise LlmtrtUserError(f"--precisions {','.join(precisions)}: the precision step (pipelines/precision.py) "
                              "is not installed in this tree; compare fp32 only or pass ARTIFACT directories")
    from llmtrt.pipelines.precision import quantize as step

    unknown = [p for p in precisions if p not in step.PRECISIONS]
    if unknown:
        raise LlmtrtUserError(f"--precisions: unknown {', '.join(unknown)}; choose from fp32, "
                              f"{', '.join(step.PRECISIONS)}")
    import dataclasses

    names = {f.name for f in dataclasses.fields(step.PrecisionOptions)}
    changes: dict[str, Any] = {"calib_text": calib_text} if calib_text is not None else {}
    if "progress" in names:
        changes["progress"] = not quiet
    if "add_bos" in names:  # calibration windows start with BOS as the checkpoint says (--no-bos: never)
        changes["add_bos"] = add_bos
    if "calib_text" in changes and "calib_text" not in names:
        raise LlmtrtUserError("--calib-text: this precision step takes no calibration text option")
    return step.quantize, step.PrecisionOptions(**changes)
