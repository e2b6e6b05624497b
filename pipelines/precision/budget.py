"""Layer sensitivity and an accuracy budget instead of a recipe (``llmtrt quantize --sensitivity``,
``--max-ppl-increase PCT`` / ``--max-kl X``).

    report = sensitivity(ev, variants, "int4-awq")        # groups ranked by KL when quantized alone
    result = search(ev, variants, report, "int4-awq", Budget(max_ppl_increase=3.0))

**Variants.** Each group's weights as every candidate scheme would write them: the target's from a
real uniform artifact of the target precision (its weight map: int4 values x block scales, AWQ's
smoothing undone), ``int8-wo`` by ``quant_math.int8_per_channel`` of the fp32 weight (what the
int8-wo scheme writes), ``fp16`` the weight rounded to fp16. One group's variants are a few weights
in memory, the whole model's the size of the fp32 linears (fine for the small models measured; an
8B export would need them streamed per stage).

**Sensitivity.** For every group alone at the target (the rest fp32): mean KL(p_fp32 || p) of the
final logits on the calibration windows, and the perplexity increase; ranked, largest first.

**Search.** A move sends one group to a fallback: every group to the first fallback (``int8-wo``),
then every group to the second (``fp16``). Within a level, moves that also save bytes come first (an
int4 weight with blocks of 4 stores 12 bits per weight, more than int8's ~8.2), then the others by
sensitivity per extra byte, largest first: the accuracy bought per byte spent. The fewest leading
moves that meet the budget are found by bisection, each candidate measured on the calibration
windows: ``2 + ceil(log2(groups x fallbacks))`` evaluations at most. The budget is on the calibration
windows; ``llmtrt compare`` checks it on held-out text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmtrt.pipelines.errors import LlmtrtUserError
from llmtrt.pipelines.precision import quant_math as qm
from llmtrt.pipelines.precision.mix import FALLBACKS
from llmtrt.pipelines.precision.mix_eval import Figures, MixEvaluator

TARGETS = ("int4-awq", "int4-rtn")   # precisions a budget search starts from


@dataclass(frozen=True)
class Budget:
    max_ppl_increase: float | None = None   # percent over fp32 perplexity on the calibration windows
    max_kl: float | None = None             # mean KL(p_fp32 || p), nats per position

    def check(self) -> None:
        if self.max_ppl_increase is None and self.max_kl is None:
            raise LlmtrtUserError("a budget needs --max-ppl-increase PCT and/or --max-kl X")
        for flag, value in (("--max-ppl-increase", self.max_ppl_increase), ("--max-kl", self.max_kl)):
            if value is not None and not value >= 0:
                raise LlmtrtUserError(f"{flag} {value}: must be a non-negative number")

    @property
    def label(self) -> str:
        """The mix's name after its base precision: ``int4-awq@ppl+3%``, ``@kl0.01``, ``@ppl+3%,kl0.01``."""
        parts = ([f"ppl+{self.max_ppl_increase:g}%"] if self.max_ppl_increase is not None else []) + \
                ([f"kl{self.max_kl:g}"] if self.max_kl is not None else [])
        return ",".join(parts)

    def meets(self, fig: Figures) -> bool:
        ok = np.isfinite(fig.ppl_increase)
        if self.max_ppl_increase is not None:
            ok = ok and fig.ppl_increase * 100.0 <= self.max_ppl_increase
        if self.max_kl is not None:
            ok = ok and fig.mean_kl <= self.max_kl
        return bool(ok)


@dataclass
class SearchResult:
    met: bool
    assignment: dict[str, str]              # group -> scheme of the mix chosen (the best one when not met)
    figures: Figures
    steps: list[dict[str, Any]] = field(default_factory=list)   # every evaluation: what moved, figures


class BudgetNotMet(RuntimeError):
    """No mix the search tried meets the budget (the CLI exits 1 and writes nothing)."""

    def __init__(self, message: str, result: SearchResult) -> None:
        super().__init__(message)
        self.result = result


# --------------------------------------------------------------------------------------------
# the weights each scheme gives each group
# --------------------------------------------------------------------------------------------
def variants(ev: MixEvaluator, target_dir: Path, target: str) -> dict[str, dict[str, np.ndarray]]:
    """scheme -> {weight initializer name -> fp32 [in, out] as the scheme's DequantizeLinear gives it}."""
    from llmtrt.pipelines.artifacts import read_manifest

    manifest = read_manifest(target_dir)
    arrays = _initializers(target_dir / manifest["onnx"])
    source = _initializers(ev.onnx_path)
    wmap = manifest["weight_map"]["linears"]
    out: dict[str, dict[str, np.ndarray]] = {target: {}, "int8-wo": {}, "fp16": {}}
    for group in ev.groups.values():
        for info in group:
            w = ev.fp32[info.weight]
            out[target][info.weight] = _dequantized(wmap[info.module], arrays, source, w.shape)
            q, scale = qm.int8_per_channel(w)
            out["int8-wo"][info.weight] = qm.dequantize(q, scale[None, :])
            out["fp16"][info.weight] = np.clip(w, -65504.0, 65504.0).astype(np.float16).astype(np.float32)
    return out


def _initializers(path: Path) -> dict[str, np.ndarray]:
    import onnx

    from llmtrt.pipelines.checks.weights import read_initializer

    model = onnx.load(str(path), load_external_data=False)
    return {t.name: read_initializer(t, path.parent) for t in model.graph.initializer}


def _dequantized(entry: dict[str, Any], arrays: dict[str, np.ndarray], source: dict[str, np.ndarray],
                 shape: tuple[int, ...]) -> np.ndarray:
    """What a weight-map entry's DequantizeLinear computes, divided by its smoothing (fp32 coordinates)."""
    if entry.get("bits") not in (4, 8):
        raise ValueError(f"{entry.get('node')}: scheme {entry.get('scheme')!r} is not a quantized weight")
    q = arrays[entry["initializers"]["values"]].astype(np.float32).reshape(shape)
    scale = arrays[entry["initializers"]["scale"]].astype(np.float32)
    if entry["bits"] == 8:
        w = q * scale[None, :]
    else:
        w = q * qm.expand_blocks(scale, shape[0], entry["block_size"])
    smoothing = entry.get("smoothing")
    if smoothing:
        name = smoothing["initializer"]
        if smoothing["kind"] == "folded":
            s = source[name] / arrays[name]
        else:
            s = 1.0 / arrays[name]
        w = w / s.astype(np.float32)[:, None]
    return w.astype(np.float32)



# --------------------------------------------------------------------------------------------
# sensitivity and the search
# --------------------------------------------------------------------------------------------
def weights_for(ev: MixEvaluator, var: dict[str, dict[str, np.ndarray]], assignment: dict[str, str],
                base: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The session's weights for ``assignment`` (group -> scheme; groups not in it stay fp32)."""
    out = dict(base or {})
    for group, scheme in assignment.items():
        for info in ev.groups[group]:
            out[info.weight] = var[scheme][info.weight]
    return out


def sensitivity(ev: MixEvaluator, var: dict[str, dict[str, np.ndarray]], target: str) -> list[dict[str, Any]]:
    """Every group alone at ``target`` (the rest fp32): rows ranked by mean KL, most sensitive first."""
    rows = []
    for group, infos in ev.groups.items():
        fig = ev.run(weights_for(ev, var, {group: target}))
        rows.append({"group": group, "linears": [i.module for i in infos], "scheme": target, **fig.to_dict()})
    rows.sort(key=lambda r: -r["mean_kl"])
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def search(ev: MixEvaluator, var: dict[str, dict[str, np.ndarray]], ranking: list[dict[str, Any]], target: str,
           budget: Budget, group_bytes: dict[str, dict[str, int]],
           fallbacks: tuple[str, ...] = FALLBACKS) -> SearchResult:
    """The search of the module doc. ``ranking``: :func:`sensitivity`'s rows; ``group_bytes``: stored
    bytes of each group per scheme (:func:`group_bytes`).

    The moves (:func:`ordered_moves`) are taken in order; the shortest run of them that meets the budget is found by
    bisection (the figures fall, up to noise, as more groups fall back): 2 + log2(moves) evaluations
    instead of one per move. The mix returned was measured; when none meets the budget, the best
    measured one is returned with ``met`` False."""
    base = ev.half_base()
    moves = ordered_moves(ranking, group_bytes, target, fallbacks)
    steps: list[dict[str, Any]] = []
    measured: dict[int, Figures] = {}

    def assignment(k: int) -> dict[str, str]:
        out = {g: target for g in ev.groups}
        for group, level in moves[:k]:
            out[group] = level
        return out

    def measure(k: int) -> Figures:
        if k not in measured:
            measured[k] = ev.run(weights_for(ev, var, assignment(k), base))
            steps.append({"moves": k, "last": moves[k - 1] if k else None, **measured[k].to_dict()})
        return measured[k]

    lo, hi = 0, len(moves)
    if budget.meets(measure(lo)):
        return SearchResult(True, assignment(lo), measured[lo], steps)
    if not budget.meets(measure(hi)):
        best = min(measured, key=lambda k: measured[k].ppl_increase)
        return SearchResult(False, assignment(best), measured[best], steps)
    while hi - lo > 1:   # invariant: lo misses the budget, hi meets it
        mid = (lo + hi) // 2
        if budget.meets(measure(mid)):
            hi = mid
        else:
            lo = mid
    return SearchResult(True, assignment(hi), measured[hi], steps)


def ordered_moves(ranking: list[dict[str, Any]], nbytes: dict[str, dict[str, int]], target: str,
                  fallbacks: tuple[str, ...]) -> list[tuple[str, str]]:
    """(group, scheme) moves in the order the module doc gives."""
    moves = []
    previous = target
    for level in fallbacks:
        def key(row: dict[str, Any], level=level, previous=previous) -> tuple[int, float]:
            extra = nbytes[row["group"]][level] - nbytes[row["group"]][previous]
            return (0, extra) if extra <= 0 else (1, -row["mean_kl"] / extra)
        moves += [(row["group"], level) for row in sorted(ranking, key=key)]
        previous = level
    return moves


def group_bytes(ev: MixEvaluator, target_inventory: dict[str, Any], target: str) -> dict[str, dict[str, int]]:
    """Stored bytes of each group's weights (+ scales) per scheme: the target's from the uniform artifact's
    inventory, int8-wo's as int8 values + one fp32 scale per output column, fp16's 2 bytes a weight."""
    stored = {x["module"]: x["weight_bytes"] for x in target_inventory["linears"]}
    out = {}
    for group, infos in ev.groups.items():
        out[group] = {target: sum(stored[i.module] for i in infos),
                      "int8-wo": sum(i.shape[0] * i.shape[1] + 4 * i.shape[1] for i in infos),
                      "fp16": sum(2 * i.shape[0] * i.shape[1] for i in infos)}
    return out
