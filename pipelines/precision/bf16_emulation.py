"""Run a bf16 artifact where there are no bf16 kernels (ONNX Runtime CPU): ``emulate_bf16``.

    fp32_graph = emulate_bf16(onnx.load("out/bf16/model.onnx"))     # then any fp32 runtime runs it

The result computes what a GPU computes for the bf16 graph: bf16 storage, fp32 arithmetic. Every
bf16 weight becomes the fp32 number it stands for (exact: a bf16 is the top half of an fp32), every
bf16 tensor becomes fp32, and after every op that produced a bf16 tensor its fp32 result is rounded
to bf16 (``Cast(to=BFLOAT16)`` then ``Cast(to=FLOAT)``, which ONNX Runtime CPU has). Ops that only
move values (Reshape, Transpose, Concat, Gather, ...) produce bf16-exact values and are not rounded
again. Local functions are inlined first so the ops inside them (the GroupQueryAttention body's
score MatMul) are rounded like any other. Inside a fused standard ``Attention`` node the
intermediates stay fp32 (only its outputs are rounded), as in a fused GPU kernel.
"""

from __future__ import annotations

import numpy as np

BF16, F32 = 16, 1
_MOVES_VALUES = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Slice", "Gather", "Identity",
                           "Expand", "Split", "Flatten", "Where", "TensorScatter", "ScatterND", "ScatterElements",
                           "GatherElements", "GatherND", "Pad", "Tile"})


def emulate_bf16(model, base_dir: str | None = None):
    """An fp32 ModelProto that emulates the bf16 ``model`` (loaded with its weights, or give ``base_dir``
    to read external ones); graph inputs/outputs typed bf16 become fp32."""
    import onnx
    import onnx.inliner
    from onnx import external_data_helper

    from llmtrt.pipelines.precision.inventory import infer_types

    m = onnx.ModelProto()
    m.CopyFrom(model)
    if base_dir is not None:
        external_data_helper.load_external_data_for_model(m, base_dir)
    if len(m.functions):
        m = onnx.inliner.inline_local_functions(m)
        del m.functions[:]
    types = infer_types(m)
    graph = m.graph
    for t in graph.initializer:
        if t.data_type == BF16:
            _bf16_initializer_to_fp32(t)
    renamed: dict[str, str] = {}       # bf16 graph input -> its rounded fp32 copy
    prelude = []
    for v in graph.input:
        if v.type.tensor_type.elem_type == BF16:
            v.type.tensor_type.elem_type = F32
            renamed[v.name] = f"{v.name}.bf16_rounded"
            prelude.extend(_round(v.name, renamed[v.name]))
    nodes = list(prelude)
    for n in graph.node:
        for k, name in enumerate(n.input):
            if name in renamed:
                n.input[k] = renamed[name]
        _fp32_attributes(n)
        rounded = [o for o in n.output if o and types.get(o) == BF16 and n.op_type not in _MOVES_VALUES]
        after = []
        for o in rounded:
            raw = f"{o}.fp32_unrounded"
            n.output[list(n.output).index(o)] = raw
            after.extend(_round(raw, o))
        nodes.append(n)
        nodes.extend(after)
    del graph.node[:]
    graph.node.extend(nodes)
    for v in graph.output:
        if v.type.tensor_type.elem_type == BF16:
            v.type.tensor_type.elem_type = F32
    del graph.value_info[:]
    return m


def _round(src: str, dst: str) -> list:
    from onnx import helper

    mid = f"{dst}.as_bf16"
    return [helper.make_node("Cast", [src], [mid], to=BF16, name=f"/bf16_emulation/{dst}/to_bf16"),
            helper.make_node("Cast", [mid], [dst], to=F32, name=f"/bf16_emulation/{dst}/to_fp32")]


def _bits(t) -> np.ndarray:
    if t.raw_data:
        return np.frombuffer(t.raw_data, dtype="<u2")
    return np.asarray(t.int32_data, dtype=np.uint32).astype(np.uint16)


def _bf16_initializer_to_fp32(t) -> None:
    from llmtrt.pipelines.precision.quant_math import bf16_bits_to_fp32

    if t.data_location == 1:  # EXTERNAL and not loaded
        raise ValueError(f"emulate_bf16: initializer {t.name!r} is external; pass base_dir to read it")
    values = bf16_bits_to_fp32(_bits(t))
    t.ClearField("int32_data")
    t.data_type = F32
    t.raw_data = values.astype("<f4").tobytes()


def _fp32_attributes(n) -> None:
    for a in n.attribute:
        if n.op_type == "Cast" and a.name == "to" and a.i == BF16:
            a.i = F32  # the rounding Casts after this node keep it a bf16 value
        elif a.type == a.TENSOR and a.t.data_type == BF16:
            _bf16_initializer_to_fp32(a.t)
        elif a.name in ("dtype", "output_dtype", "stash_type", "softmax_precision") and a.i == BF16:
            a.i = F32
