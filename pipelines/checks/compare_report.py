"""The reports of `llmtrt compare`: compare.json, compare.md and compare.png."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmtrt.pipelines.checks.accuracy import PYTORCH, REFERENCE, Check, PrecisionMetrics


@dataclass
class CompareResult:
    metrics: dict[str, PrecisionMetrics]
    checks: list[Check]
    ungated: list[str]
    eval: dict[str, Any]
    thresholds: str
    notes: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def summary(self) -> dict[str, Any]:
        return {"perplexity": {k: round(m.perplexity, 6) for k, m in self.metrics.items()},
                "failed_checks": [str(c) for c in self.failed], "ungated": self.ungated}

    def to_dict(self) -> dict[str, Any]:
        return {"passed": bool(self), "reference": REFERENCE, "eval": self.eval, "thresholds": self.thresholds,
                "metrics": {k: _jsonable(asdict(m)) for k, m in self.metrics.items()},
                "checks": [{**_jsonable(asdict(c)), "passed": c.passed} for c in self.checks],
                "ungated": self.ungated, "notes": self.notes}

    def table(self) -> str:
        """Markdown table: one row per precision."""
        head = ("| precision | perplexity | vs fp32 | top-1 agree | mean KL | max abs logit err | next-token acc "
                "| gate |\n|---|---:|---:|---:|---:|---:|---:|---|")
        rows = []
        for name, m in self.metrics.items():
            mine = [c for c in self.checks if c.subject == name]
            status = ("reference" if name == REFERENCE else "check" if name == PYTORCH
                      else "not gated" if name in self.ungated
                      else "OK" if all(c.passed for c in mine) else "NOT OK")
            rows.append(f"| {name} | {m.perplexity:.4f} | {m.perplexity_increase * 100:+.3f}% | "
                        f"{m.top1_agreement:.4f} | {m.mean_kl:.2e} | {m.max_abs_logit_error:.3g} | "
                        f"{m.next_token_accuracy:.4f} | {status} |")
        return "\n".join([head, *rows])

    def markdown(self) -> str:
        e = self.eval
        lines = ["# Accuracy per precision", "",
                 f"Held-out text `{e['text']}` ({e['tokens']} tokens, {e['tokenizer']} tokenizer), "
                 f"non-overlapping windows of {e['seq_len']}"
                 f"{'' if e.get('bos_id') is None else ' each starting with BOS (id ' + str(e['bos_id']) + ')'}, "
                 f"{e['predictions']} predictions; reference "
                 f"{REFERENCE} ONNX; thresholds `{self.thresholds}`.", "", self.table(), "",
                 f"**{'PASSED' if self else 'FAILED'}**: {len(self.checks) - len(self.failed)}/{len(self.checks)} "
                 "checks met.", ""]
        lines += [f"- {c}" for c in self.checks]
        if self.ungated:
            lines += ["", f"Not gated (no thresholds for them): {', '.join(self.ungated)}."]
        lines += [f"\n{n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def write_reports(result: CompareResult, out_dir: Path, say: Callable[[str], None] = print) -> dict[str, Path]:
    """compare.json, compare.md and (with matplotlib) compare.png, each written whole or not at all."""
    from llmtrt.exporter.files import write_json_atomically, write_text_atomically

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "compare.json", "md": out_dir / "compare.md"}
    write_json_atomically(paths["json"], result.to_dict())
    write_text_atomically(paths["md"], result.markdown())
    from llmtrt.pipelines.checks import frontier

    paths.update(frontier.write({n: m for n, m in result.metrics.items() if n != PYTORCH}, out_dir))
    png = write_plot(result, out_dir / "compare.png")
    if png is None:
        say("note: matplotlib is not installed, so compare.png was not drawn (pip install matplotlib)")
    else:
        paths["png"] = png
    return paths


def write_plot(result: CompareResult, path: Path) -> Path | None:
    """Perplexity and top-1 agreement per precision as a PNG; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [n for n in result.metrics if n != PYTORCH]
    ppl = [result.metrics[n].perplexity for n in names]
    agree = [result.metrics[n].top1_agreement for n in names]
    failed = {c.subject for c in result.failed}
    colors = ["tab:red" if n in failed else "tab:gray" if n == REFERENCE else "tab:blue" for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    finite = [p for p in ppl if math.isfinite(p)] or [1.0]
    bars = left.bar(names, [p if math.isfinite(p) else 0.0 for p in ppl], color=colors)
    left.bar_label(bars, labels=[f"{p:.4g}" for p in ppl], fontsize=8)
    left.axhline(result.metrics[REFERENCE].perplexity, color="black", linewidth=0.8, linestyle="--")
    left.set_ylabel("perplexity (lower is better)")
    left.set_ylim(min(finite) * 0.98, max(finite) * 1.03)
    bars = right.bar(names, agree, color=colors)
    right.bar_label(bars, labels=[f"{a:.4f}" for a in agree], fontsize=8)
    right.set_ylabel(f"top-1 agreement with {REFERENCE}")
    right.set_ylim(max(0.0, min(agree) - 0.02), 1.005)
    for ax in (left, right):
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"{result.eval['text']}: {result.eval['predictions']} predictions (red: over threshold)")
    fig.tight_layout()
    from llmtrt.exporter.files import atomic_file

    try:
        with atomic_file(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    return path
