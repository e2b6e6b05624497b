"""Put an ONNX Runtime session's memory (its weights, prepacked when it opened) on 2 MiB pages.

    session = ort.InferenceSession(...)                # weights land in anonymous memory
    report = huge_pages.collapse_anonymous_memory()   # that memory, moved onto transparent huge pages

A decode step reads every weight once; on 4 KiB pages the CPU also walks a page table for each 4 KiB
of weights it misses in the TLB, on 2 MiB pages for each 2 MiB. With transparent huge pages in
``madvise`` mode (the Debian and Ubuntu default) a process gets none unless it asks: this module asks,
with ``madvise(MADV_HUGEPAGE)`` and ``madvise(MADV_COLLAPSE)`` (Linux >= 6.1), over the process's
anonymous memory once the session is open. The price is paid once, when it is called: collapsing
copies the pages. Contents never change, so outputs are bit-identical. Measured figures:
docs/benchmarks.md ("Huge pages").

Nothing here fails a caller: without Linux, without transparent huge pages ("never"), or on a kernel
without MADV_COLLAPSE, the report says what happened and the session runs on the pages it has.
"""

from __future__ import annotations

import ctypes
import errno
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HUGE = 2 << 20
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
ENV = "LLMTRT_HUGE_PAGES"
# `llmtrt generate` turns huge pages on by itself from this many new tokens: about where the faster
# decode has paid for the collapse at open on the 2-core VM (156M int8 / int4 / fp32: ~120 / 550 / 850
# tokens; docs/benchmarks.md, run 15)
HUGE_PAGES_FROM_TOKENS = 512


@dataclass
class Report:
    """What :func:`collapse_anonymous_memory` did: bytes moved onto huge pages, the process's bytes on them
    afterwards, bytes the kernel would not collapse, seconds spent, and notes when it could do nothing
    (or only part)."""

    collapsed_bytes: int = 0  # newly on huge pages
    huge_bytes: int = 0       # the process's anonymous memory on huge pages afterwards
    failed_bytes: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = (f"{self.huge_bytes / 2**20:.0f} MiB on 2 MiB pages ({self.collapsed_bytes / 2**20:.0f} MiB "
                f"moved in {self.seconds:.2f} s)")
        if self.failed_bytes:
            text += f" ({self.failed_bytes / 2**20:.0f} MiB refused)"
        return "; ".join([text, *self.notes]) if self.huge_bytes or not self.notes else "; ".join(self.notes)

    def as_dict(self) -> dict:
        return {"huge_bytes": self.huge_bytes, "collapsed_bytes": self.collapsed_bytes, "failed_bytes": self.failed_bytes,
                "seconds": round(self.seconds, 3), "notes": self.notes}


def thp_mode(setting: Path = THP_SETTING) -> str | None:
    """The kernel's transparent-huge-page mode (always, madvise, never), None where there is none."""
    try:
        text = setting.read_text()
    except OSError:
        return None
    chosen = [w.strip("[]") for w in text.split() if w.startswith("[")]
    return chosen[0] if chosen else None


Range = tuple[int, int]


def anonymous_regions(smaps: str | None = None) -> list[tuple[int, int, int]]:
    """Private writable anonymous mappings of this process (the heap and unnamed ones) as
    (start, end, resident anonymous bytes), from /proc/self/smaps (or the text given)."""
    text = smaps if smaps is not None else Path("/proc/self/smaps").read_text()
    regions: list[tuple[int, int, int]] = []
    current: list[int] | None = None
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if "-" in parts[0] and not parts[0].endswith(":"):
            lo, _, hi = parts[0].partition("-")
            name = parts[5] if len(parts) > 5 else ""
            current = None
            if parts[1] == "rw-p" and name in ("", "[heap]"):
                current = [int(lo, 16), int(hi, 16), 0]
                regions.append(current)  # type: ignore[arg-type]
        elif parts[0] == "Anonymous:" and current is not None:
            current[2] = int(parts[1]) << 10
    return [tuple(r) for r in regions]  # type: ignore[misc]


def huge_aligned(ranges: list[Range]) -> list[Range]:
    """Each range shrunk to whole 2 MiB pages; ranges holding none are dropped."""
    out = []
    for lo, hi in ranges:
        a, b = -(-lo // HUGE) * HUGE, hi // HUGE * HUGE
        if b > a:
            out.append((a, b))
    return out


def wanted(default: bool) -> bool:
    """$LLMTRT_HUGE_PAGES (1/on, 0/off) over the caller's default."""
    from llmtrt.pipelines.cpu import env_choice

    forced = env_choice(ENV, {"1": True, "on": True, "0": False, "off": False})
    return default if forced is None else forced


def anon_huge_bytes() -> int:
    """This process's anonymous memory on huge pages now (AnonHugePages of /proc/self/smaps_rollup)."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) << 10
    except OSError:
        pass
    return 0


def collapse_anonymous_memory(*, min_populated: float = 0.5) -> Report:
    """Put this process's anonymous memory (the heap and unnamed private mappings) on huge pages, in
    mappings at least ``min_populated`` resident (a thread stack or a mostly empty reservation would be
    filled in otherwise). Called once a session is open, so that its weights are among it; memory
    already on huge pages (a previous session's, reused) costs nothing to look at again."""
    report = Report()
    mode = thp_mode()
    if mode is None or not sys.platform.startswith("linux"):
        report.notes.append("no transparent huge pages on this system")
        return report
    if mode == "never":
        report.notes.append("transparent huge pages are off (never)")
        return report
    t0 = time.perf_counter()
    try:
        regions = anonymous_regions()
    except OSError as exc:
        report.notes.append(f"cannot read /proc/self/smaps ({exc.strerror})")
        return report
    populated = [(lo, hi) for lo, hi, anon in regions if anon >= min_populated * (hi - lo)]
    libc = ctypes.CDLL(None, use_errno=True)
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    huge_before = anon_huge_bytes()
    collapse = True
    for lo, hi in huge_aligned(populated):
        madvise(lo, hi - lo, MADV_HUGEPAGE)
        if not collapse:
            continue
        if madvise(lo, hi - lo, MADV_COLLAPSE) == 0:
            continue
        err = ctypes.get_errno()
        if err == errno.EINVAL:  # a kernel before 6.1: khugepaged collapses MADV_HUGEPAGE memory, slowly
            collapse = False
            report.notes.append("kernel without MADV_COLLAPSE: marked for khugepaged only")
        else:
            report.failed_bytes += hi - lo
    report.huge_bytes = anon_huge_bytes()
    report.collapsed_bytes = max(0, report.huge_bytes - huge_before)
    report.seconds = time.perf_counter() - t0
    return report
