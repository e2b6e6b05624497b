"""RotaryEmbedding lowerings: the opset-23 standard form (= TensorRT's built-in form), plugin routing.

Ours takes (X, position_ids, cos, sin); opset-23 RotaryEmbedding takes (X, cos, sin, position_ids).
TensorRT picks importers by op type, not domain, so an un-lowered ``llmtrt::RotaryEmbedding`` would
be read with the standard input order: a silent miscompile the build refuses.
"""

from __future__ import annotations

import onnx
from onnx import helper

from llmtrt.plugins.rewrite import Names, TensorRTRewrite, attr, base_name, tag_for_plugin


def to_standard(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    x, position_ids, cos_cache, sin_cache = node.input
    return [helper.make_node("RotaryEmbedding", [x, cos_cache, sin_cache, position_ids], list(node.output),
                             name=node.name, interleaved=0)]


def to_tensorrt(node: onnx.NodeProto, names: Names, **_: object) -> list[onnx.NodeProto]:
    """RotaryEmbedding(X, position_ids, cos, sin) -> opset-23 RotaryEmbedding(X, cos, sin, position_ids)."""
    x, pos, cos, sin = node.input[:4]
    return [helper.make_node("RotaryEmbedding", [x, cos, sin, pos], [node.output[0]], name=base_name(node),
                             interleaved=int(attr(node, "interleaved", 0)))]


TENSORRT = TensorRTRewrite(to_tensorrt, ("RotaryEmbedding",), 23)
to_plugin = tag_for_plugin
