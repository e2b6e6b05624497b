"""RMSNorm lowerings: the opset-23 standard form, TensorRT's built-in form, plugin routing."""

from __future__ import annotations

import onnx
from onnx import helper

from llmtrt.plugins.rewrite import Names, TensorRTRewrite, attr, base_name, tag_for_plugin


def to_standard(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """RMSNorm(X, scale; epsilon) -> opset-23 RMSNormalization(axis=-1, fp32 stash)."""
    eps = next(a.f for a in node.attribute if a.name == "epsilon")
    return [helper.make_node("RMSNormalization", list(node.input), list(node.output), name=node.name,
                             axis=-1, epsilon=eps, stash_type=1)]


def to_tensorrt(node: onnx.NodeProto, names: Names, **_: object) -> list[onnx.NodeProto]:
    """RMSNorm(X, scale; epsilon) -> RMSNormalization(X, scale; axis=-1, epsilon); TensorRT's importer
    decomposes it with an fp32 stash whatever stash_type says."""
    eps = float(attr(node, "epsilon", 1e-6))
    return [helper.make_node("RMSNormalization", list(node.input[:2]), [node.output[0]],
                             name=base_name(node), axis=-1, epsilon=eps)]


TENSORRT = TensorRTRewrite(to_tensorrt, ("RMSNormalization",), 23)
to_plugin = tag_for_plugin
