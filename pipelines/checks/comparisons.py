"""Polygraphy comparison functions for `llmtrt validate` and the rows they produce.

Protocol: ``(IterationResult, IterationResult) -> {output: bool-like}``; ``bool()`` means passed.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmtrt.pipelines.checks.tolerances import GroupTolerance, Tolerances, _lookup, group_of
from llmtrt.pipelines.checks.validation_runner import ONE_PASS, PREFILL, decode_name


@dataclass
class Top1Result:
    agreement: float  # this output's own positions
    threshold: float
    pooled: float     # every gated logits output's positions together: what is judged

    def __bool__(self) -> bool:
        return self.pooled >= self.threshold


class Top1AgreementCompareFunc:
    """Fraction of real (non-padding) positions whose argmax equals the reference's. Judged over all the
    logits outputs together (prefill and every decode step): a decode step has one position per row, and
    on a real model a single near-tie among four rows would move its own share by 25%."""

    def __init__(self, thresholds: Mapping[str, float]) -> None:
        self.thresholds = dict(thresholds)

    def __call__(self, result0, result1):
        counts = {}
        for name in self.thresholds:
            if name in result0 and name in result1:
                a, b = np.asarray(result0[name], np.float32), np.asarray(result1[name], np.float32)
                real = np.any(b != 0, axis=-1)
                agree = (a.argmax(-1) == b.argmax(-1))[real]
                counts[name] = (int(agree.sum()), int(agree.size))
        total = sum(n for _, n in counts.values())
        pooled = sum(k for k, _ in counts.values()) / total if total else 1.0
        return OrderedDict((name, Top1Result(k / n if n else 1.0, self.thresholds[name], pooled))
                           for name, (k, n) in counts.items())


def _only(names: set[str]):
    """A Polygraphy find_output_func comparing just ``names``."""

    def find(name, index, iter_result):
        return [name] if name in names and name in iter_result else []

    return find


def compare_funcs(outputs: Sequence[str], tol: Tolerances, atol: Mapping[str, float], rtol: Mapping[str, float]):
    """Polygraphy comparison functions for the gated outputs: max check always, the rest where configured."""
    from polygraphy.comparator import CosineSimilarityCompareFunc, SimpleCompareFunc

    gated = set(outputs)
    g = {name: tol.groups[group_of(name)] for name in outputs}
    funcs = [("max", SimpleCompareFunc(
        atol={n: _lookup(atol, n, g[n].atol) for n in outputs}, rtol={n: _lookup(rtol, n, g[n].rtol) for n in outputs},
        check_error_stat="max", find_output_func=_only(gated)))]
    mean = {n: g[n].mean_atol for n in outputs if g[n].mean_atol is not None}
    if mean:
        funcs.append(("mean", SimpleCompareFunc(atol=mean, rtol=dict.fromkeys(mean, 0.0), check_error_stat="mean",
                                                find_output_func=_only(set(mean)))))
    cosine = {n: g[n].min_cosine_similarity for n in outputs if g[n].min_cosine_similarity is not None}
    if cosine:
        funcs.append(("cosine", CosineSimilarityCompareFunc(cosine_similarity_threshold=cosine,
                                                             find_output_func=_only(set(cosine)))))
    top1 = {n: g[n].min_top1_agreement for n in outputs
            if g[n].min_top1_agreement is not None and n.startswith("logits")}
    if top1:
        funcs.append(("top1", Top1AgreementCompareFunc(top1)))
    return funcs


def _stats(result) -> dict[str, float]:
    return {k: getattr(result, k) for k in ("max_absdiff", "mean_absdiff", "median_absdiff",
                                            "max_reldiff", "mean_reldiff", "median_reldiff")}


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


def _output_rows(accuracy, funcs, names: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    by_kind = dict(zip([k for k, _ in funcs], accuracy, strict=True))
    for pair in by_kind["max"]:
        runner = pair[0]
        for name in names:
            per = {kind: result[pair][0].get(name) for kind, result in by_kind.items()}
            base = per["max"]
            if base is None:  # output missing from one side: a failure, not a skip
                rows.append({"runner": runner, "output": name, "passed": False, "error": "output missing",
                             **dict.fromkeys(("max_absdiff", "mean_absdiff", "median_absdiff", "max_reldiff",
                                              "mean_reldiff", "median_reldiff")), "atol": 0.0, "rtol": 0.0})
                continue
            threshold = base.thresholds
            row = {"runner": runner, "output": name, **{k: _finite(v) for k, v in _stats(base).items()},
                   "atol": threshold.atol, "rtol": threshold.rtol,
                   "checks": {kind: bool(r) for kind, r in per.items() if r is not None}}
            if base.max_absdiff is None or not math.isfinite(base.max_absdiff):
                row["checks"]["finite"] = False
            if per.get("cosine") is not None:
                row["cosine_similarity"] = per["cosine"].cosine_similarity
            if per.get("top1") is not None:
                row["top1_agreement"] = per["top1"].agreement
                row["top1_agreement_all_steps"] = per["top1"].pooled
            row["passed"] = all(row["checks"].values())
            rows.append(row)
    return rows


def _kv_consistency(runner: str, outputs, steps: int, tol: GroupTolerance) -> dict[str, Any]:
    """Within one runner: last-position logits of prefill and each decode step vs one forward over N + M
    (of a last-logits graph's one forward, only its last position exists: the last step's)."""
    from polygraphy.comparator import SimpleCompareFunc
    from polygraphy.comparator.struct import IterationResult

    stepped = np.concatenate([outputs[PREFILL][:, -1:]] + [outputs[decode_name(i)] for i in range(1, steps + 1)], 1)
    stepped = np.ascontiguousarray(stepped[:, stepped.shape[1] - outputs[ONE_PASS].shape[1]:])
    a = IterationResult({"logits": stepped}, runner_name=f"{runner} prefill+decode")
    b = IterationResult({"logits": outputs[ONE_PASS]}, runner_name=f"{runner} one pass")
    result = SimpleCompareFunc(atol=tol.atol, rtol=tol.rtol, check_error_stat="max")(a, b)["logits"]
    checks = {"max": bool(result)}
    if tol.mean_atol is not None:
        checks["mean"] = result.mean_absdiff <= tol.mean_atol
    if not math.isfinite(result.max_absdiff):
        checks["finite"] = False
    return {"runner": runner, **{k: _finite(v) for k, v in _stats(result).items()}, "atol": tol.atol,
            "rtol": tol.rtol, "checks": checks, "passed": all(checks.values())}
