"""manifest.json: how one stage hands a typed artifact to the next.

A stage learns what an artifact is by reading its manifest, never from a file name. Manifests
carry content hashes, so a later stage can tell whether its inputs changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from llmtrt.exporter.config import ModelConfig, RopeScaling
from llmtrt.exporter.errors import LlmtrtUserError
from llmtrt.exporter.iospec import IOSpec
from llmtrt.exporter.onnx_export import ExportedModel

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
_LIBRARIES = ("llmtrt", "torch", "onnx", "onnxscript", "onnxruntime", "polygraphy",
              "tensorrt", "tensorrt_rtx_cu13_bindings", "transformers")


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def onnx_sha256(onnx_path: str | Path, model: Any = None) -> str:
    """Hash of the graph file's hash plus the hash of every external-data file it references
    (read from the graph without loading weights; pass ``model`` when it is loaded already)."""
    import onnx

    onnx_path = Path(onnx_path)
    if model is None:
        model = onnx.load(str(onnx_path), load_external_data=False)
    h = hashlib.sha256(sha256_file(onnx_path).encode())
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    for location in sorted(locations):
        data = onnx_path.parent / location
        if data.is_file():
            h.update(sha256_file(data).encode())
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_bytes_atomically(path: Path, data: bytes | memoryview) -> None:
    """Write to a hidden temp file in the same directory, fsync, rename over ``path`` (mode 0644)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; artifacts are read by other users and stages
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomically(path: Path, payload: dict[str, Any]) -> None:
    write_bytes_atomically(Path(path), (json.dumps(payload, indent=2) + "\n").encode("utf-8"))


def write_export_manifest(exported: ExportedModel, source_spec: str, extra: dict[str, Any] | None = None) -> Path:
    payload = {
        "schema_version": SCHEMA_VERSION,
        "kind": "onnx",
        "model_source": source_spec,
        "onnx": exported.onnx_path.name,
        "onnx_sha256": onnx_sha256(exported.onnx_path),
        "dialect": exported.dialect,
        "kv_cache": exported.kv_cache,
        "opset": exported.opset,
        "precision": "fp32",
        "config": exported.config.to_dict(),
        "io": exported.io.to_dict(),
        "stats": exported.stats,
        "versions": library_versions(),
        **(extra or {}),
    }
    path = exported.onnx_path.parent / MANIFEST
    write_json_atomically(path, payload)
    return path


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise LlmtrtUserError(f"{directory}: no {MANIFEST}; point at a directory written by `llmtrt export`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LlmtrtUserError(f"{path}: corrupt manifest ({exc}); re-run the stage that wrote it") from None


def load_exported(directory: str | Path) -> ExportedModel:
    """The ExportedModel a directory's manifest describes (and a check that the ONNX is the one hashed)."""
    raw = read_manifest(directory)
    cfg = dict(raw["config"])
    cfg["rope_scaling"] = RopeScaling(**cfg["rope_scaling"])
    onnx_path = Path(directory) / raw["onnx"]
    if not onnx_path.is_file():
        raise LlmtrtUserError(f"{onnx_path}: listed in {MANIFEST} but missing; re-run `llmtrt export`")
    return ExportedModel(onnx_path, ModelConfig(**cfg), IOSpec.from_dict(raw["io"]), raw["dialect"],
                         raw["opset"], raw.get("stats", {}), raw.get("kv_cache", "dynamic"))
