"""Calibration one stage of the graph at a time: the fp32 export run in ONNX Runtime, layer by layer.

    stages = plan_stages(graph_proto)            # prefix (embedding, mask), layer 0 .. N-1, suffix (norm, lm_head)
    for result in run_stages(graph_proto, stages, windows, feeds, read_weight, linear_inputs, keep_rows):
        result.stats        # this stage's tensors: max |x|; per-channel max and mean |x| and sampled
        result.weights      # rows of the linear inputs it produces; the stage's weights, already read

A node belongs to the decoder layer its name says (``/model/layers/3/...``), other named nodes to the
prefix or the suffix, unnamed nodes (an inlined function body) to the latest stage they read from; a
node is never placed before a tensor it reads. Each stage becomes a small ONNX model: the tensors it
reads from earlier stages and its external weights are its inputs, every float tensor it makes is an
output. It runs on all calibration windows (batched while activations stay small) before the next
stage starts, so ONNX Runtime holds one stage's weights at a time and only the tensors crossing
stages (the residual stream, the mask) are kept between stages: peak memory is one layer, not the
model. The numbers are those of the whole-graph run: same ops, same kernels, same inputs.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

ACTIVATION_BUDGET = 64 << 20   # bytes of the widest activation of one batched run
_LAYER = re.compile(r"^/model/layers/(\d+)/")


@dataclass
class Stage:
    index: int
    label: str
    nodes: list[Any]                               # NodeProto
    inputs: list[str] = field(default_factory=list)     # tensors from graph inputs or earlier stages
    weights: list[str] = field(default_factory=list)    # initializers its nodes read
    outputs: list[str] = field(default_factory=list)    # tensors later stages read
    floats: list[str] = field(default_factory=list)     # float tensors it makes (statistics)


@dataclass
class StageStats:
    amax: dict[str, float] = field(default_factory=dict)
    channel_amax: dict[str, np.ndarray] = field(default_factory=dict)
    channel_mean: dict[str, np.ndarray] = field(default_factory=dict)
    rows: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class StageResult:
    stage: Stage
    stats: StageStats
    weights: dict[str, np.ndarray] = field(default_factory=dict)


def plan_stages(model, types: dict[str, int]) -> list[Stage]:
    """Split ``model``'s main graph into prefix, decoder layers and suffix (see the module doc)."""
    from onnx import TensorProto

    g = model.graph
    inits = {t.name for t in g.initializer}
    produced_in: dict[str, int] = {}
    layers = max((int(m.group(1)) for n in g.node if (m := _LAYER.match(n.name or ""))), default=-1) + 1
    assignment = []
    for n in g.node:
        deps = [produced_in[i] for i in n.input if i in produced_in]
        floor = max(deps, default=-1)
        m = _LAYER.match(n.name or "")
        if m:
            stage = max(int(m.group(1)), floor)
        elif n.name:
            stage = layers if floor >= 0 else -1
        else:
            stage = floor
        assignment.append(stage)
        for o in n.output:
            if o:
                produced_in[o] = stage
    keys = sorted(set(assignment))
    stages = {k: Stage(i, _label(k, layers), []) for i, k in enumerate(keys)}
    for n, k in zip(g.node, assignment, strict=True):
        stages[k].nodes.append(n)
    readers: dict[str, set[int]] = {}
    for n, k in zip(g.node, assignment, strict=True):
        for i in n.input:
            readers.setdefault(i, set()).add(stages[k].index)
    graph_outputs = {o.name for o in g.output}
    for st in stages.values():
        made = list(dict.fromkeys(o for n in st.nodes for o in n.output if o))
        read = list(dict.fromkeys(i for n in st.nodes for i in n.input if i))
        made_set = set(made)
        st.inputs = [i for i in read if i not in made_set and i not in inits]
        st.weights = [i for i in read if i in inits]
        st.outputs = [o for o in made if any(r > st.index for r in readers.get(o, ())) and o not in graph_outputs]
        st.floats = [o for n in st.nodes for o in n.output if o and types.get(o) == TensorProto.FLOAT]
    return [stages[k] for k in keys]


def _label(key: int, layers: int) -> str:
    return "prefix" if key < 0 else "suffix" if key >= layers else f"layer {key}"


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------
def stage_model(model, stage: Stage, types: dict[str, int], external: set[str]):
    """The ONNX model of one stage: boundary tensors and external weights in, its tensors out."""
    from onnx import helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    graph_inputs = {v.name: v for v in g.input}
    inputs = []
    for name in stage.inputs:
        if name in graph_inputs:
            inputs.append(graph_inputs[name])
        else:
            inputs.append(helper.make_tensor_value_info(name, types.get(name, 0), None))
    for name in stage.weights:
        if name in external:
            t = inits[name]
            inputs.append(helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    outputs = [helper.make_tensor_value_info(o, types.get(o, 0), None) for o in dict.fromkeys(stage.outputs +
                                                                                                 stage.floats)]
    graph = helper.make_graph(stage.nodes, f"stage_{stage.index}", inputs, outputs,
                              initializer=[inits[n] for n in stage.weights if n not in external])
    m = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    m.functions.extend(model.functions)
    return m


def _session(model):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # every tensor as written
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_cpu_mem_arena = False  # the stage's activations are freed with it, not pooled
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def chunk_size(windows: int, seq_len: int, widest: int) -> int:
    """Windows per run so that the widest activation stays under ACTIVATION_BUDGET."""
    return max(1, min(windows, ACTIVATION_BUDGET // max(1, seq_len * widest * 4)))


def row_indices(total: int, keep: int) -> np.ndarray:
    """``keep`` row indices evenly spaced over ``total`` (all rows when keep >= total)."""
    if keep >= total:
        return np.arange(total)
    return np.unique(np.linspace(0, total - 1, keep).round().astype(np.int64))


def run_stages(model, stages: list[Stage], types: dict[str, int], chunks: list[dict[str, np.ndarray]],
               read_weight: Callable[[str], np.ndarray], external: set[str], linear_inputs: set[str],
               keep_rows: int, progress: bool = True) -> Iterator[StageResult]:
    """Run every stage on every chunk of windows (``chunks``: graph-input feeds), yielding each
    stage's statistics once it has seen all windows."""
    last_reader = {}
    for st in stages:
        for i in st.inputs:
            last_reader[i] = st.index
    store: dict[str, list[np.ndarray]] = {}
    rows_total = sum(int(c["input_ids"].size) for c in chunks)
    keep = row_indices(rows_total, keep_rows)
    t0 = time.perf_counter()
    for st in stages:
        weights = {n: read_weight(n) for n in st.weights if n in external}
        stats = StageStats()
        if st.nodes:
            session = _session(stage_model(model, st, types, external))
            wanted = list(dict.fromkeys(st.outputs + st.floats))
            sums: dict[str, np.ndarray] = {}
            sampled: dict[str, list[np.ndarray]] = {}
            row0 = 0
            for k, chunk in enumerate(chunks):
                feeds = {n: (chunk[n] if n in chunk else store[n][k]) for n in st.inputs}
                feeds.update(weights)
                values = dict(zip(wanted, session.run(wanted, feeds), strict=True))
                for o in st.outputs:
                    store.setdefault(o, []).append(values[o])
                rows = int(chunk["input_ids"].size)
                _accumulate(stats, sums, sampled, values, st.floats, linear_inputs, keep, row0, rows)
                row0 += rows
            del session
            for name, s in sums.items():
                stats.channel_mean[name] = (s / rows_total).astype(np.float32)
            stats.rows = {n: np.concatenate(r) for n, r in sampled.items()}
        for name in [n for n, last in last_reader.items() if last <= st.index and n in store]:
            del store[name]
        if progress:
            sys.stderr.write(f"calibrating: {st.label} ({st.index + 1}/{len(stages)}, "
                             f"{time.perf_counter() - t0:.1f} s)\n")
            sys.stderr.flush()
        yield StageResult(st, stats, weights)


def _accumulate(stats: StageStats, sums, sampled, values, floats, linear_inputs, keep, row0: int, rows: int) -> None:
    for name in floats:
        v = values[name]
        if v.size:
            stats.amax[name] = max(stats.amax.get(name, 0.0), float(np.max(np.abs(v))))
        else:
            stats.amax.setdefault(name, 0.0)
        if name not in linear_inputs:
            continue
        x = v.reshape(-1, v.shape[-1])
        a = np.abs(x)
        stats.channel_amax[name] = np.maximum(stats.channel_amax.get(name, 0.0), a.max(axis=0))
        sums[name] = sums.get(name, 0.0) + a.sum(axis=0, dtype=np.float64)
        local = keep[(keep >= row0) & (keep < row0 + x.shape[0])] - row0
        sampled.setdefault(name, []).append(np.array(x[local], dtype=np.float32))
