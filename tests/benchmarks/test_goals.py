"""The issue-15 goal table: ratios to the goal point the right way, a missed goal reads NO, a figure that is
not what the goal names is never counted as met, and quantize rows measure a real `llmtrt quantize`."""

from benchmarks.goals import GOALS, format_goals, goal_row, quantize_figures
from llmtrt.exporter.config import resolve_model
from llmtrt.exporter.onnx_export import ExportOptions
from llmtrt.pipelines.artifacts import export_artifact


def test_ratio_to_goal_is_at_least_one_only_when_met_in_both_directions():
    slow = goal_row("decode fp32", 0.94)  # the "before": higher is better, 0.94 of 1.0
    assert (slow["to_goal"], slow["met"]) == (0.94, False)
    assert goal_row("decode int4", 1.21)["to_goal"] == 1.1 and goal_row("decode int4", 1.21)["met"] is True
    before = goal_row("int4 prep", 13.0)  # lower is better: 13x the builder's seconds against <= 3x
    assert (before["to_goal"], before["met"]) == (round(3 / 13, 3), False)
    assert goal_row("int4 prep", 2.5)["met"] is True and goal_row("1.1b int4-awq GB", 2.2)["met"] is True
    assert goal_row("1.1b int4-awq s", 180.5)["met"] is False


def test_unmeasured_or_partial_rows_are_never_met():
    missing = goal_row("decode int8", None, "builder int8: exited 1")
    assert (missing["to_goal"], missing["met"]) == (None, None)
    partial = goal_row("8b int4-awq min", 20.0, "8 of 32 layers", countable=False)
    assert partial["to_goal"] == 2.0 and partial["met"] is None  # within the goal, but not the 32-layer model


def test_table_names_every_row_and_says_no_for_a_missed_goal():
    rows = [goal_row("decode fp32", 1.2), goal_row("decode int8", 0.8), goal_row("decode int4", None, "why")]
    text = format_goals({"full": False, "cpu_count": 2, "load_average_start": (1.0, 1.0, 1.0),
                         "default_dialect": "standard", "rows": rows})
    lines = {line.split("  ")[0]: line for line in text.splitlines()}
    assert lines[GOALS["decode fp32"].row].rstrip().endswith("yes")
    assert lines[GOALS["decode int8"].row].rstrip().endswith("NO")
    assert "(why)" in lines[GOALS["decode int4"].row]


def test_quantize_figures_time_a_real_quantize_and_leave_nothing(tmp_path):
    export_dir = tmp_path / "tiny"
    export_artifact(resolve_model("tiny"), export_dir, ExportOptions())
    figures = quantize_figures(export_dir, tmp_path / "q", "int8-wo")
    assert figures["seconds"] > 0 and figures["peak_rss_bytes"] > 10 << 20, figures
    assert not (tmp_path / "q").exists()
    refused = quantize_figures(export_dir, tmp_path / "q", "int3-nonsense")
    assert "error" in refused and "int3-nonsense" in refused["error"]


def test_the_default_dialect_is_one_across_cli_export_options_and_pipeline_config():
    from benchmarks.goals import default_dialect
    from llmtrt.pipelines.cli import main
    from llmtrt.pipelines.pipeline.config import PipelineConfig

    cli = next(p.default for p in main.commands["export"].params if p.name == "dialect")
    pipeline = PipelineConfig.__dataclass_fields__["ops"].default
    assert cli == default_dialect() == pipeline == "standard"  # measured fastest in ONNX Runtime: docs/benchmarks.md


def test_engine_rows_hold_rss_and_plan_to_their_goals_and_name_a_failed_build():
    from benchmarks.goals import engine_rows

    def built(p, rss, plan):
        return {"model": f"1.1b {p}", "weights_bytes": 4.4e9, "plan_bytes": 4.4e9 * plan, "wall_seconds": 36.0,
                "peak_rss_bytes": 4.4e9 * rss, "peak_rss_over_weights": rss, "plan_over_weights": plan}

    rows = {r["goal"]: r for r in engine_rows({"rows": [built("fp32", 1.39, 1.003), built("fp16", 4.8, 1.95),
                                                        {"model": "1.1b int4", "error": "parser: no INT4"}]})}
    assert rows["engine fp32 rss"]["met"] is True and rows["engine fp32 plan"]["met"] is True
    assert rows["engine fp16 rss"]["met"] is False and rows["engine fp16 plan"]["met"] is False  # the before
    assert rows["engine int4 rss"]["met"] is None and "no INT4" in rows["engine int4 rss"]["detail"]
