"""The pipeline's stage actions: each calls one library function and returns a JSON-able summary.

A summary's ``passed`` (default True) is the stage's gate; ``outputs`` lists the files it wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtrt.exporter.files import write_json_atomically

if TYPE_CHECKING:
    from llmtrt.pipelines.pipeline.config import PipelineConfig, Stage


def _dir_bytes(directory: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in directory.glob(pattern) if p.is_file())


# --------------------------------------------------------------------------------------------
# stage actions
# --------------------------------------------------------------------------------------------
def export(stage: Stage) -> dict[str, Any]:
    from llmtrt.exporter.config import resolve_model
    from llmtrt.exporter.onnx_export import ExportOptions
    from llmtrt.pipelines.artifacts import MANIFEST, export_artifact

    o = stage.options
    options = ExportOptions(dialect=o["ops"], kv_cache=o["kv_cache"], max_positions=o["max_positions"])
    exported = export_artifact(resolve_model(o["model"], seed=o["seed"]), stage.out_dir, options)
    manifest = exported.onnx_path.parent / MANIFEST
    return {"onnx": str(exported.onnx_path), "manifest": str(manifest), "opset": exported.opset,
            "bytes": _dir_bytes(stage.out_dir, "model.onnx*"), **exported.stats}


def quantize(stage: Stage) -> dict[str, Any]:
    from llmtrt.pipelines.precision.quantize import PrecisionOptions
    from llmtrt.pipelines.precision.quantize import quantize as run_quantize

    o = stage.options
    options = PrecisionOptions(calib_text=o["calib_text"], calib_samples=o["samples"], calib_seq_len=o["seq_len"])
    if "@" not in o["precision"]:
        out = run_quantize(stage.inputs[0], stage.out_dir, o["precision"], options)
        return {"out_dir": str(out), "precision": o["precision"], "bytes": _dir_bytes(stage.out_dir, "model.onnx*")}
    return _quantize_to_budget(stage, options)


def _quantize_to_budget(stage: Stage, options) -> dict[str, Any]:
    """A precision with a budget (``int4-awq@ppl+3%``): the mix llmtrt quantize --max-ppl-increase finds."""
    from llmtrt.pipelines.artifacts import read_manifest
    from llmtrt.pipelines.errors import LlmtrtUserError
    from llmtrt.pipelines.precision.budget import Budget, BudgetNotMet
    from llmtrt.pipelines.precision.mix import parse_precision
    from llmtrt.pipelines.precision.mixed import quantize_to_budget

    name = stage.options["precision"]
    base, ppl, kl = parse_precision(name)
    try:
        out, _ = quantize_to_budget(stage.inputs[0], stage.out_dir, base, options, Budget(ppl, kl))
    except BudgetNotMet as exc:
        raise LlmtrtUserError(f"{stage.name}: {exc}; change precision {name!r} in the config") from None
    m = read_manifest(out)
    mix, cal = m["mix"], m["mix"]["calibration"]
    moved = sum(1 for s in mix["groups"].values() if s != base)
    return {"out_dir": str(out), "precision": name, "bytes": _dir_bytes(stage.out_dir, "model.onnx*"),
            "groups_moved": moved, "groups": len(mix["groups"]), "calib_ppl_increase": cal["ppl_increase"],
            "bits_per_weight": m["weight_bits"]["bits_per_weight"], "evaluations": mix["search"]["evaluations"]}


def build(stage: Stage) -> dict[str, Any]:
    from llmtrt.pipelines.engine.from_export import build_from_export

    o = stage.options
    result = build_from_export(stage.inputs[0], stage.out_dir, precision=o["precision"], backend=o["backend"],
                               lower=o["lower"], target_cc=o["target_cc"], max_batch=o["profiles"]["max_batch"],
                               max_prompt=o["profiles"]["max_prompt"], max_kv=o["profiles"]["max_kv"])
    m = result.manifest
    return {"plan": str(result.plan_path), "plan_bytes": m["plan_bytes"], "backend": m["backend"],
            "build_seconds": m["stats"]["build_seconds"], "layers": m["network"]["num_layers"]}


def validate(stage: Stage) -> dict[str, Any]:
    from llmtrt.pipelines.checks.validate import ValidateOptions
    from llmtrt.pipelines.checks.validate import validate as run_validate

    o = stage.options
    report = run_validate(stage.inputs[0], ValidateOptions(batch=o["batch"], decode_steps=o["decode_steps"],
                                                           tolerances=o["tolerances"], out_dir=stage.out_dir))
    return {"passed": bool(report), "report": str(stage.out_dir / "validation.json"), **report.summary()}


def compare(stage: Stage) -> dict[str, Any]:
    from llmtrt.pipelines.checks.compare import compare_artifacts

    o = stage.options
    artifacts = dict(zip(o["precisions"], stage.inputs, strict=True))
    result = compare_artifacts(artifacts, eval_text=o["eval_text"], max_tokens=o["max_tokens"],
                               thresholds=o["thresholds"], out_dir=stage.out_dir)
    return {"passed": bool(result), "report": str(stage.out_dir / "compare.json"), **result.summary()}


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
def report(config: PipelineConfig, out: Path, results: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """reports/report.json + report.md: every stage, its status, time, outputs and gate."""
    reports = out / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    passed = all(r.get("passed", True) for r in results)
    summary = {"name": config.name, "model": config.model, "out_dir": str(out), "passed": passed,
               "seconds": seconds, "stages": results,
               "report_md": str(reports / "report.md"), "report_json": str(reports / "report.json")}
    write_json_atomically(reports / "report.json", summary)
    lines = [f"# llmtrt pipeline report: {config.name}", "",
             f"Model `{config.model}`, ops `{config.ops}`, KV cache `{config.kv_cache}`. "
             f"Overall: **{'PASS' if passed else 'FAIL'}** in {seconds:.1f} s.", "",
             "| stage | status | seconds | gate | details |", "|---|---|---|---|---|"]
    for r in results:
        s = r.get("summary", {})
        details = ", ".join(f"{k}={_short(v)}" for k, v in s.items() if k not in ("passed",) and _short(v))
        gate = "pass" if r.get("passed", True) else "**FAIL**"
        lines.append(f"| {r['stage']} | {r['status']} | {r['seconds']:.1f} | {gate} | {details} |")
    compare_md = out / "reports" / "compare" / "compare.md"
    if compare_md.is_file():
        body = compare_md.read_text(encoding="utf-8").strip().splitlines()
        if body and body[0].startswith("# "):
            body = body[1:]
        lines += ["", "## Accuracy per precision", *body]
    plot = out / "reports" / "compare" / "compare.png"
    if plot.is_file():
        lines += ["", "![perplexity and agreement per precision](compare/compare.png)"]
    (reports / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return summary


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str) and "/" in value:
        return ""  # paths are in report.json; the table keeps figures
    if isinstance(value, (int, str, bool)):
        text = str(value)
        return text if len(text) <= 60 else "…" + text[-57:]
    return ""
