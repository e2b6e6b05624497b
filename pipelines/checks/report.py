"""The result of `llmtrt validate`: integrity findings, per-output comparisons, KV-cache consistency."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ValidationReport:
    artifact: str
    precision: str
    passed: bool
    outputs: list[dict[str, Any]]          # one row per (runner, output)
    kv_cache: list[dict[str, Any]]         # one row per runner
    runners: list[dict[str, Any]]          # name, description, or skipped + reason
    inputs: dict[str, Any]
    tolerances: dict[str, Any]
    layerwise: dict[str, Any] | None = None
    files: dict[str, str] = field(default_factory=dict)
    integrity: list[dict[str, Any]] = field(default_factory=list)  # checks/integrity.py findings

    def __bool__(self) -> bool:
        return self.passed

    def failed(self) -> list[str]:
        bad = [f"{f['check']}:{f['subject']}" for f in self.integrity if not f["passed"]]
        bad += [f"{r['runner']}:{r['output']}" for r in self.outputs if not r["passed"]]
        return bad + [f"{r['runner']}:kv_cache" for r in self.kv_cache if not r["passed"]]

    def summary(self) -> dict[str, Any]:
        worst = max((r["max_absdiff"] for r in self.outputs if r["output"].startswith("logits")), default=None)
        return {"precision": self.precision, "runners": [r["name"] for r in self.runners if not r.get("skipped")],
                "skipped": [r["name"] for r in self.runners if r.get("skipped")], "max_logit_abs_error": worst,
                "failed": self.failed(),
                "first_bad_node": (self.layerwise or {}).get("first_jump", {}).get("node")}

    def to_dict(self) -> dict[str, Any]:
        return {"artifact": self.artifact, "precision": self.precision, "passed": self.passed,
                "runners": self.runners, "inputs": self.inputs, "tolerances": self.tolerances,
                "integrity": self.integrity, "outputs": self.outputs, "kv_cache": self.kv_cache,
                "layerwise": self.layerwise,
                "files": self.files, "summary": self.summary()}

    def table(self) -> str:
        head = (f"{'runner vs pytorch-fp32':<22} {'output':<18} {'max abs':>9} {'mean abs':>9} {'med abs':>9} "
                f"{'max rel':>9} {'mean rel':>9} {'med rel':>9}  {'atol':>7} {'rtol':>7}  result")
        lines = [f"{'check':<10} {'subject':<40} result  detail"]
        for f in self.integrity:
            diff = f" (max abs diff {f['max_abs_diff']:.3g})" if f.get("max_abs_diff") else ""
            lines.append(f"{f['check']:<10} {f['subject']:<40} {'PASS' if f['passed'] else 'FAIL'}    "
                         f"{f['detail']}{diff}")
        lines += ["", head, "-" * len(head)]
        for r in self.outputs:
            extra = "".join(f" {k}={r[k]:.5g}" for k in ("cosine_similarity", "top1_agreement",
                                                           "top1_agreement_all_steps") if k in r)
            lines.append(f"{r['runner']:<22} {r['output']:<18} " + " ".join(
                _num(r[k]) for k in ("max_absdiff", "mean_absdiff", "median_absdiff", "max_reldiff", "mean_reldiff",
                                     "median_reldiff")) + f"  {r['atol']:>7.1e} {r['rtol']:>7.1e}  "
                + ("PASS" if r["passed"] else "FAIL") + extra)
        for r in self.kv_cache:
            lines.append(f"{r['runner']:<22} {'kv_cache':<18} {_num(r['max_absdiff'])} {_num(r['mean_absdiff'])} "
                         f"{_num(r['median_absdiff'])} {_num(r['max_reldiff'])} {_num(r['mean_reldiff'])} "
                         f"{_num(r['median_reldiff'])}  {r['atol']:>7.1e} {r['rtol']:>7.1e}  "
                         + ("PASS" if r["passed"] else "FAIL") + "  prefill+decode vs one pass")
        for r in self.runners:
            if r.get("skipped"):
                lines.append(f"{r['name']}: SKIPPED ({r['reason']})")
        if self.layerwise:
            jump = self.layerwise.get("first_jump")
            lines.append(f"layerwise vs {self.layerwise['reference']}: " + (
                f"error jumps at {jump['node']} ({jump['op_type']}, output {jump['tensor']}): "
                f"{jump['error']:.3g} relative, inputs {jump['input_error']:.3g}" if jump else
                f"no node's error reaches {self.layerwise['min_error']:g}"))
        lines.append(f"{'PASS' if self.passed else 'FAIL'}: {self.artifact} ({self.precision}) vs PyTorch fp32")
        return "\n".join(lines)


def _num(x: float | None) -> str:
    return f"{x:>9.2e}" if x is not None else f"{'-':>9}"
