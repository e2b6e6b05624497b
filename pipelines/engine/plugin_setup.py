"""Plugins for a build: load plugin libraries, register llmtrt's Python plugins where the backend
has them, refuse custom nodes TensorRT would mis-import, and keep TensorRT-RTX's plugin-import aborts
out of the building process (a subprocess pre-flight parse)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx

from llmtrt.pipelines.engine.backends import Backend
from llmtrt.pipelines.engine.lowering import custom_nodes
from llmtrt.pipelines.engine.parse_errors import LOWER_HINT, check_custom_nodes, plugin_routed_ops
from llmtrt.pipelines.errors import LlmtrtUserError

_PREFLIGHT = """
import sys, importlib
trt = importlib.import_module(sys.argv[1])
logger = trt.Logger(trt.Logger.ERROR)
builder = trt.Builder(logger)
registry = builder.get_plugin_registry()
for lib in sys.argv[4:]:
    registry.load_library(lib)
network = builder.create_network(0)
parser = trt.OnnxParser(network, logger)
if sys.argv[3] == "1":
    parser.set_flag(trt.OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE)
parser.parse_from_file(sys.argv[2])
"""


def preflight_parse(backend: Backend, onnx_path: Path, plugins: Sequence[Path], override: bool) -> None:
    cmd = [sys.executable, "-c", _PREFLIGHT, backend.module_name, str(onnx_path), "1" if override else "0",
           *map(str, plugins)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode < 0 or proc.returncode == 134:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise LlmtrtUserError(
            f"{backend.name} aborted while importing plugin nodes of {onnx_path.name} ({tail}); plugins do not "
            f"work with this backend here: {LOWER_HINT}")


def setup_plugins(be: Backend, model: onnx.ModelProto, onnx_path: Path,
                   plugins: Sequence[str | Path]) -> tuple[list[Path], bool]:
    """Load plugin libraries, refuse mis-imported custom nodes, keep RTX plugin aborts out of process."""
    registry = be.plugin_registry()
    in_process = be.plugin_names()
    plugin_paths = [Path(p) for p in plugins]
    for lib in plugin_paths:
        if not lib.is_file() or registry.load_library(str(lib)) is None:
            raise LlmtrtUserError(f"plugin library {lib} could not be loaded")
    python_plugins = False
    if custom_nodes(model) and not plugin_paths and be.supports_python_plugins:
        # Our tensorrt.plugin definitions (plugins/<op>/trt_plugin.py); the nodes carry plugin_namespace.
        from llmtrt.plugins.trt_plugins import register_all

        register_all(be.module())
        python_plugins = True
    plugin_names = be.plugin_names()
    override = bool(plugin_paths) or python_plugins
    check_custom_nodes(model, be, plugin_names, override, source=onnx_path.name)
    routed = plugin_routed_ops(model, plugin_names, override)
    if routed and be.plugin_parse_may_abort:
        python_side = sorted(routed & in_process)
        if python_side and not be.supports_python_plugins:
            raise LlmtrtUserError(
                f"{be.name} cannot import {', '.join(python_side)} through in-process (Python) plugins: its ONNX "
                f"parser aborts the process (\"terminate called without an active exception\"); {LOWER_HINT}")
        preflight_parse(be, onnx_path, plugin_paths, override)
    return plugin_paths, override


def python_plugin_manifest(model: onnx.ModelProto) -> list[dict[str, Any]]:
    """Name, version and code checksum of each llmtrt plugin the graph's custom nodes use."""
    used = {n.op_type for n in custom_nodes(model)}
    if not used:
        return []
    from llmtrt.plugins.trt_plugins import plugin_manifest

    return [entry for entry in plugin_manifest() if entry["name"] in used]
