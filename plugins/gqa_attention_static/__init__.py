"""Grouped-query attention on a fixed-size KV cache, updated in place at per-sequence write indices.

The cache is [batch, kv_heads, max_cache_len, head_dim]. The new K/V rows of sequence b are written
at slots write_indices[b] .. write_indices[b] + seq - 1 (ONNX opset-24 TensorScatter semantics,
TensorRT's KV_CACHE_UPDATE), then attention runs over all max_cache_len slots with the additive
``attn_mask`` [batch, 1, seq, max_cache_len] hiding empty, future and padding slots. Outputs the
attention result and the updated caches, which a runtime can alias to the inputs (no per-step
concatenation copies). Semantics are otherwise those of GroupQueryAttention.
"""

from __future__ import annotations

import onnx
import torch
from onnxscript.values import Opset

from llmtrt.plugins.gqa_attention import attention_body
from llmtrt.plugins.gqa_attention import reference as gqa_reference
from llmtrt.plugins.gqa_attention_static import lowering
from llmtrt.plugins.onnx_function import parse_function, register_schema
from llmtrt.plugins.registry import DOMAIN, DOMAIN_VERSION, CustomOp

SCHEMA = register_schema(
    "GroupQueryAttentionStatic", __doc__,
    inputs=[("Q", "T"), ("K", "T"), ("V", "T"), ("attn_mask", "T"), ("key_cache", "T"), ("value_cache", "T"),
            ("write_indices", "tensor(int64)")],
    outputs=[("Y", "T"), ("present_key", "T"), ("present_value", "T")],
    attributes={"q_num_heads": "int", "kv_num_heads": "int", "scale": "float"})
_llmtrt = Opset(DOMAIN, DOMAIN_VERSION)


def scatter_cache(cache: torch.Tensor, new: torch.Tensor, write_indices: torch.Tensor) -> torch.Tensor:
    """cache[b, :, write_indices[b] + s] = new[b, :, s] (out of place)."""
    slots = write_indices[:, None] + torch.arange(new.shape[2], device=new.device)  # [batch, seq]
    index = slots[:, None, :, None].expand_as(new)
    return cache.scatter(2, index, new)


def reference(q, k, v, attn_mask, key_cache, value_cache, write_indices, q_num_heads: int, kv_num_heads: int,
              scale: float):
    """Scatter the new rows into the caches, then GroupQueryAttention over the whole cache (as the
    ONNX function does: the updated cache is the "past" and there are no new rows to append)."""
    present_key = scatter_cache(key_cache, k, write_indices)
    present_value = scatter_cache(value_cache, v, write_indices)
    y, _, _ = gqa_reference(q, k[:, :, :0], v[:, :, :0], attn_mask, present_key, present_value,
                            q_num_heads, kv_num_heads, scale)
    return y, present_key, present_value


@torch.library.custom_op("llmtrt::gqa_attention_static", mutates_args=())
def gqa_attention_static(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor,
                         key_cache: torch.Tensor, value_cache: torch.Tensor, write_indices: torch.Tensor,
                         q_num_heads: int, kv_num_heads: int, scale: float
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return reference(q, k, v, attn_mask, key_cache, value_cache, write_indices, q_num_heads, kv_num_heads, scale)


@gqa_attention_static.register_fake
def _(q, k, v, attn_mask, key_cache, value_cache, write_indices, q_num_heads, kv_num_heads, scale):
    return torch.empty_like(q), torch.empty_like(key_cache), torch.empty_like(value_cache)


def translation(q, k, v, attn_mask, key_cache, value_cache, write_indices, q_num_heads: int, kv_num_heads: int,
                scale: float):
    return _llmtrt.GroupQueryAttentionStatic(
        q, k, v, attn_mask, key_cache, value_cache, write_indices,
        q_num_heads=q_num_heads, kv_num_heads=kv_num_heads, scale=scale, _num_outputs=3,
    )


def function(opset: int) -> onnx.FunctionProto:
    # The new rows scattered into the caches at write_indices[b] + i (one index tensor serves K and V:
    # they have the same shape), then GroupQueryAttention's attention over the whole updated cache.
    body = "\n".join([
        "  seq_shape = Shape <start = 2, end = 3> (K)",
        "  seq = Squeeze (seq_shape)",
        "  zero_s = Constant <value_int = 0> ()",
        "  one_s = Constant <value_int = 1> ()",
        "  steps = Range (zero_s, seq, one_s)",
        "  axis1 = Constant <value_ints = [1]> ()",
        "  wi2 = Unsqueeze (write_indices, axis1)",
        "  slots = Add (wi2, steps)",
        "  axes13 = Constant <value_ints = [1, 3]> ()",
        "  slots4 = Unsqueeze (slots, axes13)",
        "  k_shape = Shape (K)",
        "  rows = Expand (slots4, k_shape)",
        "  present_key = ScatterElements <axis = 2> (key_cache, rows, K)",
        "  present_value = ScatterElements <axis = 2> (value_cache, rows, V)",
        attention_body("Q", "present_key", "present_value", "attn_mask", "Y"),
    ])
    return parse_function(
        "GroupQueryAttentionStatic",
        "(Q, K, V, attn_mask, key_cache, value_cache, write_indices) => (Y, present_key, present_value)",
        body, opset, attributes="q_num_heads, kv_num_heads, scale",
    )


OP = CustomOp(
    onnx_op="GroupQueryAttentionStatic", version="1.0", torch_op=torch.ops.llmtrt.gqa_attention_static.default,
    reference=reference, translation=translation, function=function, to_standard=lowering.to_standard,
    tensorrt=lowering.TENSORRT, to_plugin=lowering.to_plugin,
    min_standard_opset=24,
)
