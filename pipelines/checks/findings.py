"""One integrity finding: what was checked, whether it passed, and why."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Finding:
    check: str              # files | model | graph | weights | precision
    subject: str            # what was checked (a file, a field, a tensor)
    passed: bool
    detail: str = ""
    max_abs_diff: float | None = None

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
