"""GroupQueryAttentionStatic lowerings: the standard form and TensorRT's built-in form (both opset-24
TensorScatter into each cache, then Attention over the whole cache). No plugin: with
``--lower plugin`` the node stays and the parser inlines its function body.

TensorRT's KV-cache update (TensorScatter -> KV_CACHE_UPDATE) needs the cache's sequence axis to
be static, so the build pins ``max_cache_length`` in the lowered graph.
"""

from __future__ import annotations

import onnx
from onnx import helper

from llmtrt.plugins.gqa_attention.lowering import tensorrt_attention
from llmtrt.plugins.rewrite import Names, TensorRTRewrite, attr, base_name


def _scatter(name: str, cache: str, new: str, write_indices: str, out: str) -> onnx.NodeProto:
    return helper.make_node("TensorScatter", [cache, new, write_indices], [out], name=name, axis=2, mode="linear")


def to_standard(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """Opset-24 TensorScatter writes the rows; Attention (no past inputs) reads the whole cache."""
    q, k, v, mask, key_cache, value_cache, write_indices = node.input
    y, present_key, present_value = node.output
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return [
        _scatter(node.name + "/key_update", key_cache, k, write_indices, present_key),
        _scatter(node.name + "/value_update", value_cache, v, write_indices, present_value),
        helper.make_node("Attention", [q, present_key, present_value, mask], [y], name=node.name,
                         q_num_heads=attrs["q_num_heads"], kv_num_heads=attrs["kv_num_heads"], scale=attrs["scale"],
                         softmax_precision=onnx.TensorProto.FLOAT),
    ]


def to_tensorrt(node: onnx.NodeProto, names: Names, *, decomposable: bool = True,
                **_: object) -> list[onnx.NodeProto]:
    """GroupQueryAttentionStatic -> TensorScatter into each cache, Attention over the whole cache."""
    q, k, v, mask, key_cache, value_cache, write_indices = node.input[:7]
    y, present_k, present_v = (list(node.output) + ["", "", ""])[:3]
    base = base_name(node)
    present_k = present_k or names.fresh(f"{base}/present_key")
    present_v = present_v or names.fresh(f"{base}/present_value")
    return [
        _scatter(f"{base}/key_update", key_cache, k, write_indices, present_k),
        _scatter(f"{base}/value_update", value_cache, v, write_indices, present_v),
        tensorrt_attention(base, q, present_k, present_v, mask, y, attr(node, "scale"), decomposable),
    ]


TENSORRT = TensorRTRewrite(to_tensorrt, ("TensorScatter", "Attention"), 24)
to_plugin = None
