"""How busy this machine's CPUs are: the one heuristic behind the thread choices of the AWQ searches
and ONNX Runtime's spinning (stdlib only, importable from anywhere in llmtrt)."""

from __future__ import annotations

import os
import time


def idle_cores() -> float:
    """Cores that other processes leave idle: busy CPU time of the whole machine minus this process's
    own (all its threads), over a 0.2 s sample of /proc (cached 5 s), so llmtrt's own work, such as a
    benchmark's previous pass, never counts against it. Where /proc is not readable: the 1-minute load
    average with the caller's own running thread counted as idle. A quiet 2-core machine running llmtrt
    alone: 2.0; the same machine with two other busy jobs: 0.0."""
    cores = os.cpu_count() or 1
    others = _others_busy()
    if others is None:
        try:
            others = os.getloadavg()[0] - 1.0
        except OSError:  # no load average on this platform
            return float(cores)
    return max(0.0, min(float(cores), cores - others))


_SAMPLE_S = 0.2
_CACHE_S = 5.0
_cached: tuple[float, float] | None = None  # (monotonic time, cores busy with other processes)


def _others_busy() -> float | None:
    """Cores' worth of CPU time spent by other processes during a short sample; None without /proc."""
    global _cached
    now = time.monotonic()
    if _cached is not None and now - _cached[0] < _CACHE_S:
        return _cached[1]
    try:
        busy0, own0, t0 = _machine_busy_ticks(), _own_ticks(), time.monotonic()
        time.sleep(_SAMPLE_S)
        busy1, own1, t1 = _machine_busy_ticks(), _own_ticks(), time.monotonic()
    except (OSError, ValueError, IndexError):
        return None
    ticks = os.sysconf("SC_CLK_TCK") * (t1 - t0)
    others = max(0.0, ((busy1 - busy0) - (own1 - own0)) / ticks)
    _cached = (t1, others)
    return others


def _machine_busy_ticks() -> int:
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return user + nice + system + irq + softirq + steal


def _own_ticks() -> int:
    with open("/proc/self/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))


def env_choice(name: str, allowed: dict[str, object]):
    """The value of ``$name`` mapped through ``allowed`` (None when unset or empty); a clear error for
    anything else."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    if value.lower() not in allowed:
        from llmtrt.exporter.errors import LlmtrtUserError

        raise LlmtrtUserError(f"${name}={value!r}: choose one of {', '.join(allowed)}")
    return allowed[value.lower()]
