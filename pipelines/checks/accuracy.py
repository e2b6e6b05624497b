"""Accuracy metrics of one precision against fp32, and the thresholds that gate them
(configs/compare_thresholds.yaml)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmtrt import configs
from llmtrt.exporter.errors import LlmtrtUserError

REFERENCE = "fp32"
DEFAULT_THRESHOLDS = configs.path("compare_thresholds.yaml")
PYTORCH = "pytorch-fp32"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p over the last axis, in float64."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass
class Totals:
    """Running sums over scored positions; :meth:`add` takes one batch of windows."""

    tokens: int = 0
    nll: float = 0.0
    correct: int = 0          # argmax == the actual next token
    agree: int = 0            # argmax == the reference's argmax
    kl: float = 0.0           # sum of KL(p_ref || p)
    max_abs_logit_error: float = 0.0
    nonfinite: int = 0        # positions with a NaN/inf logit
    seconds: float = 0.0

    def add(self, logits: np.ndarray, targets: np.ndarray, ref_logits: np.ndarray) -> None:
        """``logits``/``ref_logits`` [positions, vocab] predict ``targets`` [positions]."""
        logits = logits.astype(np.float64)
        ref_logits = ref_logits.astype(np.float64)
        bad = ~np.isfinite(logits).all(axis=-1)
        self.nonfinite += int(bad.sum())
        logp = log_softmax(logits)
        ref_logp = log_softmax(ref_logits)
        rows = np.arange(len(targets))
        self.tokens += len(targets)
        self.nll += float(-logp[rows, targets].sum())
        top1 = logits.argmax(axis=-1)
        self.correct += int((top1 == targets).sum())
        self.agree += int((top1 == ref_logits.argmax(axis=-1)).sum())
        with np.errstate(invalid="ignore"):
            self.kl += float((np.exp(ref_logp) * (ref_logp - logp)).sum())
        self.max_abs_logit_error = max(self.max_abs_logit_error, float(np.abs(logits - ref_logits).max()))
        if bad.any():  # NaN compares false in max(); make it stick
            self.max_abs_logit_error = math.nan


@dataclass(frozen=True)
class PrecisionMetrics:
    precision: str
    artifact: str
    tokens: int
    perplexity: float
    mean_nll: float
    next_token_accuracy: float
    top1_agreement: float
    mean_kl: float
    max_abs_logit_error: float
    perplexity_increase: float  # perplexity / reference perplexity - 1
    nonfinite_positions: int
    tokens_per_second: float

    @classmethod
    def from_totals(cls, precision: str, artifact: str, t: Totals, ref_perplexity: float | None) -> PrecisionMetrics:
        mean_nll = t.nll / t.tokens
        ppl = math.exp(mean_nll) if math.isfinite(mean_nll) else math.nan
        ref = ppl if ref_perplexity is None else ref_perplexity
        return cls(precision, artifact, t.tokens, ppl, mean_nll, t.correct / t.tokens, t.agree / t.tokens,
                   t.kl / t.tokens, t.max_abs_logit_error, ppl / ref - 1.0, t.nonfinite,
                   t.tokens / t.seconds if t.seconds > 0 else math.nan)


def perplexity(token_log_probs: np.ndarray) -> float:
    """exp(-mean log p(token)); the quantity :class:`Totals` accumulates."""
    return float(np.exp(-np.mean(token_log_probs, dtype=np.float64)))


# --------------------------------------------------------------------------------------------
# thresholds (configs/compare_thresholds.yaml)
# --------------------------------------------------------------------------------------------
_LIMIT = {"min": 0.0}
_FRACTION = {"min": 0.0, "max": 1.0}


@dataclass(frozen=True)
class Threshold:
    """Limits for one precision against fp32; None means not checked."""

    max_perplexity_increase: float | None = field(default=None, metadata=_LIMIT)  # relative: 0.001 = 0.1 %
    min_top1_agreement: float | None = field(default=None, metadata=_FRACTION)
    max_mean_kl: float | None = field(default=None, metadata=_LIMIT)
    max_abs_logit_error: float | None = field(default=None, metadata=_LIMIT)


@dataclass(frozen=True)
class ReferenceCheck:
    """How closely the fp32 ONNX artifact must match the fp32 PyTorch model."""

    max_perplexity_rel_diff: float = field(default=1e-4, metadata=_LIMIT)
    min_top1_agreement: float = field(default=0.999, metadata=_FRACTION)
    max_abs_logit_error: float | None = field(default=None, metadata=_LIMIT)


@dataclass(frozen=True)
class Thresholds:
    """configs/compare_thresholds.yaml"""

    precisions: dict[str, Threshold]
    pytorch_reference: ReferenceCheck = field(default_factory=ReferenceCheck)
    must_beat: dict[str, str] = field(default_factory=dict)  # {"int4-awq": "int4-rtn"}: lower perplexity
    source: str = field(default="<defaults>", init=False)

    def __post_init__(self) -> None:
        for better, worse in self.must_beat.items():
            for name in (better, worse):
                if name not in self.precisions:
                    raise LlmtrtUserError(f"must_beat.{better}: {name!r} is not a precision listed under precisions")


def load_thresholds(path: str | Path) -> Thresholds:
    """The thresholds YAML (unknown keys, wrong types and bounds are errors naming file, line and key)."""
    from llmtrt.exporter.yaml_schema import load_dataclass

    thresholds = load_dataclass(Thresholds, path)
    object.__setattr__(thresholds, "source", str(path))
    return thresholds


def parse_thresholds(raw: Any, source: str) -> Thresholds:
    """Thresholds from already-parsed data (same checks as the file)."""
    import yaml

    from llmtrt.exporter.yaml_schema import loads_dataclass

    thresholds = loads_dataclass(Thresholds, yaml.safe_dump(raw), source)
    object.__setattr__(thresholds, "source", source)
    return thresholds


@dataclass(frozen=True)
class Check:
    """One gate: ``subject`` (a precision, or "awq vs rtn"), what was measured, the limit, passed."""

    subject: str
    metric: str
    value: float
    limit: float
    op: str  # "<=", ">=", "<"

    @property
    def passed(self) -> bool:
        if self.op == "<=":
            return self.value <= self.limit  # NaN fails
        if self.op == ">=":
            return self.value >= self.limit
        return self.value < self.limit

    def __str__(self) -> str:
        return (f"{self.subject}: {self.metric} {_fmt(self.value)} {self.op} {_fmt(self.limit)} "
                f"{'OK' if self.passed else 'NOT OK'}")


_THRESHOLD_METRICS = (("max_perplexity_increase", "perplexity_increase", "<="),
                      ("min_top1_agreement", "top1_agreement", ">="),
                      ("max_mean_kl", "mean_kl", "<="),
                      ("max_abs_logit_error", "max_abs_logit_error", "<="))


def gate(metrics: Mapping[str, PrecisionMetrics], thresholds: Thresholds) -> tuple[list[Check], list[str]]:
    """The checks the thresholds ask for, and the precisions that have no limits (not gated)."""
    checks, ungated = [], []
    for name, m in metrics.items():
        if name in (REFERENCE, PYTORCH):
            continue
        limits = thresholds.precisions.get(name)
        if limits is None:
            ungated.append(name)
            continue
        for limit_name, metric, op in _THRESHOLD_METRICS:
            limit = getattr(limits, limit_name)
            if limit is not None:
                checks.append(Check(name, metric, getattr(m, metric), limit, op))
        checks.append(Check(name, "nonfinite_positions", m.nonfinite_positions, 0, "<="))
    for better, worse in thresholds.must_beat.items():
        if better in metrics and worse in metrics:
            checks.append(Check(f"{better} vs {worse}", "perplexity", metrics[better].perplexity,
                                metrics[worse].perplexity, "<"))
    if PYTORCH in metrics:
        ref, limits = metrics[PYTORCH], thresholds.pytorch_reference
        checks.append(Check(f"{REFERENCE} onnx vs pytorch", "perplexity_rel_diff", abs(ref.perplexity_increase),
                            limits.max_perplexity_rel_diff, "<="))
        checks.append(Check(f"{REFERENCE} onnx vs pytorch", "top1_agreement", ref.top1_agreement,
                            limits.min_top1_agreement, ">="))
        if limits.max_abs_logit_error is not None:
            checks.append(Check(f"{REFERENCE} onnx vs pytorch", "max_abs_logit_error", ref.max_abs_logit_error,
                                limits.max_abs_logit_error, "<="))
    return checks, ungated


def _fmt(x: float) -> str:
    return f"{x:.6g}"
