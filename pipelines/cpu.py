"""How busy this machine's CPUs are: the one heuristic behind the thread choices of the AWQ searches
and ONNX Runtime's spinning (stdlib only, importable from anywhere in llmtrt)."""

from __future__ import annotations

import os


def idle_cores() -> float:
    """Cores not busy by the 1-minute load average, the caller's own running thread counted as idle
    (a quiet 2-core machine running llmtrt alone: 2.0; the same machine with two other jobs: 0.0);
    the core count where the platform has no load average."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:  # no load average on this platform
        return float(cores)
    return max(0.0, min(float(cores), cores - load + 1.0))


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
