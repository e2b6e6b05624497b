"""Op dialects of the exported graph: one pass each, chosen with ``--ops``.

- ``custom``:     llmtrt RMSNorm / RotaryEmbedding / GroupQueryAttention nodes, each with an ONNX
                  local function holding its exact semantics (ONNX Runtime and TensorRT inline them).
- ``standard``:   the same nodes rewritten to opset-23 RMSNormalization / RotaryEmbedding / Attention.
- ``decomposed``: the local functions inlined: primitive ops only, for old runtimes (opset >= 17).
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass

import onnx
import onnx.inliner
import onnx.version_converter
from onnx import helper

from llmtrt.exporter.config import ModelConfig
from llmtrt.exporter.errors import LlmtrtUserError

MAX_OPSET = onnx.defs.onnx_opset_version()
CAPTURE_OPSET = 18  # torch's ONNX translations are written for 18; other opsets are converted after capture


@dataclass(frozen=True)
class Dialect:
    name: str
    default_opset: int
    min_opset: int
    apply: Callable[[onnx.ModelProto, int], onnx.ModelProto]
    summary: str


def _custom(proto: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Attach the local function of every custom op the graph uses (and of ops those functions call)."""
    from llmtrt.plugins.registry import DOMAIN, functions

    available = {f.name: f for f in functions(opset)}
    pending = [n.op_type for n in proto.graph.node if n.domain == DOMAIN]
    used: dict[str, onnx.FunctionProto] = {}
    while pending:
        name = pending.pop()
        if name in used:
            continue
        used[name] = available[name]
        pending.extend(n.op_type for n in used[name].node if n.domain == DOMAIN)
    del proto.functions[:]
    proto.functions.extend(used[name] for name in sorted(used))
    return proto


def _standard(proto: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    from llmtrt.plugins.registry import DOMAIN, registry

    ops = registry()
    nodes = []
    for node in proto.graph.node:
        nodes.extend(ops[node.op_type].to_standard(node) if node.domain == DOMAIN else [node])
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    del proto.functions[:]
    _drop_domain(proto, DOMAIN)
    return proto


def _decomposed(proto: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    from llmtrt.plugins.registry import DOMAIN

    proto = onnx.inliner.inline_local_functions(_custom(proto, opset))
    del proto.functions[:]
    _drop_domain(proto, DOMAIN)
    return proto


def _drop_domain(proto: onnx.ModelProto, domain: str) -> None:
    keep = [o for o in proto.opset_import if o.domain != domain]
    del proto.opset_import[:]
    proto.opset_import.extend(keep)


DIALECTS = {
    "custom": Dialect("custom", 18, 18, _custom, "llmtrt custom nodes with ONNX function bodies"),
    "standard": Dialect("standard", 23, 23, _standard, "opset-23 RMSNormalization / RotaryEmbedding / Attention"),
    "decomposed": Dialect("decomposed", 17, 17, _decomposed, "primitive ONNX ops only"),
}


def get(name: str) -> Dialect:
    try:
        return DIALECTS[name]
    except KeyError:
        raise LlmtrtUserError(f"--ops {name!r} is not a dialect; use one of {', '.join(DIALECTS)}") from None


def finalize(proto: onnx.ModelProto, config: ModelConfig, dialect: str, opset: int) -> onnx.ModelProto:
    """Name nodes and weights after their modules, convert to ``opset``, then apply the dialect pass.

    ``proto`` comes from the capture at CAPTURE_OPSET, before any custom node has a function body.
    """
    name_after_modules(proto)
    if opset != CAPTURE_OPSET:
        proto = convert_opset(proto, opset)
    proto = get(dialect).apply(proto, opset)
    proto.producer_name = "llmtrt"
    helper.set_model_props(proto, {"llmtrt.dialect": dialect, "llmtrt.model": config.name})
    return proto


_HELD = "llmtrt.held"  # private domain that carries nodes past onnx's version converter unchanged


def convert_opset(proto: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """onnx.version_converter from CAPTURE_OPSET to ``opset``, plus the one adapter it lacks for these graphs:
    Split 18 -> 13 (the fused projections' Split; 13 has no ``num_outputs``: without a ``split`` input it
    splits into as many equal parts as it has outputs, which is what ``num_outputs`` asked for)."""
    held = [n for n in proto.graph.node if n.op_type == "Split" and n.domain == ""] if opset < 18 else []
    for node in held:
        node.domain = _HELD
    if held:
        proto.opset_import.append(helper.make_opsetid(_HELD, 1))
    proto = onnx.version_converter.convert_version(proto, opset)
    for node in proto.graph.node:
        if node.op_type == "Split" and node.domain == _HELD:
            node.domain = ""
            keep = [a for a in node.attribute if a.name != "num_outputs"]
            del node.attribute[:]
            node.attribute.extend(keep)
    _drop_domain(proto, _HELD)
    return proto


def _module_scope(node: onnx.NodeProto) -> str | None:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            modules = [s for s in scopes[:-1] if s and not s.startswith("_")]
            return modules[-1] if modules else None
    return None


def name_after_modules(proto: onnx.ModelProto) -> None:
    """Node names like ``/model/layers/0/self_attn/q_proj/MatMul`` and linear weights
    ``model.layers.0.self_attn.q_proj.weight_t`` ([in, out]), so reports and precision passes can
    say which layer they mean."""
    initializers = {t.name: t for t in proto.graph.initializer}
    consumers: dict[str, int] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    renames: dict[str, str] = {}
    used: set[str] = set()
    scopes: dict[str, str | None] = {}  # tensor -> scope of the node that made it
    for node in proto.graph.node:
        scope = _module_scope(node)
        if scope is None and node.op_type == "Split" and node.input:  # the capture drops a Split's scopes:
            scope = scopes.get(node.input[0])                        # it splits its producer's output
        scopes.update(dict.fromkeys(node.output, scope))
        base = "/" + scope.replace(".", "/") if scope else ""
        name = f"{base}/{node.op_type}"
        k = 0
        while name in used:
            k += 1
            name = f"{base}/{node.op_type}_{k}"
        used.add(name)
        node.name = name
        if node.op_type == "MatMul" and scope and len(node.input) == 2:
            weight = node.input[1]
            if weight in initializers and consumers.get(weight) == 1 and weight not in renames:
                renames[weight] = f"{scope}.weight_t"
    for old, new in renames.items():
        initializers[old].name = new
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
