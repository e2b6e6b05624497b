"""TensorRT plugin ``llmtrt::GroupQueryAttention`` (tensorrt.plugin).

(Q, K, V, attn_mask, past_key, past_value) -> (Y, present_key, present_value), attributes
q_num_heads, kv_num_heads, scale, like the ONNX node. The AOT implementation is the single-pass
kernel (cache concat + attention with the additive mask, one PTX per tactic: decode / prefill row
tiles); the Python ``impl`` (needs Python on the device) can also split the keys (flash-decoding).
No ``from __future__ import annotations`` here: tensorrt.plugin reads the real annotation objects.
"""

# ruff: noqa: UP006, UP007, UP035  (typing.Tuple/Union as in NVIDIA's samples: tensorrt.plugin inspects annotations)
from typing import Any, Tuple, Union

from llmtrt.plugins.launch import AOT_TACTICS, attention_aot_launch
from llmtrt.plugins.trt_plugins import (
    AotKernel,
    aot_result,
    autotune_types,
    check_dtypes,
    const_dim,
    triton_type,
)

PLUGIN_NAME = "GroupQueryAttention"
PLUGIN_ID = "llmtrt::GroupQueryAttention"
PLUGIN_VERSION = "1"
OP_DIR = "gqa_attention"
CODE_FILES = ("__init__.py", "kernel.py", "trt_plugin.py")
IMPLEMENTATIONS = ("aot", "impl")
INPUTS = ("Q", "K", "V", "attn_mask", "past_key", "past_value")


def _check_const(value: Any, expected: int, what: str) -> None:
    if isinstance(value, int) and value != expected:
        raise ValueError(f"GroupQueryAttention: {what} is {value}, the node's attribute says {expected}")


def output_shapes(q: tuple, k: tuple, v: tuple, attn_mask: tuple, past_key: tuple, past_value: tuple,
                  q_num_heads: int, kv_num_heads: int) -> list[tuple]:
    """Y like Q; present_key/value [batch, kv_heads, past + seq, head_dim] (dims may be symbolic)."""
    ranks = [len(t) for t in (q, k, v, attn_mask, past_key, past_value)]
    if ranks != [4] * 6:
        raise ValueError(f"GroupQueryAttention: all inputs must be 4-D, got ranks {ranks}")
    if q_num_heads <= 0 or kv_num_heads <= 0 or q_num_heads % kv_num_heads:
        raise ValueError(f"GroupQueryAttention: q_num_heads {q_num_heads} must be a positive multiple of "
                         f"kv_num_heads {kv_num_heads}")
    _check_const(q[1], q_num_heads, "Q's head count")
    for name, t in (("K", k), ("V", v), ("past_key", past_key), ("past_value", past_value)):
        _check_const(t[1], kv_num_heads, f"{name}'s head count")
    present = (past_key[0], past_key[1], past_key[2] + k[2], past_key[3])
    return [tuple(q), present, present]


def output_dtypes(*dtypes: Any) -> list[str]:
    t = check_dtypes("GroupQueryAttention", list(INPUTS), list(dtypes), same=list(INPUTS))
    return [t, t, t]


def aot_kernel(q_shape: tuple, past_shape: tuple, dtype: Any, q_num_heads: int, kv_num_heads: int,
               scale: float, tactic: int) -> AotKernel:
    batch, _, seq, head_dim = q_shape
    head_dim_c = const_dim(head_dim, "GroupQueryAttention head_dim")
    launch = attention_aot_launch(batch, q_num_heads, kv_num_heads, seq, head_dim_c, tactic)
    t = f"*{triton_type(dtype)}"
    sig = {name: t for name in ("q_ptr", "k_ptr", "v_ptr", "mask_ptr", "pk_ptr", "pv_ptr")}
    sig |= {"seq": "i32", "past": "i32", "groups": "i32", "kv_heads": "i32",
            "y_ptr": t, "present_k_ptr": t, "present_v_ptr": t}
    constexprs = {"SCALE": float(scale), "HAS_MASK": True, "BLOCK_M": launch.block_m, "BLOCK_N": launch.block_n,
                  "BLOCK_D": head_dim_c, "DOT_PRECISION": "ieee" if triton_type(dtype) == "fp32" else "tf32"}
    sig |= {name: "constexpr" for name in constexprs}
    return AotKernel(kernel="attention_kernel", signature=sig, constexprs=constexprs, num_warps=launch.num_warps,
                     grid=launch.grid[:2], extra_args=(seq, past_shape[2], q_num_heads // kv_num_heads, kv_num_heads),
                     notes={"tactic": AOT_TACTICS[tactic]})


def define(trtp: Any, trt: Any) -> None:
    """Register the plugin's descriptor, autotune, JIT and AOT implementations with ``trtp``."""

    @trtp.register(PLUGIN_ID)
    def gqa_desc(Q: trtp.TensorDesc, K: trtp.TensorDesc, V: trtp.TensorDesc, attn_mask: trtp.TensorDesc,
                 past_key: trtp.TensorDesc, past_value: trtp.TensorDesc, q_num_heads: int, kv_num_heads: int,
                 scale: float) -> Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        inputs = (Q, K, V, attn_mask, past_key, past_value)
        output_dtypes(*(t.dtype for t in inputs))
        _, present, _ = output_shapes(*(tuple(t.shape_expr) for t in inputs), q_num_heads, kv_num_heads)
        cache = trtp.from_shape_expr(present, dtype=past_key.dtype)
        return Q.like(), cache, cache.like()

    @trtp.autotune(PLUGIN_ID)
    def gqa_autotune(Q: trtp.TensorDesc, K: trtp.TensorDesc, V: trtp.TensorDesc, attn_mask: trtp.TensorDesc,
                     past_key: trtp.TensorDesc, past_value: trtp.TensorDesc, q_num_heads: int, kv_num_heads: int,
                     scale: float, outputs: Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]) -> list:
        combo = trtp.AutoTuneCombination(autotune_types(["T"] * 9))
        combo.tactics(sorted(AOT_TACTICS))
        return [combo]

    @trtp.aot_impl(PLUGIN_ID)
    def gqa_aot(Q: trtp.TensorDesc, K: trtp.TensorDesc, V: trtp.TensorDesc, attn_mask: trtp.TensorDesc,
                past_key: trtp.TensorDesc, past_value: trtp.TensorDesc, q_num_heads: int, kv_num_heads: int,
                scale: float, outputs: Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc], tactic: int
                ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        spec = aot_kernel(tuple(Q.shape_expr), tuple(past_key.shape_expr), Q.dtype, q_num_heads, kv_num_heads,
                          scale, tactic)
        return aot_result(trtp, __name__, spec)

    @trtp.impl(PLUGIN_ID)
    def gqa_impl(Q: trtp.Tensor, K: trtp.Tensor, V: trtp.Tensor, attn_mask: trtp.Tensor, past_key: trtp.Tensor,
                 past_value: trtp.Tensor, q_num_heads: int, kv_num_heads: int, scale: float,
                 outputs: Tuple[trtp.Tensor, trtp.Tensor, trtp.Tensor], stream: int, tactic: int) -> None:
        import torch

        from llmtrt.plugins.gqa_attention.kernel import gqa_attention

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            args = [torch.as_tensor(t, device="cuda") for t in (Q, K, V, attn_mask, past_key, past_value)]
            sms = torch.cuda.get_device_properties(args[0].device).multi_processor_count
            results = gqa_attention(*args, q_num_heads, kv_num_heads, scale, num_sms=sms)
            for out, res in zip(outputs, results, strict=True):
                torch.as_tensor(out, device="cuda").copy_(res)
