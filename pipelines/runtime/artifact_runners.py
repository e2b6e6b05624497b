"""Which runner an artifact directory gets, chosen from what its manifest says it is.

    with open_runner("out/onnx") as runner: ...            # ONNX Runtime
    with open_runner("out/engines/fp16") as runner: ...    # TensorRT (a GPU)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmtrt.exporter.errors import LlmtrtUserError
from llmtrt.pipelines.runtime.runners import DecoderRunner, OnnxRuntimeRunner, PyTorchRunner


def artifact_kind(path: str | Path) -> str:
    """"onnx" (manifest.json) or "engine" (engine.<precision>.json); a user error otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise LlmtrtUserError(f"{path}: no such artifact directory; pass a directory written by `llmtrt export` "
                              "(manifest.json) or `llmtrt build` (engine.<precision>.plan/.json)")
    if (path / "manifest.json").is_file():
        return "onnx"
    if any(path.glob("engine.*.json")):
        return "engine"
    raise LlmtrtUserError(f"{path}: neither manifest.json nor engine.<precision>.json here; pass a directory "
                          "written by `llmtrt export`, `llmtrt quantize` or `llmtrt build`")


def open_runner(path: str | Path, *, provider: str = "cpu", threads: int | None = None,
                precision: str | None = None, huge_pages: bool | None = None) -> DecoderRunner:
    """The runner for an artifact directory (ONNX or engine), chosen from what its manifest says it is.
    ``huge_pages``: an ONNX Runtime session's memory on 2 MiB pages (runtime/huge_pages.py)."""
    if artifact_kind(path) == "onnx":
        return OnnxRuntimeRunner.from_artifact(path, provider=provider, threads=threads, huge_pages=huge_pages)
    from llmtrt.pipelines.runtime.engine_runner import TensorRTRunner

    return TensorRTRunner(path, precision=precision)


def reference_runner(manifest: dict[str, Any], where: str | Path, max_positions: int | None = None) -> PyTorchRunner:
    """The fp32 PyTorch model an artifact's manifest names (checked to be the same model), returning the
    logits the artifact's graph returns (every position, or the last one: the manifest's ``logits``)."""
    from llmtrt.pipelines.artifacts import open_model_source

    return PyTorchRunner(open_model_source(manifest, where), max_positions=max_positions,
                         logits=manifest.get("logits", "all"))
