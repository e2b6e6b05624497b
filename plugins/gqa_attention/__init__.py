"""Grouped-query attention with a growing KV cache: past in, present out.

present_key = concat(past_key, K) along the sequence axis (likewise V); every group of
q_num_heads / kv_num_heads consecutive query heads shares one K/V head;
Y = softmax(Q K^T * scale + attn_mask) V, softmax in fp32. ``attn_mask`` is additive,
[batch, 1, seq, past + seq] (0 where allowed, a large negative number where not), so causality and
left padding are both in the mask. Input order follows ONNX opset-23 Attention:
(Q, K, V, attn_mask, past_key, past_value) -> (Y, present_key, present_value), all 4-D
[batch, heads, seq, head_dim].
"""

from __future__ import annotations

import onnx
import torch
from onnxscript.values import Opset

from llmtrt.plugins.gqa_attention import lowering
from llmtrt.plugins.onnx_function import parse_function, register_schema
from llmtrt.plugins.registry import DOMAIN, DOMAIN_VERSION, CustomOp

SCHEMA = register_schema(
    "GroupQueryAttention", __doc__,
    inputs=[("Q", "T"), ("K", "T"), ("V", "T"), ("attn_mask", "T"), ("past_key", "T"), ("past_value", "T")],
    outputs=[("Y", "T"), ("present_key", "T"), ("present_value", "T")],
    attributes={"q_num_heads": "int", "kv_num_heads": "int", "scale": "float"})
_llmtrt = Opset(DOMAIN, DOMAIN_VERSION)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor,
              past_key: torch.Tensor, past_value: torch.Tensor, q_num_heads: int, kv_num_heads: int,
              scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    present_key = torch.cat((past_key, k), dim=2)
    present_value = torch.cat((past_value, v), dim=2)
    groups = q_num_heads // kv_num_heads
    keys = present_key.repeat_interleave(groups, dim=1)
    values = present_value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, keys.transpose(2, 3)) * scale + attn_mask.to(q.dtype)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs, values), present_key, present_value


@torch.library.custom_op("llmtrt::gqa_attention", mutates_args=())
def gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor,
                  past_key: torch.Tensor, past_value: torch.Tensor, q_num_heads: int, kv_num_heads: int,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return reference(q, k, v, attn_mask, past_key, past_value, q_num_heads, kv_num_heads, scale)


@gqa_attention.register_fake
def _(q, k, v, attn_mask, past_key, past_value, q_num_heads, kv_num_heads, scale):
    batch, kv_heads, past, head_dim = past_key.shape
    total = past + k.shape[2]
    return (torch.empty_like(q), past_key.new_empty(batch, kv_heads, total, head_dim),
            past_value.new_empty(batch, kv_heads, total, head_dim))


def translation(q, k, v, attn_mask, past_key, past_value, q_num_heads: int, kv_num_heads: int, scale: float):
    return _llmtrt.GroupQueryAttention(
        q, k, v, attn_mask, past_key, past_value,
        q_num_heads=q_num_heads, kv_num_heads=kv_num_heads, scale=scale, _num_outputs=3,
    )


def attention_body(q: str, keys: str, values: str, mask: str, y: str) -> str:
    """ONNX text of Y = softmax(Q K^T * scale + mask) V (softmax in fp32) over a whole cache, for the
    function bodies of both attention ops. Q [B, Hq, S, D] is viewed as [B, Hkv, G*S, D] (query head h
    uses KV head h // G, and no K/V is copied); the mask is tiled G times along its query axis to match.
    Every shape is a constant of the attributes, so after inlining a runtime folds them away: per call
    the runtime sees Reshape, MatMul (with K^T and the scale folded in), Add, Softmax, MatMul, Reshape."""
    return "\n".join([
        "  kvh = Constant <value_int: int = @kv_num_heads> ()",
        "  qh = Constant <value_int: int = @q_num_heads> ()",
        "  groups = Div (qh, kvh)",
        "  zero = Constant <value_ints = [0]> ()",
        "  one = Constant <value_ints = [1]> ()",
        "  minus1 = Constant <value_ints = [-1]> ()",
        "  kvh1 = Unsqueeze (kvh, zero)",
        "  qh1 = Unsqueeze (qh, zero)",
        "  groups1 = Unsqueeze (groups, zero)",
        "  grouped_shape = Concat <axis = 0> (zero, kvh1, minus1, zero)",
        "  heads_shape = Concat <axis = 0> (zero, qh1, minus1, zero)",
        "  tiles = Concat <axis = 0> (one, one, groups1, one)",
        f"  qg = Reshape ({q}, grouped_shape)",
        f"  kt = Transpose <perm = [0, 1, 3, 2]> ({keys})",
        "  raw = MatMul (qg, kt)",
        "  scale_f = Constant <value_float: float = @scale> ()",
        f"  scale_t = CastLike (scale_f, {q})",
        "  scaled = Mul (raw, scale_t)",
        "  scores = Cast <to = 1> (scaled)",
        f"  mask_f = Cast <to = 1> ({mask})",
        "  mask_g = Tile (mask_f, tiles)",
        "  masked = Add (scores, mask_g)",
        "  probs_f = Softmax <axis = -1> (masked)",
        f"  probs = CastLike (probs_f, {q})",
        f"  out = MatMul (probs, {values})",
        f"  {y} = Reshape (out, heads_shape)",
    ])


def function(opset: int) -> onnx.FunctionProto:
    body = "\n".join([
        "  present_key = Concat <axis = 2> (past_key, K)",
        "  present_value = Concat <axis = 2> (past_value, V)",
        attention_body("Q", "present_key", "present_value", "attn_mask", "Y"),
    ])
    return parse_function(
        "GroupQueryAttention",
        "(Q, K, V, attn_mask, past_key, past_value) => (Y, present_key, present_value)",
        body, opset, attributes="q_num_heads, kv_num_heads, scale",
    )


OP = CustomOp(
    onnx_op="GroupQueryAttention", version="1.0", torch_op=torch.ops.llmtrt.gqa_attention.default,
    reference=reference, translation=translation, function=function, to_standard=lowering.to_standard,
    tensorrt=lowering.TENSORRT, standard_tensorrt=lowering.STANDARD_TENSORRT, to_plugin=lowering.to_plugin,
)
