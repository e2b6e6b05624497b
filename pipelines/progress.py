"""Progress on stderr, the one kind llmtrt prints: a live line on a terminal, plain lines otherwise
(CI logs). Counted work draws a bar; a sequence of named steps prints one line per finished step.

    bar = Progress("calibrating", total=16, unit="windows")
    bar.update(3)                                   # "calibrating: 3/16 windows (1.2 s)"
    steps = Progress("pipeline", total=17)
    steps.start("export fp32"); steps.done("export fp32", "ran", 6.1)   # "[1/17] export fp32: ran (6.1 s)"
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, label: str, total: int, stream: TextIO | None = None, unit: str = "",
                 quiet: bool = False) -> None:
        self.label, self.total, self.unit, self.quiet = label, total, unit, quiet
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.index = 0

    def _write(self, text: str) -> None:
        if not self.quiet:
            self.stream.write(text)
            self.stream.flush()

    def update(self, done: int, note: str = "") -> None:
        """Counted work: ``done`` of ``total`` units finished."""
        elapsed = time.perf_counter() - self.t0
        if self.tty:
            width = 30
            filled = int(width * done / max(self.total, 1))
            self._write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
                        f"{elapsed:.1f}s {note}" + ("\n" if done == self.total else ""))
        else:
            unit = f" {self.unit}" if self.unit else ""
            self._write(f"{self.label}: {done}/{self.total}{unit} ({elapsed:.1f} s){' ' + note if note else ''}\n")

    def start(self, name: str) -> None:
        """A named step begins: a live line on a terminal, a plain line otherwise."""
        self.index += 1
        self._write(f"[{self.index}/{self.total}] {name} ...{chr(13) if self.tty else chr(10)}")

    def done(self, name: str, status: str, seconds: float, note: str = "") -> None:
        clear = "\x1b[2K" if self.tty else ""
        self._write(f"{clear}[{self.index}/{self.total}] {name}: {status} ({seconds:.1f} s){note}\n")
