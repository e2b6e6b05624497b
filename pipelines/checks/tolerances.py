"""Per-precision, per-output tolerances of `llmtrt validate` (configs/tolerances.yaml) and the
Polygraphy-style ``--atol/--rtol [NAME:]VALUE`` overrides."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llmtrt import configs
from llmtrt.exporter.errors import LlmtrtUserError

DEFAULT_TOLERANCES = configs.path("tolerances.yaml")
GROUPS = ("logits", "present", "kv_cache")


_NONNEG = {"min": 0.0}


@dataclass(frozen=True)
class GroupTolerance:
    atol: float = field(metadata=_NONNEG)
    rtol: float = field(metadata=_NONNEG)
    mean_atol: float | None = field(default=None, metadata=_NONNEG)
    min_cosine_similarity: float | None = field(default=None, metadata={"min": 0.0, "max": 1.0})
    min_top1_agreement: float | None = field(default=None, metadata={"min": 0.0, "max": 1.0})


@dataclass(frozen=True)
class PrecisionTolerances:
    logits: GroupTolerance
    present: GroupTolerance
    kv_cache: GroupTolerance


@dataclass(frozen=True)
class LayerwiseSettings:
    min_error: float = field(default=1e-3, metadata=_NONNEG)
    jump_factor: float = field(default=10.0, metadata=_NONNEG)


@dataclass(frozen=True)
class TolerancesFile:
    """configs/tolerances.yaml"""

    precisions: dict[str, PrecisionTolerances]
    layerwise: LayerwiseSettings = field(default_factory=LayerwiseSettings)


@dataclass(frozen=True)
class Tolerances:
    precision: str
    groups: dict[str, GroupTolerance]
    min_error: float = 1e-3
    jump_factor: float = 10.0
    source: str = ""


def load_tolerances(path: str | Path, precision: str) -> Tolerances:
    """The tolerances for one precision; unknown keys, wrong types or a missing precision name the file."""
    from llmtrt.exporter.yaml_schema import load_dataclass

    spec = load_dataclass(TolerancesFile, path)
    entry = spec.precisions.get(precision)
    if entry is None:
        raise LlmtrtUserError(f"{path}: no tolerances for precision {precision!r} (has "
                              f"{', '.join(spec.precisions)}); add a 'precisions.{precision}' entry")
    groups = {group: getattr(entry, group) for group in GROUPS}
    return Tolerances(precision, groups, spec.layerwise.min_error, spec.layerwise.jump_factor, str(path))


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
