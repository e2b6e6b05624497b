"""A mixed precision: which scheme each group of linears gets, and what the graph must then show.

    mix = Mix("int4-awq@ppl+3%", base="int4-awq", schemes=(("model.layers.0.mlp.down_proj", "int8-wo"),))
    quantize("out/onnx", "out/mixed", "int4-awq", options, mix=mix)   # groups not named get the base scheme

A *group* is the linears sharing one input (q/k/v or one fused qkv_proj, gate/up, o_proj, down_proj),
named by its first linear's module. Each group is written by one scheme of
:data:`llmtrt.pipelines.precision.schemes.MIX_SCHEMES` (the base precision's own, a weight-only int8
fallback, or fp16), so a mixed graph holds blocked-int4 and per-channel int8 DequantizeLinear nodes and
fp16 MatMuls side by side. The written graph's inventory must show, linear by linear, the label of the
scheme asked for (:data:`LABELS`); quantize refuses it otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# scheme -> the inventory label its linears have in the written graph
LABELS = {"int4-awq": "int4", "int4-rtn": "int4", "int8-wo": "int8-wo", "int8-sq": "int8", "fp16": "fp16"}
FALLBACKS = ("int8-wo", "fp16")   # in order: what a sensitive group falls back to


@dataclass(frozen=True)
class Mix:
    name: str                                  # the manifest's precision, e.g. "int4-awq@ppl+3%"
    base: str                                  # the precision of every group not named in ``schemes``
    schemes: tuple[tuple[str, str], ...] = ()  # (group, scheme)
    record: dict[str, Any] = field(default_factory=dict, compare=False)  # figures for the manifest's "mix"

    def scheme_of(self, group: str) -> str:
        return dict(self.schemes).get(group, self.base)

    def check(self) -> None:
        from llmtrt.pipelines.errors import LlmtrtUserError

        for group, scheme in self.schemes:
            if scheme not in LABELS:
                raise LlmtrtUserError(f"mix {self.name!r}: {group}: unknown scheme {scheme!r}; choose from "
                                      f"{', '.join(LABELS)}")


def effective_bits(inventory: dict[str, Any]) -> dict[str, Any]:
    """Stored bits per weight of the decoder linears (the lm_head, fp16 in every int8/int4 artifact, left
    out): the inventory's stored bytes of each weight and its scales (fp32, 32 bits each) x 8, over the
    weights' parameter count."""
    rows = [x for x in inventory["linears"] if x["role"] != "lm_head"]
    params = sum(x["in_features"] * x["out_features"] for x in rows)
    bits = sum(8 * x["weight_bytes"] for x in rows)
    return {"bits_per_weight": bits / params if params else float("nan"), "parameters": params,
            "stored_bytes": bits // 8, "linears": len(rows),
            "counted": "stored weight bits + fp32 scale bits, over parameters; decoder linears, lm_head excluded"}


_BUDGET_FORMS = "BASE@ppl+PCT%, BASE@klX or BASE@ppl+PCT%,klX (e.g. int4-awq@ppl+3%)"


def parse_precision(name: str) -> tuple[str, float | None, float | None]:
    """A precision name as pipeline configs write it: ``int4-awq`` -> ("int4-awq", None, None);
    ``int4-awq@ppl+3%`` -> ("int4-awq", 3.0, None); ``int4-awq@kl0.01``; ``int4-awq@ppl+3%,kl0.01``.
    Raises ValueError naming the forms. (The same text as ``budget.Budget.label`` writes.)"""
    base, at, spec = name.partition("@")
    if not at:
        return name, None, None
    ppl = kl = None
    for part in spec.split(","):
        try:
            if part.startswith("ppl+") and part.endswith("%") and ppl is None:
                ppl = float(part[4:-1])
            elif part.startswith("kl") and kl is None:
                kl = float(part[2:])
            else:
                raise ValueError(part)
        except ValueError:
            raise ValueError(f"{name!r}: bad budget {part!r}; write {_BUDGET_FORMS}") from None
    for value in (ppl, kl):
        if value is not None and not value >= 0:
            raise ValueError(f"{name!r}: a budget must be a non-negative number")
    return base, ppl, kl
