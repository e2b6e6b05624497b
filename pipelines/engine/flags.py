"""Checks of ``llmtrt build``'s flags that need no file but plugin paths, and import nothing heavy
(no onnx, no torch): a typo or an impossible value is refused in milliseconds, before any graph
is read or any weights file hashed."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from llmtrt.pipelines.engine.backends import Backend
from llmtrt.pipelines.errors import LlmtrtUserError

PRECISION_FAMILIES = ("fp32", "fp16", "bf16", "int8", "fp8", "int4")  # keys of precision_check.PRECISION_CHECKS
LOWER_MODES = ("native", "inline", "plugin")                       # keys of lowering.LOWERINGS


def check_precision_name(precision: str) -> str:
    """The precision family (``int8-sq`` -> ``int8``), or a user error listing the known ones."""
    family = precision.split("-", 1)[0]
    if family not in PRECISION_FAMILIES:
        raise LlmtrtUserError(f"unknown --precision {precision!r}; choose one of {', '.join(PRECISION_FAMILIES)}")
    return family


def check_flags(be: Backend, *, precision: str | None = None, lower: str | None = None, opt_level: int = 3,
                workspace_mb: int | None = None, target_cc: Sequence[str] = (), strip_weights: bool = False,
                plugins: Sequence[str | Path] = ()) -> list[str]:
    """Every check the build flags allow on their own; returns the target compute capabilities as
    enum names."""
    if lower is not None and lower not in LOWER_MODES:
        raise LlmtrtUserError(f"unknown --lower {lower!r}; choose one of {', '.join(LOWER_MODES)}")
    if not 0 <= opt_level <= 5:
        raise LlmtrtUserError(f"--opt-level must be 0..5, got {opt_level}")
    if workspace_mb is not None and workspace_mb < 1:
        raise LlmtrtUserError(f"--workspace-mb must be >= 1, got {workspace_mb}")
    if precision is not None:
        check_precision_name(precision)
    names = be.check_target_cc(target_cc)
    if strip_weights:
        be.check_strip_weights()
    for lib in map(Path, plugins):
        if not lib.is_file():
            raise LlmtrtUserError(f"--plugins {lib}: no such file; give the path of a plugin library (.so)")
    return names
