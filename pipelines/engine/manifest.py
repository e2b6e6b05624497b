"""The engine manifest, ``engine.<precision>.json``: what was built, from which ONNX, how, what it
weighs against its weights, and what a runtime must do before running it (refit a weight-stripped
plan)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from llmtrt.exporter.kv_cache import layout_of_inputs
from llmtrt.pipelines.engine.backends import Backend
from llmtrt.pipelines.engine.network import WrittenPlan, network_inputs
from llmtrt.pipelines.engine.profiles import EngineProfile

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
REFIT_HOW = ("deserialize the plan, then refitter = trt.Refitter(engine, logger); "
             "trt.OnnxParserRefitter(refitter, logger).refit_from_file(<engine dir>/<onnx>) and "
             "refitter.refit_cuda_engine() before creating an execution context; the ONNX and its weights "
             "file(s) must hash to onnx_sha256")


@dataclass(frozen=True)
class BuildFacts:
    """Everything the manifest records about one build (collected by build_engine)."""

    backend: Backend
    precision: str
    plan_path: Path
    plan: WrittenPlan
    onnx_path: Path
    built_sha256: str
    model: onnx.ModelProto
    profiles: Sequence[EngineProfile]
    cc_names: list[str]
    builder: dict[str, Any]
    stats: dict[str, Any]
    strip_weights: bool
    source: Mapping[str, str] | None = None
    warnings: list[str] = field(default_factory=list)


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the graph's initializers (external or inline), read from the graph alone."""
    total = 0
    for t in model.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        if "length" in ext:
            total += int(ext["length"])
        elif t.raw_data:
            total += len(t.raw_data)
        else:
            count = int(np.prod(t.dims)) if t.dims else 1
            bits = 4 if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) else \
                8 * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            total += (count * bits + 7) // 8
    return total


def engine_manifest(facts: BuildFacts, network: Any, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The manifest dict for one built plan (``extra`` entries are added and override)."""
    be, plan = facts.backend, facts.plan
    weights = weight_bytes(facts.model)
    built = {"onnx": str(facts.onnx_path), "onnx_sha256": facts.built_sha256}
    if facts.source:
        built = {"onnx": facts.source["onnx"], "onnx_sha256": facts.source["onnx_sha256"],
                 "built_onnx": {"path": facts.onnx_path.name, "sha256": facts.built_sha256}}
    inputs = network_inputs(network)
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "tensorrt-engine",
        "kv_cache": layout_of_inputs(inputs).name,
        "plan": facts.plan_path.name,
        "plan_sha256": plan.sha256,
        "plan_bytes": plan.bytes,
        "weights": {"bytes": weights, "stripped": facts.strip_weights,
                    "plan_over_weights": round(plan.bytes / weights, 4) if weights else None},
        "refit": refit_section(facts, weights),
        "precision": facts.precision,
        "backend": {"name": be.name, "module": be.module_name, "version": be.version()},
        "target_compute_capabilities": facts.cc_names or "backend default",
        "profiles": [p.to_dict(inputs) for p in facts.profiles],
        **built,
        "builder": {**facts.builder, "plan_streamed": plan.streamed},
        "stats": facts.stats,
        "io": io_summary(network),
        "network": network_summary(network),
        "engine": engine_summary(be, facts.plan_path),
        "warnings": facts.warnings[:50],
        **(extra or {}),
    }


def refit_section(facts: BuildFacts, weights: int) -> dict[str, Any]:
    """What a runtime must do before running the plan: nothing, or refit it from the built ONNX."""
    if not facts.strip_weights:
        return {"required": False}
    locations = sorted({e.value for t in facts.model.graph.initializer for e in t.external_data
                        if e.key == "location"})
    return {"required": True, "onnx": facts.onnx_path.name, "onnx_sha256": facts.built_sha256,
            "weights_files": locations, "weights_bytes": weights,
            "builder_flags": list(facts.backend.strip_flags), "how": REFIT_HOW}


def network_summary(network: Any) -> dict[str, Any]:
    """Layers of the parsed (strongly typed, pre-fusion) network with their output types."""
    layers = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        dtypes = [layer.get_output(j).dtype.name for j in range(layer.num_outputs)]
        layers.append({"name": layer.name, "type": layer.type.name, "precision": dtypes[0] if dtypes else None})
    return {"source": "network definition (before fusion; the built plan cannot be inspected without a GPU)",
            "num_layers": len(layers), "precisions": dict(Counter(x["precision"] for x in layers)),
            "layers": layers}


def io_summary(network: Any) -> list[dict[str, Any]]:
    io = [("input", network.get_input(i)) for i in range(network.num_inputs)]
    io += [("output", network.get_output(i)) for i in range(network.num_outputs)]
    return [{"name": t.name, "mode": mode, "dtype": t.dtype.name, "shape": list(t.shape)} for mode, t in io]


def engine_summary(be: Backend, plan_path: Path) -> dict[str, Any] | None:
    """Built-engine layers via IEngineInspector, where the backend can deserialize (needs a GPU)."""
    if not be.inspects_built_engine:
        return None
    trt = be.module()
    try:
        engine = trt.Runtime(be.logger()).deserialize_cuda_engine(plan_path.read_bytes())
        info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    except Exception as exc:  # best effort: the manifest still has the network summary
        log.warning("could not inspect the built engine: %s", exc)
        return None
    layers = [layer if isinstance(layer, dict) else {"name": layer} for layer in info.get("Layers", [])]
    return {"num_layers": len(layers), "layers": layers}
