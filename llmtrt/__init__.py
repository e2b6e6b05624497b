"""llmtrt: Llama-family decoders from PyTorch to validated ONNX and TensorRT engines.

The installed distribution is one namespace. Its subpackages live in the repository's top-level
folders and are mapped here by ``[tool.setuptools] package-dir`` in pyproject.toml:

    llmtrt.exporter   <- exporter/    the model, checkpoint loading, ONNX export
    llmtrt.plugins    <- plugins/     one folder per custom op: torch op, ONNX function, lowerings, kernels
    llmtrt.pipelines  <- pipelines/   precision, engine, checks, runtime, pipeline, cli
    llmtrt.configs    <- configs/     presets, the built-in checkpoint, texts, tolerances (package data)
"""

from importlib import metadata

try:
    __version__ = metadata.version("llmtrt")
except metadata.PackageNotFoundError:  # pragma: no cover - running from an uninstalled tree
    __version__ = "0+unknown"
