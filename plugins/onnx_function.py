"""Helpers shared by the custom ops: build an ONNX local function from text, reduce-mean per opset."""

from __future__ import annotations

import onnx
import onnx.parser

from llmtrt.plugins.registry import DOMAIN, DOMAIN_VERSION


def parse_function(name: str, signature: str, body: str, opset: int, attributes: str = "") -> onnx.FunctionProto:
    """Parse ``body`` (ONNX textual syntax) into a FunctionProto in the llmtrt domain.

    ``signature`` is ``(inputs) => (outputs)``; ``attributes`` is the ``<a, b>`` list, if any.
    """
    attrs = f"<{attributes}>" if attributes else ""
    text = (
        f'<domain: "{DOMAIN}", opset_import: ["" : {opset}]>\n'
        f"{name} {attrs} {signature}\n{{\n{body}\n}}"
    )
    return onnx.parser.parse_function(text)


def reduce_mean_last_axis(out: str, inp: str, opset: int) -> str:
    """ReduceMean over the last axis with keepdims, in the form the opset wants (axes moved to an input in 18)."""
    if opset >= 18:
        return f"  {out}_axes = Constant <value_ints = [-1]> ()\n  {out} = ReduceMean <keepdims = 1> ({inp}, {out}_axes)"
    return f"  {out} = ReduceMean <axes = [-1], keepdims = 1> ({inp})"


_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def register_schema(name: str, doc: str, inputs: list[tuple[str, str]], outputs: list[tuple[str, str]],
                    attributes: dict[str, str]) -> onnx.defs.OpSchema:
    """Register the op's schema with onnx (idempotent) so onnxscript and onnx.checker know it.

    ``inputs``/``outputs`` are (name, type) with type "T" (float family) or "tensor(int64)";
    ``attributes`` maps name -> "int" | "float".
    """
    from onnx.defs import OpSchema

    if onnx.defs.has(name, DOMAIN):
        return onnx.defs.get_schema(name, DOMAIN_VERSION, DOMAIN)
    kinds = {"int": OpSchema.AttrType.INT, "float": OpSchema.AttrType.FLOAT}
    schema = OpSchema(
        name, DOMAIN, DOMAIN_VERSION, doc,
        inputs=[OpSchema.FormalParameter(n, t) for n, t in inputs],
        outputs=[OpSchema.FormalParameter(n, t) for n, t in outputs],
        type_constraints=[("T", _FLOATS, "float tensors")],
        attributes=[OpSchema.Attribute(a, kinds[k], required=True) for a, k in attributes.items()],
    )
    onnx.defs.register_schema(schema)
    return schema
