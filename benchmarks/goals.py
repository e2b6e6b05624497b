"""Issue 15's goal table in one run: every row measured now, side by side where it is a ratio, each
with its ratio to the goal (>= 1: met). Prints the table and writes JSON.

    python -m benchmarks.goals --json out/bench.json          # make bench: every row but the 8B-shaped ones
    python -m benchmarks.goals --full --json out/bench.json   # + 8B-shaped quantize, 1.1B engine builds
    python -m benchmarks.goals --rows 8b --layers-8b 32       # only the 8B-shaped quantize rows, all 32 layers

Rows (156M-shaped = benchmarks.make_checkpoint --shape 156m, random init; 2 threads, batch 1):
- decode: benchmarks.decode.issue15_comparison: our fused, last-logits fp32 graphs in every dialect,
  int8-wo and int4-awq of the standard one, against the onnxruntime-genai builder's fp32/int8/int4
  graphs in its own runtime (.venv-bench), interleaved rounds, median of per-round tokens/s ratios.
  The builder quantizes its lm_head, so the goal rows use ours with ``quantize_lm_head`` of the same
  bit width; the default (lm_head fp16, which ORT's CPU provider computes as an fp32 MatMul) is in the
  detail;
- the default dialect (``llmtrt export`` without --ops) against the fastest one, custom against standard;
- int4 preparation: our export + ``quantize --to int4-awq`` (calibration included) seconds over the
  builder's ``-p int4 -e cpu`` seconds, both from the same HF checkpoint, made in this run;
- ``llmtrt quantize --to int4-awq`` of the 1.1B-shaped export: wall seconds and peak RSS (VmHWM);
- --full: int4-awq / int8-sq / fp16 of an 8B-shaped export with ``--layers-8b`` decoder layers (all 32
  need 48 GB of disk: the row then states the layers measured and the per-layer extrapolation, and
  counts as met only at 32), and the 1.1B-shaped engine builds (fp32, fp16, int4): peak RSS <= 1.5x and
  plan <= 1.05x the weights built.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.engine_build import LLMTRT, sampled_run

ENGINE_PRECISIONS = ("fp32", "fp16", "int4")


@dataclass(frozen=True)
class Goal:
    row: str
    unit: str
    target: float
    higher_is_better: bool
    before: str

    def to_goal(self, value: float) -> float:
        """value over the target, turned so that >= 1 means met."""
        return value / self.target if self.higher_is_better else self.target / value


GOALS = {
    "decode fp32": Goal("156M decode fp32, best dialect / builder fp32", "x", 1.0, True, "0.94x (73.3 / 77.7 tok/s)"),
    "decode int8": Goal("156M decode int8-wo (lm_head int8) / builder int8", "x", 1.0, True, "0.77x (141.5 / 182.7)"),
    "decode int4": Goal("156M decode int4-awq (lm_head int4) / builder int4", "x", 1.1, True, "0.94x (250.1 / 265.8)"),
    "default dialect": Goal("156M fp32 decode, default dialect / fastest dialect", "x", 0.95, True,
                            "custom (default) 59.5 tok/s vs standard"),
    "custom vs standard": Goal("156M fp32 decode, custom / standard", "x", 0.95, True, "0.77x"),
    "int4 prep": Goal("156M int4 preparation: export + quantize / builder build", "x", 3.0, False,
                      "13x (95.4 s / 7.3 s)"),
    "1.1b int4-awq s": Goal("1.1B-shaped int4-awq quantize, seconds", "s", 180.0, False, "1,398 s"),
    "1.1b int4-awq GB": Goal("1.1B-shaped int4-awq quantize, peak RSS", "GB", 2.2, False, "11.7 GB"),
    **{f"8b {p} min": Goal(f"8B-shaped {p} quantize, minutes", "min", 40.0, False, "impossible in 24 GiB")
       for p in ("int4-awq", "int8-sq", "fp16")},
    **{f"8b {p} GB": Goal(f"8B-shaped {p} quantize, peak RSS", "GB", 6.0, False, "impossible in 24 GiB")
       for p in ("int4-awq", "int8-sq", "fp16")},
    **{f"engine {p} rss": Goal(f"1.1B-shaped {p} engine build, peak RSS / weights", "x", 1.5, False,
                               "4.8x (fp32, 21.2 GB)" if p == "fp32" else "") for p in ENGINE_PRECISIONS},
    **{f"engine {p} plan": Goal(f"1.1B-shaped {p} engine build, plan bytes / weights", "x", 1.05, False,
                                "1.95x (fp32, 8.2 GB)" if p == "fp32" else "") for p in ENGINE_PRECISIONS},
}
GROUPS = ("decode", "1.1b", "8b", "engines")  # --rows: what a run measures; --full = all four


def goal_row(key: str, value: float | None, detail: str = "", countable: bool = True) -> dict:
    """One row of the table: the goal, the value measured now and its ratio to the goal. ``value`` None:
    not measured (``detail`` says why); ``countable`` False: measured, but not what the goal names."""
    goal = GOALS[key]
    row = {"goal": key, **asdict(goal), "value": value, "detail": detail}
    if value is None or value <= 0:
        return {**row, "to_goal": None, "met": None}
    to_goal = round(goal.to_goal(value), 3)
    return {**row, "to_goal": to_goal, "met": (to_goal >= 1.0) if countable else None}


# --- measurements -----------------------------------------------------------------------------------

def default_dialect() -> str:
    from llmtrt.exporter.onnx_export import ExportOptions

    return ExportOptions().dialect


def decode_rows(work: Path, rounds: int, fresh: bool) -> tuple[list[dict], dict]:
    from benchmarks.common import ensure_checkpoint
    from benchmarks.decode import issue15_comparison, paired_ratio

    report = issue15_comparison(work, ensure_checkpoint(work, "156m"), rounds=rounds, fresh=fresh)
    r, rows, prep = report["ratios"], report["rows"], report["prep_seconds"]
    def fp16_head(bits: str) -> str:
        value = r.get(f"{bits} (lm_head fp16) / builder {bits.split('-')[0]}")
        return "" if value is None else f"default lm_head fp16: {value:g}x"

    out = [goal_row("decode fp32", r.get("fp32 (best dialect) / builder fp32")),
           goal_row("decode int8", r.get("int8-wo / builder int8"), fp16_head("int8-wo")),
           goal_row("decode int4", r.get("int4-awq / builder int4"), fp16_head("int4-awq"))]
    dialects = [label.removesuffix(" fp32") for label in rows if label.endswith(" fp32") and
                not label.startswith("builder")]
    default = default_dialect()
    if dialects and f"{default} fp32" in rows:
        fastest = max(dialects, key=lambda d: rows[f"{d} fp32"]["decode_tok_s"])
        out.append(goal_row("default dialect", paired_ratio(rows[f"{default} fp32"], rows[f"{fastest} fp32"]),
                            f"default {default}, fastest {fastest}"))
    else:
        out.append(goal_row("default dialect", None, f"default {default} not measured"))
    out.append(goal_row("custom vs standard", r.get("custom / standard (fp32)")))
    ours = [prep.get("export standard"), prep.get("quantize int4-awq lm_head int4")]
    if None in ours or "builder int4" not in prep:
        out.append(goal_row("int4 prep", None, "artifacts reused: run without --reuse"))
    else:
        out.append(goal_row("int4 prep", round(sum(ours) / prep["builder int4"], 2),
                            f"ours {ours[0]:.1f} + {ours[1]:.1f} s, builder {prep['builder int4']:.1f} s"))
    return out, report


def _export(checkpoint: Path, out: Path) -> Path:
    if not (out / "manifest.json").is_file():
        done = sampled_run([*LLMTRT, "export", "--model", str(checkpoint), "--out", str(out)])
        if done["rc"] != 0:
            raise RuntimeError(f"llmtrt export --model {checkpoint} failed: {done['stderr_tail']}")
    return out


def quantize_figures(export_dir: Path, out: Path, precision: str) -> dict:
    """``llmtrt quantize EXPORT --to PRECISION --out OUT`` in its own process: wall seconds and peak RSS;
    the output is deleted afterwards."""
    shutil.rmtree(out, ignore_errors=True)
    done = sampled_run([*LLMTRT, "quantize", str(export_dir), "--to", precision, "--out", str(out)])
    shutil.rmtree(out, ignore_errors=True)
    if done["rc"] != 0:
        return {"error": done["stderr_tail"] or f"exit {done['rc']}"}
    return {"seconds": done["wall_seconds"], "peak_rss_bytes": done["peak_rss_bytes"],
            "command": f"llmtrt quantize {export_dir} --to {precision} --out {out}"}


def quantize_rows_1b(work: Path) -> tuple[list[dict], dict]:
    from benchmarks.common import ensure_checkpoint

    export_dir = _export(ensure_checkpoint(work, "1.1b"), work / "export-1.1b")
    q = quantize_figures(export_dir, work / "quantized-1.1b", "int4-awq")
    if "error" in q:
        return [goal_row("1.1b int4-awq s", None, q["error"]), goal_row("1.1b int4-awq GB", None, q["error"])], q
    return [goal_row("1.1b int4-awq s", q["seconds"]),
            goal_row("1.1b int4-awq GB", round(q["peak_rss_bytes"] / 1e9, 2))], q


def quantize_rows_8b(work: Path, layers: int) -> tuple[list[dict], dict]:
    from benchmarks.make_checkpoint import SHAPES, write_checkpoint

    full = SHAPES["8b"]["num_hidden_layers"]
    checkpoint, export_dir = work / f"llama-8b-{layers}l", work / f"export-8b-{layers}l"
    if not (export_dir / "manifest.json").is_file():
        if not (checkpoint / "model.safetensors").exists():
            write_checkpoint(checkpoint, "8b", dtype="bf16", layers=layers)
        _export(checkpoint, export_dir)
    # quantize reads only the export (its tokenizer files included): the bf16 checkpoint weights (16 GB at
    # 32 layers) go, so that the export (32 GB) and the largest output (fp16, 16 GB) fit on the disk together
    (checkpoint / "model.safetensors").unlink(missing_ok=True)
    rows, figures = [], {"layers": layers, "of_layers": full}
    for precision in ("int4-awq", "int8-sq", "fp16"):
        q = figures[precision] = quantize_figures(export_dir, work / f"quantized-8b-{layers}l", precision)
        if "error" in q:
            rows += [goal_row(f"8b {precision} min", None, q["error"]), goal_row(f"8b {precision} GB", None, q["error"])]
            continue
        note = "" if layers == full else (f"{layers} of {full} layers: {q['seconds'] / 60:.1f} min measured, "
                                          f"~{q['seconds'] / 60 * full / layers:.0f} min at {full} (x{full / layers:g})")
        minutes = q["seconds"] / 60 * full / layers
        rows += [goal_row(f"8b {precision} min", round(minutes, 1), note, countable=layers == full),
                 goal_row(f"8b {precision} GB", round(q["peak_rss_bytes"] / 1e9, 2),
                          "" if layers == full else f"{layers} of {full} layers", countable=layers == full)]
    return rows, figures


def engine_rows(builds: dict) -> list[dict]:
    """Peak RSS and plan bytes over the weights of each 1.1B-shaped build (tensorrt-rtx, ahead of time)."""
    rows = []
    by_precision = {r["model"].split()[-1]: r for r in builds["rows"]}
    for p in ENGINE_PRECISIONS:
        r = by_precision.get(p)
        if r is None or "error" in r:
            why = "not built" if r is None else r["error"]
            rows += [goal_row(f"engine {p} rss", None, why), goal_row(f"engine {p} plan", None, why)]
            continue
        detail = f"{r['weights_bytes'] / 1e9:.2f} GB weights, {r['wall_seconds']:.0f} s"
        rows += [goal_row(f"engine {p} rss", r["peak_rss_over_weights"],
                          f"{detail}, peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB"),
                 goal_row(f"engine {p} plan", r["plan_over_weights"], f"plan {r['plan_bytes'] / 1e9:.2f} GB")]
    return rows


def run(work: Path, rounds: int = 5, fresh: bool = True, full: bool = False, layers_8b: int = 8,
        groups: tuple[str, ...] | None = None) -> dict:
    """Measure the row ``groups`` (default: decode and 1.1b; ``full``: all of :data:`GROUPS`)."""
    groups = groups or (GROUPS if full else ("decode", "1.1b"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"full": set(groups) == set(GROUPS), "groups": list(groups), "cpu_count": os.cpu_count(),
                    "load_average_start": os.getloadavg(), "default_dialect": default_dialect()}
    rows: list[dict] = []
    if "decode" in groups:
        more, report["decode"] = decode_rows(work, rounds, fresh)
        rows += more
    if "1.1b" in groups:
        more, report["quantize_1.1b"] = quantize_rows_1b(work)
        rows += more
    if "8b" in groups:
        more, report["quantize_8b"] = quantize_rows_8b(work, layers_8b)
        rows += more
    if "engines" in groups:
        from benchmarks.engine_build import measure_engine_builds

        report["engine_builds_1.1b"] = measure_engine_builds(work, precisions=ENGINE_PRECISIONS)
        rows += engine_rows(report["engine_builds_1.1b"])
    report["rows"] = rows
    report["load_average_end"] = os.getloadavg()
    return report


# --- report -------------------------------------------------------------------------------------------

def format_goals(report: dict) -> str:
    def num(value) -> str:
        return "-" if value is None else f"{value:g}"

    loads = " -> ".join(f"{report[k][0]:.2f}" for k in ("load_average_start", "load_average_end") if k in report)
    what = "full" if report["full"] else "+".join(report.get("groups", ["decode", "1.1b"]))
    lines = [f"issue 15 goals ({what} run; {report['cpu_count']} cores, load "
             f"average {loads}; default dialect {report['default_dialect']})",
             f"{'row':<58} {'before':<40} {'now':>8} {'goal':>8} {'to goal':>7}  met"]
    for r in report["rows"]:
        goal = f"{'>=' if r['higher_is_better'] else '<='}{r['target']:g}{r['unit']}"
        met = {True: "yes", False: "NO", None: "-"}[r["met"]]
        lines.append(f"{r['row']:<58} {r['before']:<40} {num(r['value']):>8} {goal:>8} {num(r['to_goal']):>7}  {met}"
                     + (f"  ({r['detail']})" if r["detail"] else ""))
    lines.append("(to goal: now / goal, or goal / now where lower is better: >= 1 is met)")
    if "decode" in report:
        from benchmarks.decode import format_issue15

        lines += ["", format_issue15(report["decode"])]
    builds = report.get("engine_builds_1.1b")
    if builds:
        from benchmarks.engine_build import format_table

        lines += ["", "1.1B-shaped engine builds (tensorrt-rtx, ahead of time)", format_table(builds)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.goals", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/llmtrt-bench"), help="scratch directory")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved decode rounds per group")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse the 156M graphs already under --work (no int4 preparation row)")
    ap.add_argument("--full", action="store_true", help="also the 8B-shaped quantizations and 1.1B engine builds")
    ap.add_argument("--rows", help=f"comma-separated row groups to measure, of {', '.join(GROUPS)} (default: decode,1.1b;"
                                   " --full: all)")
    ap.add_argument("--layers-8b", type=int, default=8,
                    help="decoder layers of the 8B-shaped model (of 32; 32 needs ~50 GB of free disk)")
    ap.add_argument("--json", type=Path, help="also write the report as JSON to this file")
    args = ap.parse_args(argv)
    groups = None
    if args.rows:
        groups = tuple(g.strip() for g in args.rows.split(",") if g.strip())
        unknown = [g for g in groups if g not in GROUPS]
        if unknown or not groups:
            ap.error(f"--rows {args.rows!r}: choose from {', '.join(GROUPS)}")
    report = run(args.work, args.rounds, fresh=not args.reuse, full=args.full, layers_8b=args.layers_8b,
                 groups=groups)
    print(format_goals(report))
    if args.json:
        from llmtrt.exporter.files import write_json_atomically

        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(args.json, json.loads(json.dumps(report, default=str)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
