"""RMSNorm: y = x / sqrt(mean(x^2, last axis) + eps) * weight, reduced in fp32, no mean subtraction.

Matches transformers' LlamaRMSNorm: the input is upcast to fp32, normalised, cast back to the input
dtype, then scaled by the weight.
"""

from __future__ import annotations

import onnx
import torch
from onnxscript.values import Opset

from llmtrt.plugins.onnx_function import parse_function, reduce_mean_last_axis, register_schema
from llmtrt.plugins.registry import DOMAIN, DOMAIN_VERSION, CustomOp
from llmtrt.plugins.rms_norm import lowering

SCHEMA = register_schema(
    "RMSNorm", __doc__, inputs=[("X", "T"), ("scale", "T")], outputs=[("Y", "T")], attributes={"epsilon": "float"})
_llmtrt = Opset(DOMAIN, DOMAIN_VERSION)


def reference(x: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + epsilon)
    return weight * normed.to(x.dtype)


@torch.library.custom_op("llmtrt::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
    return reference(x, weight, epsilon)


@rms_norm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
    return torch.empty_like(x)


def translation(x, weight, epsilon: float):
    return _llmtrt.RMSNorm(x, weight, epsilon=epsilon)


def function(opset: int) -> onnx.FunctionProto:
    # Written as the pattern ONNX Runtime fuses into one SimplifiedLayerNormalization kernel
    # (Cast, Pow 2, ReduceMean, Add, Sqrt, Div, Cast back, Mul by the weight); the casts vanish for fp32.
    body = "\n".join([
        "  xf = Cast <to = 1> (X)",
        "  two = Constant <value_float = 2.0> ()",
        "  sq = Pow (xf, two)",
        reduce_mean_last_axis("ms", "sq", opset),
        "  eps = Constant <value_float: float = @epsilon> ()",
        "  var = Add (ms, eps)",
        "  std = Sqrt (var)",
        "  normed = Div (xf, std)",
        "  normed_t = CastLike (normed, X)",
        "  Y = Mul (scale, normed_t)",
    ])
    return parse_function("RMSNorm", "(X, scale) => (Y)", body, opset, attributes="epsilon")


OP = CustomOp(
    onnx_op="RMSNorm", version="1.0", torch_op=torch.ops.llmtrt.rms_norm.default, reference=reference,
    translation=translation, function=function, to_standard=lowering.to_standard,
    tensorrt=lowering.TENSORRT, to_plugin=lowering.to_plugin,
)
