"""`llmtrt validate --layerwise`: every intermediate tensor against an fp32 reference export, and the first
node where the error jumps."""

from __future__ import annotations

import math
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from llmtrt.exporter.files import write_json_atomically
from llmtrt.pipelines.checks.comparisons import _finite
from llmtrt.pipelines.checks.tolerances import Tolerances
from llmtrt.pipelines.engine.profiles import max_positions_from_file

_LAYER = re.compile(r"/model/layers/(\d+)/")


def mark_all_outputs(model):
    """A copy of ``model`` whose every node output is also a graph output (types from shape inference)."""
    import onnx

    model = onnx.shape_inference.infer_shapes(model)
    known = {v.name: v for v in list(model.graph.value_info) + list(model.graph.output)}
    existing = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for name in node.output:
            if name and name not in existing:
                info = known.get(name) or onnx.helper.make_empty_tensor_value_info(name)
                model.graph.output.append(info)
                existing.add(name)
    return model


def _run_all(onnx_path: Path, feed: Mapping[str, np.ndarray]) -> tuple[list, dict[str, np.ndarray]]:
    """Every node output of the graph at ``onnx_path`` for one feed; nodes in graph order."""
    import onnx

    from llmtrt.pipelines.runtime.runners import ort_session

    model = mark_all_outputs(onnx.load(str(onnx_path)))
    session = ort_session(onnx_path, keep_all_tensors=True, model_bytes=model.SerializeToString())
    dtypes = {i.name: i.type for i in session.get_inputs()}
    inputs = {k: (v.astype(np.float16) if dtypes.get(k) == "tensor(float16)" else v)
              for k, v in feed.items() if k in dtypes}
    names = [o.name for o in session.get_outputs()]
    return list(model.graph.node), dict(zip(names, session.run(names, inputs), strict=True))


def _error(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return math.inf
    if not np.issubdtype(b.dtype, np.floating):
        return float(np.mean(a != b)) if a.size else 0.0
    a, b = a.astype(np.float64), b.astype(np.float64)
    if not a.size:
        return 0.0
    diff = np.abs(a - b)
    both_inf = np.isinf(a) & np.isinf(b) & (np.sign(a) == np.sign(b))
    diff[both_inf] = 0.0
    finite = np.abs(b[np.isfinite(b)])
    scale = float(finite.max()) if finite.size else 1.0
    return float(np.nanmax(np.where(np.isnan(diff), np.inf, diff)) / max(scale, 1e-12))


def layerwise(exported, manifest: dict[str, Any], feed: Mapping[str, np.ndarray], tol: Tolerances,
              reference: str | Path | None, stage: Path | None) -> dict[str, Any]:
    """Every intermediate tensor of the artifact vs the same tensor of an fp32 reference export (matched by
    node name and output index, names follow modules), and the first node where the error jumps."""
    from llmtrt.exporter.onnx_export import ExportOptions, export
    from llmtrt.pipelines.artifacts import load_exported, open_model_source

    with tempfile.TemporaryDirectory(prefix="llmtrt-layerwise-") as tmp:
        if reference is not None:
            ref_path, ref_desc = load_exported(reference).onnx_path, str(reference)
        else:
            options = ExportOptions(dialect=exported.dialect, opset=exported.opset, kv_cache=exported.kv_cache,
                                    max_positions=max_positions_from_file(exported.onnx_path),
                                    fuse=bool(exported.fused), logits=exported.logits)
            source = open_model_source(manifest, exported.onnx_path.parent / "manifest.json")
            ref_path = export(source, Path(tmp) / "reference", options).onnx_path
            ref_desc = f"fp32 re-export of {manifest['model_source']} ({exported.dialect} ops)"
        ref_nodes, ref_values = _run_all(ref_path, feed)
        nodes, values = _run_all(exported.onnx_path, feed)
    ref_by_node = {(n.name, i): out for n in ref_nodes for i, out in enumerate(n.output)}
    errors: dict[str, float] = {}
    rows, first = [], None
    for node in nodes:
        in_errors = [errors[i] for i in node.input if i in errors]
        input_error = max(in_errors, default=0.0)
        for index, tensor in enumerate(node.output):
            ref_tensor = ref_by_node.get((node.name, index))
            if not tensor or ref_tensor is None or tensor not in values or ref_tensor not in ref_values:
                continue
            err = _error(np.asarray(values[tensor]), np.asarray(ref_values[ref_tensor]))
            errors[tensor] = err
            layer = _LAYER.search(node.name + "/")
            row = {"node": node.name, "op_type": node.op_type, "tensor": tensor, "error": _finite(err),
                   "input_error": input_error, "layer": int(layer.group(1)) if layer else None}
            rows.append(row)
            if first is None and err >= tol.min_error and err >= tol.jump_factor * input_error:
                first = {**row, "error": err if math.isfinite(err) else float("inf")}
    worst = sorted((r for r in rows if r["error"] is None or r["error"] > 0),
                   key=lambda r: -(r["error"] if r["error"] is not None else math.inf))[:10]
    result = {"reference": ref_desc, "compared_tensors": len(rows), "min_error": tol.min_error,
              "jump_factor": tol.jump_factor, "first_jump": first, "largest": worst}
    if stage is not None:
        write_json_atomically(stage / "layerwise.json", {**result, "tensors": rows})
    return result
