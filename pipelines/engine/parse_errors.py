"""What TensorRT's ONNX parser could not import, as one user error listing every node, and the
custom-domain nodes it would import with the wrong importer (refused before parsing)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import onnx

from llmtrt.pipelines.engine.backends import Backend
from llmtrt.pipelines.engine.lowering import custom_nodes
from llmtrt.pipelines.errors import LlmtrtUserError

LOWER_HINT = ("try `--lower native` (TensorRT built-in RMSNormalization/RotaryEmbedding/Attention) or "
              "`--lower inline` (primitive ops only)")
ERRORS = ("ERROR", "INTERNAL_ERROR")
INTENDED_DOMAINS = frozenset({"trt", "com.microsoft"})  # custom domains TensorRT's importers are written for


@dataclass(frozen=True)
class NodeFailure:
    """One ONNX node TensorRT could not import."""

    node: str
    op_type: str
    message: str

    def __str__(self) -> str:
        return f"{self.node or '<unnamed>'} ({self.op_type}): {self.message}"


class UnsupportedNodesError(LlmtrtUserError):
    """TensorRT could not import some nodes; ``failures`` lists them all."""

    def __init__(self, source: str, failures: Sequence[NodeFailure], hint: str = LOWER_HINT) -> None:
        self.failures = list(failures)
        lines = "\n".join(f"  - {f}" for f in self.failures)
        if not any(f.op_type for f in self.failures):  # e.g. external weights that cannot be read
            hint = "no node is at fault; fix the file as the message says"
        super().__init__(f"{source}: TensorRT cannot import {len(self.failures)} node(s):\n{lines}\n{hint}")


def parser_failures(parser: Any, model: onnx.ModelProto) -> list[NodeFailure]:
    """Every error the ONNX parser recorded, as (node name, op type, message)."""
    failures = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        index = err.node()
        node = model.graph.node[index] if 0 <= index < len(model.graph.node) else None
        name = err.node_name() or (node.name if node is not None else "")
        op = err.node_operator() or (node.op_type if node is not None else "")
        failures.append(NodeFailure(name, op, err.desc()))
    return failures


def check_custom_nodes(model: onnx.ModelProto, backend: Backend, plugin_names: set[str],
                       override: bool, source: str = "graph") -> None:
    """Refuse custom-domain nodes that TensorRT would import with the wrong importer.

    The parser picks importers by op type only: ``llmtrt::RotaryEmbedding`` would silently go to
    the built-in RotaryEmbedding importer (different input order) unless a plugin takes it.
    """
    bad = []
    for node in custom_nodes(model):
        if node.domain in INTENDED_DOMAINS or not backend.supports_operator(node.op_type):
            continue
        if override and node.op_type in plugin_names:
            continue
        bad.append(NodeFailure(node.name, f"{node.domain}::{node.op_type}",
                               f"TensorRT would import it with its built-in '{node.op_type}' importer, which "
                               "ignores the domain and has other semantics"))
    if bad:
        raise UnsupportedNodesError(source, bad, "lower the custom nodes first: " + LOWER_HINT)


def plugin_routed_ops(model: onnx.ModelProto, plugin_names: set[str], override: bool) -> set[str]:
    """Custom op types the parser will hand to a plugin creator.

    Without the override flag a node with a local function is imported as that function even when a
    creator of the same name is registered (measured); with it, the creator wins.
    """
    functions = {(f.domain, f.name) for f in model.functions}
    return {n.op_type for n in custom_nodes(model)
            if n.op_type in plugin_names and (override or (n.domain, n.op_type) not in functions)}
