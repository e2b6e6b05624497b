"""``llmtrt quantize --sensitivity`` and ``--max-ppl-increase`` / ``--max-kl``: the steps around the search.

    out, record = quantize_to_budget("out/onnx", "out/mixed", "int4-awq", options, Budget(max_ppl_increase=3))

1. the uniform target artifact, written to a temporary directory by :func:`.quantize.quantize` (the
   streaming quantizer, calibration included): its weight map gives each group's target weights;
2. a :class:`.mix_eval.MixEvaluator` on the calibration windows (the same windows, BOS included);
3. :func:`.budget.sensitivity`, then with a budget :func:`.budget.search` (moves ordered by the bytes
   each group stores per scheme, :func:`.budget.group_bytes`);
4. the artifact written by :func:`.quantize.quantize` again, with the mix (each group's scheme) and the
   first run's calibration cache; its manifest records the sensitivity ranking, the mix, the
   calibration-set figures, the search cost and the effective bits per weight.

When no mix meets the budget, :class:`.budget.BudgetNotMet` carries the best one found and nothing is
written (the CLI exits 1).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from llmtrt.pipelines.errors import LlmtrtUserError
from llmtrt.pipelines.precision.budget import (
    TARGETS,
    Budget,
    BudgetNotMet,
    group_bytes,
    search,
    sensitivity,
    variants,
)
from llmtrt.pipelines.precision.mix import Mix


def calibration_windows_for(src_dir: Path, options) -> tuple[Any, str]:
    """The calibration windows quantize uses for ``src_dir`` (same text, tokenizer, BOS), and a label."""
    from llmtrt.pipelines.precision.calibration import DEFAULT_CALIB_TEXT, calibration_windows
    from llmtrt.pipelines.runtime.tokenizer import load_tokenizer

    text = Path(options.calib_text) if options.calib_text else DEFAULT_CALIB_TEXT
    tok = load_tokenizer(src_dir, add_bos=options.add_bos)
    bos = tok.bos_id if tok.add_bos else None
    windows = calibration_windows(text, tok, options.calib_samples, options.calib_seq_len, bos_id=bos)
    label = f"{windows.shape[0]} calibration windows x {windows.shape[1]} tokens of {text.name}" + \
        (" (BOS first)" if bos is not None else "")
    return windows, label


def quantize_to_budget(src_dir: str | Path, out_dir: str | Path, precision: str, options,
                       budget: Budget | None) -> tuple[Path, dict[str, Any]]:
    """With ``budget``: the mixed artifact meeting it (or BudgetNotMet); without: the uniform ``precision``
    artifact with the sensitivity ranking recorded. Returns (out_dir, the manifest's "mix"/"sensitivity")."""
    from llmtrt.exporter.files import check_out_dir
    from llmtrt.pipelines.artifacts import read_manifest
    from llmtrt.pipelines.precision import sensitivity_report
    from llmtrt.pipelines.precision.mix_eval import MixEvaluator
    from llmtrt.pipelines.precision.quantize import quantize

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if precision not in TARGETS:
        raise LlmtrtUserError(f"--to {precision}: sensitivity and budgets start from {' or '.join(TARGETS)} "
                              "(int8-wo and fp16 are the fallbacks)")
    if budget is not None:
        budget.check()
    check_out_dir(out_dir)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".llmtrt-mix-", dir=out_dir.resolve().parent) as tmp:
        uniform = quantize(src_dir, Path(tmp) / "uniform", precision, options)
        t_uniform = time.perf_counter() - t0
        windows, label = calibration_windows_for(src_dir, options)
        ev = MixEvaluator(src_dir, windows, keep=tuple(options.keep_fp32))
        var = variants(ev, uniform, precision)
        ranking = sensitivity(ev, var, precision)
        extra = {"sensitivity": {"target": precision, "windows": label, "evaluations": ev.evaluations,
                                 "groups": ranking}}
        files = sensitivity_report.files(ranking, precision, label)
        mix = None
        if budget is not None:
            sizes = group_bytes(ev, read_manifest(uniform)["precision_inventory"], precision)
            result = search(ev, var, ranking, precision, budget, sizes)
            record = {"budget": {"max_ppl_increase_percent": budget.max_ppl_increase, "max_kl": budget.max_kl},
                      "met": result.met, "calibration": {"windows": label, **result.figures.to_dict(),
                                                         "fp32_perplexity": float(_exp(ev.reference_nll))},
                      "groups": result.assignment, "steps": result.steps,
                      "search": {"evaluations": ev.evaluations, "evaluation_seconds": round(ev.seconds, 3),
                                 "uniform_quantize_seconds": round(t_uniform, 3)}}
            if not result.met:
                raise BudgetNotMet(_not_met(precision, budget, result), result)
            schemes = tuple((g, s) for g, s in result.assignment.items() if s != precision)
            mix = Mix(f"{precision}@{budget.label}", precision, schemes, record)
        quantize(src_dir, out_dir, precision, options, mix=mix, cache_from=uniform, extra_manifest=extra,
                 extra_files=files)
    return out_dir, {"sensitivity": extra["sensitivity"], "mix": mix.record if mix else None,
                     "seconds": time.perf_counter() - t0}


def _exp(x: float) -> float:
    import math

    return math.exp(x)


def _not_met(precision: str, budget: Budget, result) -> str:
    f = result.figures
    moved = {g: s for g, s in result.assignment.items() if s != precision}
    return (f"no mix of {precision} with fallbacks meets the budget {budget.label} on the calibration windows; "
            f"the best found ({len(moved)} of {len(result.assignment)} groups moved: "
            + ", ".join(f"{g}->{s}" for g, s in list(moved.items())[:4]) + ("..." if len(moved) > 4 else "")
            + f") has perplexity {100 * f.ppl_increase:+.3f}% and mean KL {f.mean_kl:.3e}. Nothing was written; "
            "raise the budget or calibrate on text closer to the use")
