"""RotaryEmbedding on [batch, heads, seq, head_dim] with cos/sin tables gathered by position id.

Half-split convention (transformers' ``rotate_half``): channel i is paired with channel i + d/2,
y1 = x1 cos - x2 sin, y2 = x2 cos + x1 sin. Tables are [max_positions, head_dim / 2], real cos/sin.
Input order follows ONNX opset-23 RotaryEmbedding minus its attributes: (X, position_ids, cos, sin).
"""

from __future__ import annotations

import onnx
import torch
from onnxscript.values import Opset

from llmtrt.plugins.onnx_function import parse_function, register_schema
from llmtrt.plugins.registry import DOMAIN, DOMAIN_VERSION, CustomOp
from llmtrt.plugins.rotary_embedding import lowering

SCHEMA = register_schema(
    "RotaryEmbedding", __doc__,
    inputs=[("X", "T"), ("position_ids", "tensor(int64)"), ("cos_cache", "T"), ("sin_cache", "T")],
    outputs=[("Y", "T")], attributes={})
_llmtrt = Opset(DOMAIN, DOMAIN_VERSION)


def reference(x: torch.Tensor, position_ids: torch.Tensor, cos_cache: torch.Tensor,
              sin_cache: torch.Tensor) -> torch.Tensor:
    cos = cos_cache[position_ids].unsqueeze(1).to(x.dtype)  # [batch, 1, seq, d/2]
    sin = sin_cache[position_ids].unsqueeze(1).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@torch.library.custom_op("llmtrt::rotary_embedding", mutates_args=())
def rotary_embedding(x: torch.Tensor, position_ids: torch.Tensor, cos_cache: torch.Tensor,
                     sin_cache: torch.Tensor) -> torch.Tensor:
    return reference(x, position_ids, cos_cache, sin_cache)


@rotary_embedding.register_fake
def _(x, position_ids, cos_cache, sin_cache):
    return torch.empty_like(x)


def translation(x, position_ids, cos_cache, sin_cache):
    return _llmtrt.RotaryEmbedding(x, position_ids, cos_cache, sin_cache)


def function(opset: int) -> onnx.FunctionProto:
    body = "\n".join([
        "  cos3 = Gather <axis = 0> (cos_cache, position_ids)",
        "  sin3 = Gather <axis = 0> (sin_cache, position_ids)",
        "  one = Constant <value_ints = [1]> ()",
        "  cos4 = Unsqueeze (cos3, one)",
        "  sin4 = Unsqueeze (sin3, one)",
        "  cos = CastLike (cos4, X)",
        "  sin = CastLike (sin4, X)",
        "  dim = Shape <start = -1> (X)",
        "  two = Constant <value_ints = [2]> ()",
        "  half = Div (dim, two)",
        "  zero = Constant <value_ints = [0]> ()",
        "  last = Constant <value_ints = [-1]> ()",
        "  x1 = Slice (X, zero, half, last)",
        "  x2 = Slice (X, half, dim, last)",
        "  a = Mul (x1, cos)",
        "  b = Mul (x2, sin)",
        "  y1 = Sub (a, b)",
        "  c = Mul (x2, cos)",
        "  d = Mul (x1, sin)",
        "  y2 = Add (c, d)",
        "  Y = Concat <axis = -1> (y1, y2)",
    ])
    return parse_function("RotaryEmbedding", "(X, position_ids, cos_cache, sin_cache) => (Y)", body, opset)


OP = CustomOp(
    onnx_op="RotaryEmbedding", version="1.0", torch_op=torch.ops.llmtrt.rotary_embedding.default,
    reference=reference, translation=translation, function=function, to_standard=lowering.to_standard,
    tensorrt=lowering.TENSORRT, to_plugin=lowering.to_plugin,
)
