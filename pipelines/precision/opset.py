"""Raising a graph's default-domain opset for the precisions that need newer ops (int8: 13, int4's
blocked DequantizeLinear: 21), rewriting what changed between 17 and 21 for the ops these graphs use."""

from __future__ import annotations

import numpy as np

from llmtrt.pipelines.errors import LlmtrtUserError

# --------------------------------------------------------------------------------------------
_REDUCE_AXES_INPUT_AT_18 = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                            "ReduceMin", "ReduceProd", "ReduceSumSquare")


def raise_opset(model, target: int) -> int:
    """Raise the default-domain opset (graph and local functions) to at least ``target``; returns it.

    Between 17 and 21 the changes to ops these graphs use are both at opset 18: Reduce* ``axes`` moved
    from an attribute to an input, and a Split into equal parts (no ``split`` input) must say
    ``num_outputs``; both done here. The rest only widened type lists.
    """
    from onnx import helper, numpy_helper

    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if current >= target:
        return current
    if current < 17:
        raise LlmtrtUserError(f"graph opset {current} is too old to raise to {target}; re-export with --opset 17 or newer")
    counter = [0]

    def fix(nodes, add_const) -> None:
        for n in nodes:
            if current < 18 and n.op_type in _REDUCE_AXES_INPUT_AT_18:
                axes = next((a for a in n.attribute if a.name == "axes"), None)
                if axes is not None:
                    name = add_const(np.asarray(helper.get_attribute_value(axes), dtype=np.int64))
                    n.attribute.remove(axes)
                    n.input.append(name)
            if current < 18 and n.op_type == "Split" and (len(n.input) < 2 or not n.input[1]) \
                    and not any(a.name == "num_outputs" for a in n.attribute):
                n.attribute.append(helper.make_attribute("num_outputs", len(n.output)))

    def graph_const(value):
        counter[0] += 1
        t = numpy_helper.from_array(value, f"/precision/reduce_axes_{counter[0]}")
        model.graph.initializer.append(t)
        return t.name

    fix(model.graph.node, graph_const)
    for fn in model.functions:
        extra = []

        def fn_const(value, extra=extra):
            counter[0] += 1
            out = f"reduce_axes_{counter[0]}"
            extra.append(helper.make_node("Constant", [], [out], value=numpy_helper.from_array(value)))
            return out

        fix(fn.node, fn_const)
        if extra:
            body = extra + list(fn.node)
            del fn.node[:]
            fn.node.extend(body)
        for o in fn.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = target
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = target
    return target
