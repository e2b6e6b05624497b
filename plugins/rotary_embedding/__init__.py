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
    # Y = X * [cos, cos] + [x2, x1] * [-sin, sin]: the same products and sums as x1 cos - x2 sin,
    # x2 cos + x1 sin (negation is exact). The tables' part depends only on the tables and positions,
    # so a runtime computes it once for every call; per call it runs Split, Concat, Mul, Mul, Add.
    split = "Split <axis = -1, num_outputs = 2>" if opset >= 18 else "Split <axis = -1>"
    body = "\n".join([
        "  cos3 = Gather <axis = 0> (cos_cache, position_ids)",
        "  sin3 = Gather <axis = 0> (sin_cache, position_ids)",
        "  neg_sin3 = Neg (sin3)",
        "  cos_full = Concat <axis = -1> (cos3, cos3)",
        "  sin_full = Concat <axis = -1> (neg_sin3, sin3)",
        "  one = Constant <value_ints = [1]> ()",
        "  cos4 = Unsqueeze (cos_full, one)",
        "  sin4 = Unsqueeze (sin_full, one)",
        "  cos = CastLike (cos4, X)",
        "  sin = CastLike (sin4, X)",
        f"  x1, x2 = {split} (X)",
        "  rotated = Concat <axis = -1> (x2, x1)",
        "  a = Mul (X, cos)",
        "  b = Mul (rotated, sin)",
        "  Y = Add (a, b)",
    ])
    return parse_function("RotaryEmbedding", "(X, position_ids, cos_cache, sin_cache) => (Y)", body, opset)


OP = CustomOp(
    onnx_op="RotaryEmbedding", version="1.0", torch_op=torch.ops.llmtrt.rotary_embedding.default,
    reference=reference, translation=translation, function=function, to_standard=lowering.to_standard,
    tensorrt=lowering.TENSORRT, to_plugin=lowering.to_plugin,
)
