"""TensorRT plugin ``llmtrt::RotaryEmbedding`` (tensorrt.plugin): (X, position_ids, cos, sin) -> Y like X.

No ``from __future__ import annotations`` here: tensorrt.plugin reads the real annotation objects.
"""

# ruff: noqa: UP006, UP007, UP035  (typing.Tuple/Union as in NVIDIA's samples: tensorrt.plugin inspects annotations)
from typing import Any, Tuple, Union

from llmtrt.plugins.launch import rotary_launch
from llmtrt.plugins.trt_plugins import (
    AotKernel,
    aot_result,
    autotune_types,
    check_dtypes,
    const_dim,
    triton_type,
)

PLUGIN_NAME = "RotaryEmbedding"
PLUGIN_ID = "llmtrt::RotaryEmbedding"
PLUGIN_VERSION = "1"
OP_DIR = "rotary_embedding"
CODE_FILES = ("__init__.py", "kernel.py", "trt_plugin.py")
IMPLEMENTATIONS = ("aot", "impl")
INPUTS = ("X", "position_ids", "cos_cache", "sin_cache")


def output_shapes(x: tuple, position_ids: tuple, cos_cache: tuple, sin_cache: tuple) -> list[tuple]:
    """Y has X's shape [batch, heads, seq, head_dim]; tables are [max_positions, head_dim / 2]."""
    if len(x) != 4 or len(position_ids) != 2 or len(cos_cache) != 2 or len(sin_cache) != 2:
        raise ValueError(f"RotaryEmbedding: expected ranks X 4, position_ids 2, cos/sin 2; got {len(x)}, "
                         f"{len(position_ids)}, {len(cos_cache)}, {len(sin_cache)}")
    if isinstance(x[3], int) and isinstance(cos_cache[1], int) and x[3] != 2 * cos_cache[1]:
        raise ValueError(f"RotaryEmbedding: head_dim {x[3]} != 2 * cos_cache's last dim {cos_cache[1]}")
    return [tuple(x)]


def output_dtypes(x: Any, position_ids: Any, cos_cache: Any, sin_cache: Any) -> list[str]:
    t = check_dtypes("RotaryEmbedding", list(INPUTS), [x, position_ids, cos_cache, sin_cache],
                     same=["X", "cos_cache", "sin_cache"])
    pos = getattr(position_ids, "name", str(position_ids)).upper()
    if pos != "INT64":
        raise ValueError(f"RotaryEmbedding: position_ids must be INT64, got {pos}")
    return [t]


def aot_kernel(x_shape: tuple, dtype: Any) -> AotKernel:
    batch, heads, seq, head_dim = x_shape
    heads_c = const_dim(heads, "RotaryEmbedding heads")
    head_dim_c = const_dim(head_dim, "RotaryEmbedding head_dim")
    launch = rotary_launch(batch, heads_c, seq, head_dim_c)
    t = f"*{triton_type(dtype)}"
    return AotKernel(
        kernel="rotary_kernel",
        signature={"x_ptr": t, "pos_ptr": "*i64", "cos_ptr": t, "sin_ptr": t, "heads": "i32", "seq": "i32",
                   "head_dim": "i32", "y_ptr": t, "BLOCK_HEADS": "constexpr", "BLOCK_HALF": "constexpr"},
        constexprs={"BLOCK_HEADS": launch.block_heads, "BLOCK_HALF": launch.block_half},
        num_warps=launch.num_warps, grid=launch.grid, extra_args=(heads_c, seq, head_dim_c))


def define(trtp: Any, trt: Any) -> None:
    """Register the plugin's descriptor, autotune, JIT and AOT implementations with ``trtp``."""

    @trtp.register(PLUGIN_ID)
    def rotary_desc(X: trtp.TensorDesc, position_ids: trtp.TensorDesc, cos_cache: trtp.TensorDesc,
                    sin_cache: trtp.TensorDesc) -> trtp.TensorDesc:
        output_dtypes(X.dtype, position_ids.dtype, cos_cache.dtype, sin_cache.dtype)
        output_shapes(*(tuple(t.shape_expr) for t in (X, position_ids, cos_cache, sin_cache)))
        return X.like()

    @trtp.autotune(PLUGIN_ID)
    def rotary_autotune(X: trtp.TensorDesc, position_ids: trtp.TensorDesc, cos_cache: trtp.TensorDesc,
                        sin_cache: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc]) -> list:
        return [trtp.AutoTuneCombination(autotune_types(["T", "INT64", "T", "T", "T"]))]

    @trtp.aot_impl(PLUGIN_ID)
    def rotary_aot(X: trtp.TensorDesc, position_ids: trtp.TensorDesc, cos_cache: trtp.TensorDesc,
                   sin_cache: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc], tactic: int
                   ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        return aot_result(trtp, __name__, aot_kernel(tuple(X.shape_expr), X.dtype))

    @trtp.impl(PLUGIN_ID)
    def rotary_impl(X: trtp.Tensor, position_ids: trtp.Tensor, cos_cache: trtp.Tensor, sin_cache: trtp.Tensor,
                    outputs: Tuple[trtp.Tensor], stream: int) -> None:
        import torch

        from llmtrt.plugins.rotary_embedding.kernel import rotary_embedding

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            args = [torch.as_tensor(t, device="cuda") for t in (X, position_ids, cos_cache, sin_cache)]
            torch.as_tensor(outputs[0], device="cuda").copy_(rotary_embedding(*args))
