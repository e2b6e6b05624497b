"""`llmtrt pipeline run|matrix|plan`: the whole flow from one YAML."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from llmtrt.pipelines.cli import main, user_errors

EXIT_FAILED = 1


@main.group()
def pipeline() -> None:
    """Run export -> quantize -> build -> validate -> compare from one YAML (configs/pipelines/*.yaml).

    \b
    Examples:
      llmtrt pipeline run demo --out out/demo
      llmtrt pipeline run configs/pipelines/ci-gate.yaml --only validate,compare --json
      llmtrt pipeline matrix configs/pipelines/rtx.yaml        (CI job matrix as JSON)
    """


def _config_path(value: str) -> str:
    """CONFIG is a YAML path, or the name of a shipped config (demo, ci-gate, rtx, jetson-orin)."""
    from llmtrt import configs

    if Path(value).exists() or value.endswith((".yaml", ".yml")):
        return value
    shipped = configs.pipeline_config(value)
    return str(shipped) if shipped is not None else value


@pipeline.command("run")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output tree (default: out/<name from the YAML>).")
@click.option("--only", default="", metavar="STAGE[,STAGE]",
              help="Run only these stage kinds (export, quantize, build, validate, compare); the others must be "
                   "cached already.")
@click.option("--force", is_flag=True, help="Rerun stages even when their inputs are unchanged (with --only: those).")
@click.option("--json", "as_json", is_flag=True, help="Print only the machine-readable summary (report.json).")
@user_errors
def run_command(config: str, out_dir: str | None, only: str, force: bool, as_json: bool) -> None:
    """Run the pipeline CONFIG describes (a YAML file, or a shipped config's name: demo, ci-gate, rtx,
    jetson-orin); cached stages are skipped.

    Exit code 0 when every gate passes (validation tolerances, accuracy thresholds), 1 when a gate
    fails, 2 for a bad config or input. Results: DIR/reports/report.md and report.json.

    \b
    Examples:
      llmtrt pipeline run demo --out out/demo
      llmtrt pipeline run configs/pipelines/ci-gate.yaml --only validate,compare --json
      llmtrt pipeline run my-model.yaml --force
    """
    import logging

    from llmtrt.pipelines.pipeline.config import load_config
    from llmtrt.pipelines.pipeline.run import run

    # TensorRT's warnings go into each engine manifest ("warnings"); keep the terminal to progress lines.
    logging.getLogger("llmtrt.pipelines.engine.backends").setLevel(logging.ERROR)
    config = _config_path(config)
    cfg = load_config(config)
    out = Path(out_dir or Path("out") / cfg.name)
    kinds = [k.strip() for k in only.split(",") if k.strip()]
    summary = run(cfg, out, only=kinds, force=force, quiet=as_json, config_path=Path(config))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        ran = sum(s["status"] == "ran" for s in summary["stages"])
        cached = sum(s["status"] == "cached" for s in summary["stages"])
        click.echo(f"{'PASS' if summary['passed'] else 'FAIL'}: {ran} stage(s) ran, {cached} cached, "
                   f"{summary['seconds']:.1f} s")
        click.echo(f"report: {summary['report_md']}")
    if not summary["passed"]:
        sys.exit(EXIT_FAILED)


@pipeline.command("matrix")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True,
              help='Print {"include": [...]} for a CI job matrix instead of a table.')
@user_errors
def matrix_command(config: str, as_json: bool) -> None:
    """The build matrix of CONFIG: one job per precision x backend target.

    \b
    GitHub Actions: the --json output goes straight into `strategy.matrix` via fromJSON
    (see docs/ci.md).

    \b
    Examples:
      llmtrt pipeline matrix rtx
      llmtrt pipeline matrix configs/pipelines/rtx.yaml --json
    """
    from llmtrt.pipelines.pipeline.config import load_config
    from llmtrt.pipelines.pipeline.plan import matrix

    config = _config_path(config)
    jobs = matrix(load_config(config), Path(config))
    if as_json:
        click.echo(json.dumps({"include": jobs}, indent=2))
        return
    for job in jobs:
        click.echo(f"{job['precision']:<10} {job['backend']:<13} {job['label']:<28} lower {job['lower']}"
                   + (f", target cc {job['target_cc']}" if job["target_cc"] else ""))


@pipeline.command("plan")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, help="Output tree.")
@click.option("--json", "as_json", is_flag=True, help="Print the stages as JSON.")
@user_errors
def plan_command(config: str, out_dir: str | None, as_json: bool) -> None:
    """List the stages CONFIG runs, their output directories and whether each is cached.

    \b
    Examples:
      llmtrt pipeline plan demo --out out/demo
      llmtrt pipeline plan configs/pipelines/ci-gate.yaml --json
    """
    from llmtrt.pipelines.pipeline.config import RECORD, load_config
    from llmtrt.pipelines.pipeline.plan import plan
    from llmtrt.pipelines.pipeline.run import stage_key

    config = _config_path(config)
    cfg = load_config(config)
    out = Path(out_dir or Path("out") / cfg.name)
    rows = []
    for stage in plan(cfg, out, Path(config)):
        record = stage.out_dir / RECORD
        try:
            cached = record.is_file() and json.loads(record.read_text()).get("key") == stage_key(stage)
        except (json.JSONDecodeError, UnicodeDecodeError):
            cached = False  # a damaged record means the stage runs again
        rows.append({"stage": stage.name, "kind": stage.kind, "status": "cached" if cached else "to run",
                     "out_dir": str(stage.out_dir)})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        click.echo(f"{row['stage']:<40} {row['status']:<7} {row['out_dir']}")
