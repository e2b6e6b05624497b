"""GroupQueryAttention lowerings: the opset-23 standard form, TensorRT's built-in form, plugin routing;
and the TensorRT form of the standard dialect's own ``Attention`` (``--ops standard`` graphs).

TensorRT's Attention importer refuses past_key/past_value inputs, more than one output,
``softmax_precision`` and ``softcap``, so the past is concatenated outside the node. The node
carries ``TRT_decomposable=1`` (TensorRT's attribute, not ONNX's): without it TensorRT-RTX 1.7
refuses fp32 attention and fp16 attention with head_dim 8 ("Attention operation was not supported
by a dedicated kernel"); with it fused kernels are still used where they exist. The result is a
TensorRT-only graph (onnx.checker and ONNX Runtime reject the attribute).
"""

from __future__ import annotations

import onnx
from onnx import helper

from llmtrt.plugins.rewrite import Names, TensorRTRewrite, attr, base_name, tag_for_plugin


def to_standard(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return [helper.make_node(
        "Attention", list(node.input), list(node.output), name=node.name,
        q_num_heads=attrs["q_num_heads"], kv_num_heads=attrs["kv_num_heads"], scale=attrs["scale"],
        softmax_precision=onnx.TensorProto.FLOAT,
    )]


def tensorrt_attention(base: str, q: str, k: str, v: str, mask: str, y: str, scale: float | None,
                       decomposable: bool) -> onnx.NodeProto:
    """TensorRT-importable Attention: no past inputs, one output, no softmax_precision/softcap."""
    attrs: dict[str, object] = {} if scale is None else {"scale": float(scale)}
    if decomposable:
        attrs["TRT_decomposable"] = 1
    return helper.make_node("Attention", [q, k, v] + ([mask] if mask else []), [y], name=f"{base}/attention", **attrs)


def to_tensorrt(node: onnx.NodeProto, names: Names, *, decomposable: bool = True,
                **_: object) -> list[onnx.NodeProto]:
    """GroupQueryAttention -> Concat(past, new) for K and V, then Attention(Q, K_all, V_all, mask)."""
    q, k, v, mask, past_k, past_v = node.input[:6]
    y, present_k, present_v = (list(node.output) + ["", "", ""])[:3]
    base = base_name(node)
    present_k = present_k or names.fresh(f"{base}/present_key")
    present_v = present_v or names.fresh(f"{base}/present_value")
    return [
        helper.make_node("Concat", [past_k, k], [present_k], name=f"{base}/concat_key", axis=2),
        helper.make_node("Concat", [past_v, v], [present_v], name=f"{base}/concat_value", axis=2),
        tensorrt_attention(base, q, present_k, present_v, mask, y, attr(node, "scale"), decomposable),
    ]


def attention_to_tensorrt(node: onnx.NodeProto, names: Names, *, decomposable: bool = True,
                          **_: object) -> list[onnx.NodeProto]:
    """Standard opset-23 Attention -> the form TensorRT imports (past concatenated outside).

    A node using what TensorRT cannot express (the 4th output qk_matmul_output, a nonpad_kv_seqlen
    input, softcap) is left as is: the parser then names it.
    """
    ins = (list(node.input) + [""] * 7)[:7]
    outs = (list(node.output) + [""] * 4)[:4]
    if outs[3] or ins[6] or any(a.name in ("softcap", "qk_matmul_output_mode") and helper.get_attribute_value(a)
                                for a in node.attribute):
        return [node]
    q, k, v, mask, past_k, past_v = ins[:6]
    base = base_name(node)
    nodes = []
    kv = {"key": k, "value": v}
    for past, present, kind in ((past_k, outs[1], "key"), (past_v, outs[2], "value")):
        if past:
            present = present or names.fresh(f"{base}/present_{kind}")
            nodes.append(helper.make_node("Concat", [past, kv[kind]], [present], name=f"{base}/concat_{kind}", axis=2))
            kv[kind] = present
        elif present:
            nodes.append(helper.make_node("Identity", [kv[kind]], [present], name=f"{base}/present_{kind}"))
    scale = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "scale"), None)
    attention = tensorrt_attention(base, q, kv["key"], kv["value"], mask, outs[0], scale, decomposable)
    if any(a.name == "is_causal" and helper.get_attribute_value(a) for a in node.attribute):
        attention.attribute.append(helper.make_attribute("is_causal", 1))
    return nodes + [attention]


TENSORRT = TensorRTRewrite(to_tensorrt, ("Attention",), 23)
STANDARD_TENSORRT = {"Attention": TensorRTRewrite(attention_to_tensorrt, ("Attention",), 23)}
to_plugin = tag_for_plugin
