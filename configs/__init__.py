"""The data llmtrt ships: model presets, the built-in trained checkpoint, pipeline configs, texts,
tolerances and thresholds.

Installed as package data of ``llmtrt.configs`` and found through :mod:`importlib.resources`, so an
installed llmtrt (``pip install .``, no source tree) reads the same files as a checkout.

    from llmtrt import configs
    configs.path("text", "calib.txt")      # -> Path of the shipped calibration text
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def path(*parts: str) -> Path:
    """A shipped file or folder, e.g. ``path("models", "bytes-llama")`` (a real file on disk: the
    package is installed unzipped)."""
    return Path(str(files(__name__).joinpath(*parts)))


def pipeline_config(name: str) -> Path | None:
    """A shipped pipeline config by name (``demo`` -> pipelines/demo.yaml), or None."""
    candidate = path("pipelines", f"{name}.yaml")
    return candidate if candidate.is_file() else None


def pipeline_names() -> list[str]:
    return sorted(p.stem for p in path("pipelines").glob("*.yaml"))
