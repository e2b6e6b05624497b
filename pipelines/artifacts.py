"""manifest.json: how one stage hands a typed artifact to the next.

    exported = export_artifact(resolve_model("bytes-llama"), "out/onnx")   # model.onnx + manifest.json, whole
    exported = load_exported("out/onnx")                                     # checked against its manifest

A stage learns what an artifact is by reading its manifest, never from a file name. Manifests carry
content hashes, so a later stage can tell whether its inputs changed, and the model source as an
absolute path (or a built-in preset name) plus a fingerprint of its config and weights, so a command
that re-opens the checkpoint can tell that it moved or changed. Every artifact directory is written
whole through :func:`llmtrt.exporter.files.artifact_dir`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import resource
from importlib import metadata
from pathlib import Path
from typing import Any

from llmtrt.exporter.config import MODELS_DIR, ModelConfig, ModelSource, RopeScaling, resolve_model
from llmtrt.exporter.errors import LlmtrtUserError
from llmtrt.exporter.files import artifact_dir, sha256_file, write_json_atomically
from llmtrt.exporter.iospec import IOSpec
from llmtrt.exporter.onnx_export import ExportedModel, ExportOptions

MANIFEST = "manifest.json"
SCHEMA_VERSION = 3  # 3: the op set is `ops` (was `dialect`), as on the command line
_LIBRARIES = ("llmtrt", "torch", "onnx", "onnxscript", "onnxruntime", "polygraphy",
              "tensorrt", "tensorrt_rtx_cu13_bindings", "transformers")
# field -> type every ONNX artifact manifest must have
_REQUIRED = {"schema_version": int, "kind": str, "model_source": str, "onnx": str, "onnx_sha256": str,
             "ops": str, "kv_cache": str, "opset": int, "precision": str, "config": dict, "io": dict}
_FINGERPRINTED = (".json", ".safetensors")
_NOT_FINGERPRINTED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


# --------------------------------------------------------------------------------------------
# hashes and facts
# --------------------------------------------------------------------------------------------
def load_graph(onnx_path: str | Path):
    """The graph of an ONNX file without its weights (external data is not read; weights stored inline in a
    large file become references into the file itself); a truncated or foreign file is a user error."""
    import onnx
    from google.protobuf.message import DecodeError

    from llmtrt.exporter.onnx_layout import SMALL_FILE, weightless_model

    onnx_path = Path(onnx_path)
    try:
        if onnx_path.stat().st_size > SMALL_FILE:  # weights inline: walk the file, do not parse them
            return weightless_model(onnx_path)
        return onnx.load(str(onnx_path), load_external_data=False)
    except FileNotFoundError:
        raise LlmtrtUserError(f"{onnx_path}: no such file; re-run the stage that writes it") from None
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise LlmtrtUserError(f"{onnx_path}: not a readable ONNX model ({type(exc).__name__}); the file is truncated "
                              "or not ONNX: re-run the stage that wrote it") from None


def onnx_sha256(onnx_path: str | Path, model: Any = None) -> str:
    """Hash of the graph file's hash plus the hash of every external-data file it references
    (read from the graph without loading weights; pass ``model`` when it is loaded already)."""
    onnx_path = Path(onnx_path)
    if model is None:
        model = load_graph(onnx_path)
    h = hashlib.sha256(sha256_file(onnx_path).encode())
    for location in external_data_files(model):
        data = onnx_path.parent / location
        if data.is_file():
            h.update(sha256_file(data).encode())
    return h.hexdigest()


def external_data_files(model: Any) -> list[str]:
    """The external-data file names an ONNX graph references."""
    return sorted({e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"})


def precision_inventory(onnx_path: str | Path) -> dict[str, Any]:
    """What the written graph computes in (llmtrt.pipelines.precision.inventory), as manifest JSON."""
    from llmtrt.pipelines.precision.inventory import inventory

    return inventory(load_graph(onnx_path)).to_dict()


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


# --------------------------------------------------------------------------------------------
# the model source
# --------------------------------------------------------------------------------------------
def source_spec(source: ModelSource) -> str:
    """What a manifest records as ``model_source``: a built-in model's name, else an absolute path."""
    if source.checkpoint_dir is None:
        path = Path(source.spec)
        return str(path.resolve()) if path.suffix in (".yaml", ".yml") and path.is_file() else source.spec
    directory = Path(source.checkpoint_dir).resolve()
    return directory.name if directory.parent == MODELS_DIR.resolve() else str(directory)


def source_fingerprint(source: ModelSource) -> str:
    """sha256 over the model's config and weights: the checkpoint's config.json, index and safetensors
    files (tokenizer and generation files excluded), or a preset's config plus its random-init seed."""
    h = hashlib.sha256(json.dumps(source.config.to_dict(), sort_keys=True).encode())
    if source.checkpoint_dir is None:
        h.update(f"random-init seed {source.seed}".encode())
        return h.hexdigest()
    for path in sorted(Path(source.checkpoint_dir).iterdir()):
        if path.suffix in _FINGERPRINTED and path.name not in _NOT_FINGERPRINTED and path.is_file():
            h.update(path.name.encode() + b"\0" + sha256_file(path).encode())
    return h.hexdigest()


def open_model_source(manifest: dict[str, Any], where: str | Path, *, verify: bool = True) -> ModelSource:
    """The ModelSource a manifest names, checked to still be the same model (config and weights)."""
    spec, seed = manifest.get("model_source"), int(manifest.get("seed", 0))
    if not isinstance(spec, str) or not spec:
        raise LlmtrtUserError(f"{where}: manifest has no model_source; re-run `llmtrt export`")
    try:
        source = resolve_model(spec, seed=seed)
    except LlmtrtUserError as exc:
        raise LlmtrtUserError(f"{where}: the model it was made from, {spec}, cannot be opened any more ({exc}); "
                              "put the checkpoint back or re-export from its new place") from None
    expected = manifest.get("model_source_sha256")
    if verify and expected and source_fingerprint(source) != expected:
        raise LlmtrtUserError(f"{where}: the model at {spec} changed since the export (its config or weights "
                              "differ from the manifest's model_source_sha256); re-export it")
    return source


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def write_export_manifest(exported: ExportedModel, source: ModelSource | dict[str, Any],
                          extra: dict[str, Any] | None = None, derived_from: str | Path | None = None) -> Path:
    """manifest.json beside ``exported.onnx_path`` (inside the directory being written). ``source`` is
    the ModelSource exported, or the manifest of the artifact this one was derived from (then pass
    that artifact's directory as ``derived_from``).

    The checkpoint's tokenizer files (from ``derived_from`` when it has them, else the model source)
    and genai_config.json are written beside it first, so the artifact runs in onnxruntime-genai and
    its text stages need nothing outside it (:mod:`llmtrt.pipelines.runtime.genai_config`)."""
    from llmtrt.pipelines.runtime.genai_config import write_runtime_files

    if isinstance(source, dict):
        origin = {k: source.get(k) for k in ("model_source", "model_source_sha256", "seed")}
        tokenizer_dir = _tokenizer_dir_of(source, derived_from)
    else:
        origin = {"model_source": source_spec(source), "model_source_sha256": source_fingerprint(source),
                  "seed": source.seed}
        tokenizer_dir = source.checkpoint_dir
    runtime = write_runtime_files(exported.onnx_path.parent, exported, tokenizer_dir)
    payload = {
        "schema_version": SCHEMA_VERSION,
        "kind": "onnx",
        **origin,
        "onnx": exported.onnx_path.name,
        "onnx_sha256": onnx_sha256(exported.onnx_path),
        "ops": exported.dialect,
        "kv_cache": exported.kv_cache,
        "opset": exported.opset,
        "precision": "fp32",
        "config": exported.config.to_dict(),
        "io": exported.io.to_dict(),
        "logits": exported.logits,
        "fused": exported.fused,
        "stats": exported.stats,
        "versions": library_versions(),
        **runtime,
        **(extra or {}),
    }
    if "precision_inventory" not in payload:
        payload["precision_inventory"] = precision_inventory(exported.onnx_path)
    path = exported.onnx_path.parent / MANIFEST
    write_json_atomically(path, payload)
    return path


def _tokenizer_dir_of(manifest: dict[str, Any], derived_from: str | Path | None) -> Path | None:
    """Where a derived artifact's tokenizer files come from: the artifact it was made from (its own
    copies), else the checkpoint both were made from (None when neither has any)."""
    from llmtrt.pipelines.runtime.tokenizer_files import TOKENIZER_FILES

    if derived_from is not None and any((Path(derived_from) / name).is_file() for name in TOKENIZER_FILES):
        return Path(derived_from)
    try:
        return resolve_model(str(manifest.get("model_source") or ""), seed=int(manifest.get("seed", 0))).checkpoint_dir
    except LlmtrtUserError:
        return None


def export_artifact(source: ModelSource, out_dir: str | Path, options: ExportOptions = ExportOptions(),  # noqa: B008
                    extra: dict[str, Any] | None = None) -> ExportedModel:
    """Export ``source`` to ``out_dir``: model.onnx (+ data) and manifest.json, swapped in as one directory."""
    from llmtrt.exporter.onnx_export import export

    options.resolved_opset()  # a bad option fails before the directory is touched
    out = Path(out_dir)
    with artifact_dir(out) as tmp:
        exported = export(source, tmp, options)
        stats = {**exported.stats, "peak_rss_bytes": peak_rss_bytes()}
        exported = dataclasses.replace(exported, stats=stats)
        write_export_manifest(exported, source, extra)
    return dataclasses.replace(exported, onnx_path=out / exported.onnx_path.name)


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
def read_manifest(directory: str | Path, required: dict[str, type] | None = None) -> dict[str, Any]:
    """manifest.json as a dict, checked for the fields every stage relies on (exit 2 naming the field)."""
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise LlmtrtUserError(f"{directory}: no such directory; pass an artifact directory (with {MANIFEST}) written "
                              "by `llmtrt export` or `llmtrt quantize`")
    if not path.is_file():
        raise LlmtrtUserError(f"{directory}: no {MANIFEST}; point at a directory written by `llmtrt export`")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LlmtrtUserError(f"{path}: corrupt manifest ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                              "re-run the stage that wrote it") from None
    except OSError as exc:
        raise LlmtrtUserError(f"{path}: cannot read it ({exc.strerror})") from None
    if not isinstance(raw, dict):
        raise LlmtrtUserError(f"{path}: corrupt manifest (not a JSON object); re-run the stage that wrote it")
    if raw.get("schema_version") == 2 and "dialect" in raw and "ops" not in raw:  # written before the rename
        raw["ops"] = raw.pop("dialect")
    for key, kind in (required if required is not None else _REQUIRED).items():
        if key not in raw:
            raise LlmtrtUserError(f"{path}: field {key!r} is missing; re-run the stage that wrote it")
        if not isinstance(raw[key], kind) or (kind is int and isinstance(raw[key], bool)):
            raise LlmtrtUserError(f"{path}: field {key!r} should be {kind.__name__}, found {type(raw[key]).__name__}; "
                                  "re-run the stage that wrote it")
    return raw


def load_exported(directory: str | Path, manifest: dict[str, Any] | None = None) -> ExportedModel:
    """The ExportedModel a directory's manifest describes; fields that do not fit together are user errors."""
    from llmtrt.exporter.kv_cache import get_layout

    raw = manifest if manifest is not None else read_manifest(directory)
    path = Path(directory) / MANIFEST
    try:
        cfg = dict(raw["config"])
        cfg["rope_scaling"] = RopeScaling(**cfg.get("rope_scaling") or {})
        config = ModelConfig(**cfg)
        io = IOSpec.from_dict(raw["io"])
    except (TypeError, KeyError, ValueError, LlmtrtUserError) as exc:
        raise LlmtrtUserError(f"{path}: its config/io fields are not a model llmtrt can read ({exc}); "
                              "re-run the stage that wrote it") from None
    get_layout(raw["kv_cache"], where=f"{path}: kv_cache")
    logits, fused = raw.get("logits", "all"), raw.get("fused", {})
    if logits not in ("all", "last"):
        raise LlmtrtUserError(f"{path}: field 'logits' is {logits!r}, not 'all' or 'last'; re-run the stage that wrote it")
    if not isinstance(fused, dict) or not all(isinstance(v, list) for v in fused.values()):
        raise LlmtrtUserError(f"{path}: field 'fused' is not a map of module -> parts; re-run the stage that wrote it")
    onnx_path = Path(directory) / raw["onnx"]
    if not onnx_path.is_file():
        raise LlmtrtUserError(f"{onnx_path}: listed in {MANIFEST} but missing; re-run the stage that wrote it")
    load_graph(onnx_path)  # a truncated or foreign file fails here, once, as a user error
    return ExportedModel(onnx_path, config, io, raw["ops"], raw["opset"], raw.get("stats", {}), raw["kv_cache"],
                         fused, logits)
