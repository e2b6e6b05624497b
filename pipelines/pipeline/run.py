"""Running a planned pipeline: each stage's content key, its cache record, progress lines, the report."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmtrt.exporter.files import write_json_atomically
from llmtrt.pipelines.errors import LlmtrtUserError
from llmtrt.pipelines.pipeline.config import RECORD, STAGE_KINDS, PipelineConfig, Stage
from llmtrt.pipelines.pipeline.plan import plan
from llmtrt.pipelines.progress import Progress


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llmtrt")
    except PackageNotFoundError:
        return "0+unknown"


def stage_key(stage: Stage) -> str:
    """Hash of what the stage's result depends on: options, input manifests, tool version."""
    inputs = []
    for directory in stage.inputs:
        manifest = next((p for p in (directory / "manifest.json", directory / RECORD) if p.is_file()), None)
        inputs.append(hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest else "missing")
    payload = {"kind": stage.kind, "options": stage.options, "inputs": inputs, "llmtrt": _version()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _read_record(stage: Stage) -> dict[str, Any] | None:
    path = stage.out_dir / RECORD
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def run(config: PipelineConfig, out_dir: str | Path, *, only: Sequence[str] = (), force: bool = False,
        quiet: bool = False, config_path: Path | None = None) -> dict[str, Any]:
    """Run the plan; returns the summary that report.json holds. Stages of other kinds than ``only``
    must already be cached (their outputs are the inputs of the ones that run)."""
    from llmtrt.pipelines.pipeline import stages

    for kind in only:
        if kind not in STAGE_KINDS:
            raise LlmtrtUserError(f"--only {kind!r}: not a stage; choose from {', '.join(STAGE_KINDS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = plan(config, out, config_path)
    progress = Progress("pipeline", len(steps) + 1, quiet=quiet)
    results = []
    t0 = time.perf_counter()
    for stage in steps:
        progress.start(stage.name)
        key = stage_key(stage)
        record = _read_record(stage)
        selected = not only or stage.kind in only
        if record is not None and record.get("key") == key and not (force and selected):
            progress.done(stage.name, "cached", 0.0, " - inputs unchanged, skipped")
            results.append({**record, "status": "cached"})
            continue
        if not selected:
            raise LlmtrtUserError(f"--only {','.join(only)}: stage {stage.name} has no up-to-date result in "
                                  f"{stage.out_dir}; run without --only first")
        t = time.perf_counter()
        stage.out_dir.mkdir(parents=True, exist_ok=True)
        (stage.out_dir / RECORD).unlink(missing_ok=True)
        summary = stage.action(stage)
        seconds = round(time.perf_counter() - t, 3)
        record = {"stage": stage.name, "kind": stage.kind, "key": key, "out_dir": str(stage.out_dir),
                  "seconds": seconds, "summary": summary, "passed": summary.get("passed", True)}
        write_json_atomically(stage.out_dir / RECORD, record)
        verdict = "" if record["passed"] else " - FAILED its gate"
        progress.done(stage.name, "done", seconds, verdict)
        results.append({**record, "status": "ran"})
    report_stage = Stage("report", "report", out / "reports", [], {}, stages.report)
    progress.start(report_stage.name)
    t = time.perf_counter()
    summary = stages.report(config, out, results, round(time.perf_counter() - t0, 3))
    progress.done(report_stage.name, "done", time.perf_counter() - t, f" - {summary['report_md']}")
    return summary
