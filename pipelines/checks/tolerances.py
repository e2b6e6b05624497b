"""Per-precision, per-output tolerances of `llmtrt validate` (configs/tolerances.yaml) and the
Polygraphy-style ``--atol/--rtol [NAME:]VALUE`` overrides."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from llmtrt import configs
from llmtrt.exporter.errors import LlmtrtUserError

DEFAULT_TOLERANCES = configs.path("tolerances.yaml")
GROUP_FIELDS = {"atol", "rtol", "mean_atol", "min_cosine_similarity", "min_top1_agreement"}
GROUPS = ("logits", "present", "kv_cache")


@dataclass(frozen=True)
class GroupTolerance:
    atol: float
    rtol: float
    mean_atol: float | None = None
    min_cosine_similarity: float | None = None
    min_top1_agreement: float | None = None


@dataclass(frozen=True)
class Tolerances:
    precision: str
    groups: dict[str, GroupTolerance]
    min_error: float = 1e-3
    jump_factor: float = 10.0
    source: str = ""


def load_tolerances(path: str | Path, precision: str) -> Tolerances:
    """The tolerances for one precision; unknown keys, wrong types or a missing precision name the file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise LlmtrtUserError(f"{path}: cannot read tolerances ({exc.strerror}); pass --tolerances FILE") from None
    except yaml.YAMLError as exc:
        raise LlmtrtUserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("precisions"), dict):
        raise LlmtrtUserError(f"{path}: needs a top-level 'precisions:' mapping (see configs/tolerances.yaml)")
    unknown = set(raw) - {"precisions", "layerwise"}
    if unknown:
        raise LlmtrtUserError(f"{path}: unknown key {sorted(unknown)[0]!r}; allowed: precisions, layerwise")
    entry = raw["precisions"].get(precision)
    if entry is None:
        raise LlmtrtUserError(f"{path}: no tolerances for precision {precision!r} (has "
                              f"{', '.join(raw['precisions'])}); add a 'precisions.{precision}' entry")
    groups = {}
    for group in GROUPS:
        values = entry.get(group) if isinstance(entry, dict) else None
        where = f"{path}: precisions.{precision}.{group}"
        if not isinstance(values, dict):
            raise LlmtrtUserError(f"{where}: missing; give at least atol and rtol")
        bad = set(values) - GROUP_FIELDS
        if bad:
            raise LlmtrtUserError(f"{where}.{sorted(bad)[0]}: unknown field; allowed: {', '.join(sorted(GROUP_FIELDS))}")
        for key, value in values.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise LlmtrtUserError(f"{where}.{key}: {value!r} is not a non-negative number")
        if "atol" not in values or "rtol" not in values:
            raise LlmtrtUserError(f"{where}: needs both atol and rtol")
        groups[group] = GroupTolerance(**{k: float(v) for k, v in values.items()})
    extra = set(entry) - set(GROUPS)
    if extra:
        raise LlmtrtUserError(f"{path}: precisions.{precision}.{sorted(extra)[0]}: unknown group; "
                              f"allowed: {', '.join(GROUPS)}")
    layer = raw.get("layerwise") or {}
    if set(layer) - {"min_error", "jump_factor"}:
        raise LlmtrtUserError(f"{path}: layerwise allows only min_error and jump_factor")
    return Tolerances(precision, groups, float(layer.get("min_error", 1e-3)), float(layer.get("jump_factor", 10.0)),
                      str(path))


def parse_overrides(values: Sequence[str], flag: str) -> dict[str, float]:
    """Polygraphy-style ``[NAME:]VALUE`` list -> {name: value}; "" is the default for every output."""
    result: dict[str, float] = {}
    for item in values:
        name, _, number = item.rpartition(":")
        try:
            value = float(number)
        except ValueError:
            raise LlmtrtUserError(f"{flag} {item!r}: expected VALUE or NAME:VALUE, e.g. {flag} logits:1e-3") from None
        if not value >= 0:
            raise LlmtrtUserError(f"{flag} {item!r}: tolerance must be a non-negative number")
        result[name] = value
    return result


def group_of(output: str) -> str:
    return "logits" if output.startswith("logits") else "present"


def _lookup(overrides: Mapping[str, float], output: str, default: float) -> float:
    for key in (output, group_of(output), ""):
        if key in overrides:
            return overrides[key]
    return default
