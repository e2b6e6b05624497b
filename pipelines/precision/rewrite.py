"""The rewrite in progress: the IR being edited, where its new tensors go, and what it records.

Edits shared by the precisions: a weight replaced by an int8/int4 initializer and a DequantizeLinear,
a smoothing factor folded into a norm weight or applied by a Mul, an activation Q/DQ pair, a linear
kept in half precision between two Casts. Each edit also writes the linear's *weight map* entry:
where its weight came from in the checkpoint and how to recompute it (docs/precision.md, "Weight map").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmtrt.pipelines.precision import quant_math as qm
from llmtrt.pipelines.precision.graph import Linear, Source, TensorSink, node_prefix, read_array, read_fp32


@dataclass
class Rewrite:
    source: Source
    options: Any                      # PrecisionOptions
    sink: TensorSink
    calibration: Any = None           # calibration.Calibration when the precision is calibrated
    fp32_kept: list[dict[str, str]] = field(default_factory=list)
    kept_linears: dict[str, str] = field(default_factory=dict)    # module -> reason (graph metadata)
    details: dict[str, Any] = field(default_factory=dict)
    weight_map: dict[str, dict[str, Any]] = field(default_factory=dict)
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    modified: dict[str, np.ndarray] = field(default_factory=dict)  # small fp32 initializers changed in memory
    to_half: list[tuple[Any, Any, Any]] = field(default_factory=list)  # (target, fp32 source, half type)
    stage_weights: dict[str, np.ndarray] = field(default_factory=dict)
    mix: Any = None                   # mix.Mix: a scheme per group instead of one for all

    @property
    def graph(self):
        return self.source.graph

    @property
    def config(self):
        return self.source.exported.config

    def keep(self, what: str, kind: str, reason: str) -> None:
        self.fp32_kept.append({"name": what, "kind": kind, "reason": reason})

    def convert(self, value, half, source=None) -> None:
        """``value`` will hold ``source``'s (default: its own) fp32 data in ``half``, written at the end."""
        if any(t is value for t, _, _ in self.to_half):
            return
        self.to_half.append((value, source if source is not None else value, half))
        value.dtype = half

    # --- weights ------------------------------------------------------------------------------
    def weight(self, lin: Linear) -> np.ndarray:
        """fp32 [in, out] of a linear (from the calibration stage's copy when it has one)."""
        cached = self.stage_weights.get(lin.weight.name)
        if cached is not None:
            w = np.asarray(cached, dtype=np.float32)
            return np.ascontiguousarray(w.T) if lin.transposed else w
        return read_fp32(lin)

    def array(self, value) -> np.ndarray:
        if value.name in self.modified:
            return self.modified[value.name]
        cached = self.stage_weights.get(value.name)
        return np.array(cached, dtype=np.float32) if cached is not None else read_array(value)

    def new_initializer(self, name: str, data: np.ndarray | bytes, dtype, shape=None):
        import onnx_ir as ir

        value = ir.Value(name=name)
        self.sink.put(value, data, dtype, shape)
        self.graph.register_initializer(value)
        return value

    def drop_if_unused(self, value) -> None:
        if value is not None and value.is_initializer() and not value.uses():
            self.graph.initializers.pop(value.name, None)

    # --- edits --------------------------------------------------------------------------------
    def dequantized_weight(self, lin: Linear, q: np.ndarray, scale: np.ndarray, bits: int,
                           block_size: int | None) -> dict[str, Any]:
        """Replace ``lin``'s weight by int8/int4 values + a DequantizeLinear; returns the weight-map scheme."""
        import onnx_ir as ir

        base = lin.weight.name if not lin.transposed else f"{lin.module}.weight_t"
        if bits == 8:
            values = self.new_initializer(f"{base}.int8", q.astype(np.int8), ir.DataType.INT8)
        else:
            values = self.new_initializer(f"{base}.int4", qm.pack_int4(q), ir.DataType.INT4, q.shape)
        scales = self.new_initializer(f"{base}.scale", scale.astype(np.float32), ir.DataType.FLOAT)
        attrs = [ir.AttrInt64("axis", 1)] if block_size is None else [ir.AttrInt64("axis", 0),
                                                                      ir.AttrInt64("block_size", block_size)]
        out = ir.Value(name=f"{base}.dequantized", shape=ir.Shape(q.shape), type=ir.TensorType(ir.DataType.FLOAT))
        dq = ir.Node("", "DequantizeLinear", [values, scales], attrs, outputs=[out],
                     name=f"{node_prefix(lin.node)}/weight/DequantizeLinear")
        self.graph.insert_before(lin.node, dq)
        old = lin.node.inputs[1]
        lin.node.replace_input_with(1, out)
        transpose = old.producer() if not old.is_initializer() else None
        if transpose is not None and not old.uses():
            self.graph.remove(transpose, safe=True)
        self.drop_if_unused(lin.weight)
        scheme = ({"scheme": "int8", "bits": 8, "axis": 1, "granularity": "per output channel"} if block_size is None
                  else {"scheme": "int4", "bits": 4, "axis": 0, "block_size": block_size,
                        "granularity": "blocks along the input axis"})
        return {**scheme, "initializers": {"values": values.name, "scale": scales.name}, "node": dq.name}

    def smooth(self, group: list[Linear], s: np.ndarray) -> dict[str, Any]:
        """Divide the group's shared input by ``s``: folded into an RMSNorm weight that only feeds the
        group, else a ``Mul`` by ``1/s``. The caller multiplies the weights' rows by ``s``."""
        import onnx_ir as ir

        x = group[0].x
        producer = x.producer()
        members = {id(lin.node) for lin in group}
        if producer is not None and all(id(u.node) in members for u in x.uses()) and not x.is_graph_output():
            norm = _norm_weight(producer, len(s))
            if norm is not None:
                self.modified[norm.name] = (self.array(norm) / s).astype(np.float32)
                return {"kind": "folded", "initializer": norm.name, "source": norm.name,
                        "node": producer.name, "s": "source / folded"}
        inv = self.new_initializer(f"{group[0].module}.smooth_inv", (1.0 / s).astype(np.float32), ir.DataType.FLOAT)
        out = ir.Value(name=f"{x.name}.smoothed", shape=x.shape, type=ir.TensorType(ir.DataType.FLOAT))
        mul = ir.Node("", "Mul", [x, inv], outputs=[out], name=f"{node_prefix(group[0].node)}/Smooth")
        self.graph.insert_before(group[0].node, mul)
        for lin in group:
            lin.node.replace_input_with(0, out)
        return {"kind": "mul", "initializer": inv.name, "node": mul.name, "s": "1 / initializer"}

    def activation_qdq(self, group: list[Linear], scale: float) -> dict[str, Any]:
        """Static per-tensor int8 QuantizeLinear -> DequantizeLinear in front of the group."""
        import onnx_ir as ir

        x = group[0].x
        prefix = f"{group[0].module}.input"
        sc = self.new_initializer(f"{prefix}.scale", np.array(scale, dtype=np.float32), ir.DataType.FLOAT)
        zp = self.new_initializer(f"{prefix}.zero_point", np.array(0, dtype=np.int8), ir.DataType.INT8)
        name = node_prefix(group[0].node)
        q_out = ir.Value(name=f"{prefix}.int8", shape=x.shape, type=ir.TensorType(ir.DataType.INT8))
        dq_out = ir.Value(name=f"{prefix}.dequantized", shape=x.shape, type=ir.TensorType(ir.DataType.FLOAT))
        qn = ir.Node("", "QuantizeLinear", [x, sc, zp], outputs=[q_out], name=f"{name}/input/QuantizeLinear")
        dq = ir.Node("", "DequantizeLinear", [q_out, sc, zp], outputs=[dq_out], name=f"{name}/input/DequantizeLinear")
        self.graph.insert_before(group[0].node, [qn, dq])
        for lin in group:
            lin.node.replace_input_with(0, dq_out)
        return {"scheme": "int8 per-tensor, static", "scale": sc.name, "zero_point": zp.name}

    def record(self, lin: Linear, scheme: dict[str, Any], smoothing: dict[str, Any] | None = None,
               activation: dict[str, Any] | None = None) -> None:
        self.weight_map[lin.module] = {"node": lin.node.name, "source": source_tensors(self, lin), **scheme,
                                       "smoothing": smoothing, "activation": activation}


def _norm_weight(node, width: int):
    """The [width] weight of an RMSNorm-like node that only this node reads, else None."""
    if node.op_type not in ("RMSNorm", "RMSNormalization", "Mul"):
        return None
    for v in node.inputs:
        if v is not None and v.is_initializer() and v.shape is not None and list(v.shape) == [width] \
                and len(v.uses()) == 1:
            return v
    return None


def source_tensors(rw: Rewrite, lin: Linear) -> list[dict[str, Any]]:
    """Checkpoint tensors a linear's weight is made of: HF ``[out, in]`` tensors, their rows giving the
    graph weight's columns (``columns``: where they land in the [in, out] weight)."""
    from llmtrt.exporter.weights import expected_shapes

    config = rw.config
    shapes = expected_shapes(config)
    if lin.transposed:
        name = "model.embed_tokens.weight" if config.tie_word_embeddings else f"{lin.module}.weight"
        return [{"tensor": name, "rows": [0, lin.shape[1]], "columns": [0, lin.shape[1]], "tied": True}]
    parts = (rw.source.manifest.get("fused") or {}).get(lin.module) or [lin.module]
    out, start = [], 0
    for module in parts:
        name = f"{module}.weight"
        rows = int(shapes[name][0]) if name in shapes else lin.shape[1]
        out.append({"tensor": name, "rows": [0, rows], "columns": [start, start + rows]})
        start += rows
    return out
