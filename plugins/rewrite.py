"""Helpers the per-op lowerings (``plugins/<op>/lowering.py``) share: fresh tensor names, attribute
reads, and the attributes that route a node to an llmtrt TensorRT plugin.

A lowering is a function ``(node, names, **options) -> list[NodeProto]``; ``names`` hands out
tensor names that collide with nothing in the graph being rewritten.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import onnx
from onnx import helper

from llmtrt.exporter.errors import LlmtrtUserError

Rewrite = Callable[..., list[onnx.NodeProto]]  # (node, names, **options) -> replacement nodes


@dataclass(frozen=True)
class TensorRTRewrite:
    """How one op becomes ops TensorRT's ONNX parser has built-in importers for (``--lower native``)."""

    fn: Rewrite
    emits: tuple[str, ...]      # op types the rewrite produces that need a parser importer
    opset: int                  # default-domain opset the emitted ops need


class Names:
    """Fresh tensor names that collide with nothing in ``model``'s graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.used = {v for n in model.graph.node for v in (*n.input, *n.output)}
        self.used |= {v.name for v in (*model.graph.input, *model.graph.output, *model.graph.initializer)}

    def fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """Attribute ``name`` of ``node``; a user error naming the node when it is missing and has no default."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    if default is None:
        raise LlmtrtUserError(f"node {node.name!r} ({node.op_type}) lacks attribute {name!r}; re-export the model")
    return default


def base_name(node: onnx.NodeProto) -> str:
    """A stable prefix for the nodes a rewrite emits."""
    return node.name or f"{node.op_type}_{node.output[0]}"


def tag_for_plugin(node: onnx.NodeProto) -> onnx.NodeProto:
    """``node`` with the attributes that make TensorRT's parser pick the ``llmtrt::<op>`` plugin and
    its ahead-of-time kernel (``plugin_namespace``, ``aot=1``); attributes already set are kept."""
    from llmtrt.plugins.trt_plugins import plugin_node_attributes

    out = onnx.NodeProto()
    out.CopyFrom(node)
    present = {a.name for a in out.attribute}
    for name, value in plugin_node_attributes(aot=True).items():
        if name not in present:
            out.attribute.append(helper.make_attribute(name, value))
    return out
