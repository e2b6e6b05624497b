"""One registry entry per custom op: the torch op, its reference, the ONNX node and function, lowerings.

A new op is a new folder under ``plugins/`` plus one line in ``_OP_MODULES``: ``__init__.py`` (torch
op, reference, ONNX schema and function), ``lowering.py`` (standard form, TensorRT built-in form,
plugin routing), optionally ``kernel.py`` + ``trt_plugin.py``. Everything else (export, dialect
passes, the TensorRT lowering driver, tests that sweep the ops) reads this registry.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING

import onnx

if TYPE_CHECKING:
    from llmtrt.plugins.rewrite import TensorRTRewrite

DOMAIN = "llmtrt"
DOMAIN_VERSION = 1

# ONNX op type -> module that defines it (folder under plugins/).
_OP_MODULES = {
    "RMSNorm": "llmtrt.plugins.rms_norm",
    "RotaryEmbedding": "llmtrt.plugins.rotary_embedding",
    "GroupQueryAttention": "llmtrt.plugins.gqa_attention",
    "GroupQueryAttentionStatic": "llmtrt.plugins.gqa_attention_static",
}


@dataclass(frozen=True)
class CustomOp:
    """Everything llmtrt knows about one custom op."""

    onnx_op: str                                  # op type in the llmtrt domain
    version: str                                  # semantic version of the op's contract
    torch_op: Callable                            # torch.ops.llmtrt.<name>.default
    reference: Callable                           # plain-torch reference implementation
    translation: Callable                         # onnxscript function for the dynamo exporter
    function: Callable[[int], onnx.FunctionProto]  # opset -> ONNX local function with exact semantics
    to_standard: Callable[[onnx.NodeProto], list[onnx.NodeProto]]  # rewrite to opset-23 ops
    min_standard_opset: int = 23
    tensorrt: TensorRTRewrite | None = None       # --lower native: TensorRT built-in form
    # standard ops (as ``--ops standard`` writes this op) that need their own TensorRT form
    standard_tensorrt: Mapping[str, TensorRTRewrite] = field(default_factory=dict)
    to_plugin: Callable[[onnx.NodeProto], onnx.NodeProto] | None = None  # --lower plugin: route to llmtrt::<op>


@cache
def registry() -> dict[str, CustomOp]:
    """All custom ops, keyed by ONNX op type (importing each op module registers its torch op)."""
    ops = {}
    for op_type, module in _OP_MODULES.items():
        entry = importlib.import_module(module).OP
        assert entry.onnx_op == op_type, (module, entry.onnx_op)
        ops[op_type] = entry
    return ops


def translation_table() -> dict:
    """The dynamo exporter's ``custom_translation_table``: torch op overload -> onnxscript function."""
    return {op.torch_op: op.translation for op in registry().values()}


def functions(opset: int) -> list[onnx.FunctionProto]:
    """ONNX local functions for every custom op, written against the model's default-domain ``opset``."""
    return [op.function(opset) for op in registry().values()]


def tensorrt_rewrites() -> dict[tuple[str, str], TensorRTRewrite]:
    """(domain, op type) -> TensorRT built-in form, for our ops and the standard ops they become."""
    rewrites: dict[tuple[str, str], TensorRTRewrite] = {}
    for op in registry().values():
        if op.tensorrt is not None:
            rewrites[(DOMAIN, op.onnx_op)] = op.tensorrt
        rewrites.update({("", name): rw for name, rw in op.standard_tensorrt.items()})
    return rewrites
