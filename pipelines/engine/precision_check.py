"""Is the ONNX graph really the precision asked for? Engines are strongly typed: the precision is
whatever the graph holds, so ``--precision`` is a check (fp16 needs fp16 tensors in the graph, never
a silent fp32 engine), read from the graph without its weights."""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from llmtrt.pipelines.engine.flags import check_precision_name
from llmtrt.pipelines.errors import LlmtrtUserError

_OTHER_FLOATS = {onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16"}
_QUANT_OPS = {"QuantizeLinear", "DequantizeLinear"}


@dataclass(frozen=True)
class GraphFacts:
    """What the graph says about its precision (collected without loading external weights)."""

    float_types: frozenset[int]          # onnx.TensorProto dtypes of IO, value_info, weights, Cast targets
    weight_types: frozenset[int]         # dtypes of initializers only
    has_qdq: bool                        # QuantizeLinear/DequantizeLinear present


def graph_facts(model: onnx.ModelProto) -> GraphFacts:
    g = model.graph
    types = {v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}
    weights = {t.data_type for t in g.initializer}
    casts = {a.i for n in g.node if n.op_type in ("Cast", "CastLike") for a in n.attribute if a.name == "to"}
    consts = {a.t.data_type for n in g.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"}
    nodes = [*g.node, *(n for f in model.functions for n in f.node)]
    return GraphFacts(frozenset(types | weights | casts | consts), frozenset(weights),
                      any(n.op_type in _QUANT_OPS for n in nodes))


def _needs(dtype: int, label: str):
    def check(facts: GraphFacts) -> str | None:
        if dtype in facts.float_types:
            return None
        return (f"--precision {label} asked for, but the ONNX graph has no {label} tensors (engines are strongly "
                f"typed, so this would be an fp32 engine); run `llmtrt quantize --to {label}` on it first")
    return check


def _fp32(facts: GraphFacts) -> str | None:
    low = sorted(label for dt, label in _OTHER_FLOATS.items() if dt in facts.weight_types)
    if low:
        return (f"--precision fp32 asked for, but the graph's weights are {'/'.join(low)}; "
                f"build it with --precision {low[0]}")
    return None


def _quantized(label: str):
    def check(facts: GraphFacts) -> str | None:
        if facts.has_qdq:
            return None
        return (f"--precision {label} needs QuantizeLinear/DequantizeLinear nodes in the graph; "
                f"run `llmtrt quantize --to {label}` on it first")
    return check


PRECISION_CHECKS = {
    "fp32": _fp32,
    "fp16": _needs(onnx.TensorProto.FLOAT16, "fp16"),
    "bf16": _needs(onnx.TensorProto.BFLOAT16, "bf16"),
    "int8": _quantized("int8"),
    "fp8": _quantized("fp8"),
    "int4": _quantized("int4"),
}


def check_precision(model: onnx.ModelProto, precision: str) -> None:
    """Raise a user error unless the graph really is ``precision`` (``int8-sq`` is checked as ``int8``):
    first what kind of tensors it holds (with the `llmtrt quantize` command that would make it), then
    the precision inventory of its linear layers, the same one `quantize` wrote and `validate` checks
    (at least 90% of the linear FLOPs not kept on purpose in that precision)."""
    from llmtrt.pipelines.precision.inventory import ACCEPTS, inventory

    problem = PRECISION_CHECKS[check_precision_name(precision)](graph_facts(model))
    if problem:
        raise LlmtrtUserError(problem)
    found = inventory(model) if precision in ACCEPTS and check_precision_name(precision) != "fp32" else None
    if found is not None and found.linears:  # fp32: the tensor check above already says no half/quantized data
        problem = found.contradicts(precision)
        if problem:
            raise LlmtrtUserError(f"--precision {precision}: the graph is not what it says: {problem}")
