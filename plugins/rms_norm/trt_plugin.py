"""TensorRT plugin ``llmtrt::RMSNorm`` (tensorrt.plugin): X [..., hidden], scale [hidden] -> Y like X.

No ``from __future__ import annotations`` here: tensorrt.plugin reads the real annotation objects of
the registered functions.
"""

# ruff: noqa: UP006, UP007, UP035  (typing.Tuple/Union as in NVIDIA's samples: tensorrt.plugin inspects annotations)
from typing import Any, Tuple, Union

from llmtrt.plugins.launch import rms_norm_launch
from llmtrt.plugins.trt_plugins import (
    AotKernel,
    aot_result,
    autotune_types,
    check_dtypes,
    const_dim,
    triton_type,
)

PLUGIN_NAME = "RMSNorm"
PLUGIN_ID = "llmtrt::RMSNorm"
PLUGIN_VERSION = "1"
OP_DIR = "rms_norm"
CODE_FILES = ("__init__.py", "kernel.py", "trt_plugin.py")
IMPLEMENTATIONS = ("aot", "impl")
INPUTS = ("X", "scale")


def output_shapes(x: tuple, scale: tuple) -> list[tuple]:
    """Y has X's shape; scale must be [hidden] (checked when both are build-time constants)."""
    if len(x) < 1 or len(scale) != 1:
        raise ValueError(f"RMSNorm: X must have >= 1 dims and scale 1, got {len(x)} and {len(scale)}")
    if isinstance(x[-1], int) and isinstance(scale[0], int) and x[-1] != scale[0]:
        raise ValueError(f"RMSNorm: scale has {scale[0]} elements, X's last dim is {x[-1]}")
    return [tuple(x)]


def output_dtypes(x: Any, scale: Any) -> list[str]:
    return [check_dtypes("RMSNorm", list(INPUTS), [x, scale], same=["X", "scale"])]


def aot_kernel(x_shape: tuple, dtype: Any, epsilon: float) -> AotKernel:
    hidden = const_dim(x_shape[-1], "RMSNorm hidden size")
    rows = x_shape[0]
    for d in x_shape[1:-1]:
        rows = rows * d
    launch = rms_norm_launch(rows, hidden)
    t = f"*{triton_type(dtype)}"
    return AotKernel(
        kernel="rms_norm_kernel",
        signature={"x_ptr": t, "w_ptr": t, "hidden": "i32", "y_ptr": t, "EPS": "constexpr", "BLOCK": "constexpr"},
        constexprs={"EPS": float(epsilon), "BLOCK": launch.block}, num_warps=launch.num_warps,
        grid=launch.grid, extra_args=(hidden,))


def define(trtp: Any, trt: Any) -> None:
    """Register the plugin's descriptor, autotune, JIT and AOT implementations with ``trtp``."""

    @trtp.register(PLUGIN_ID)
    def rms_norm_desc(X: trtp.TensorDesc, scale: trtp.TensorDesc, epsilon: float) -> trtp.TensorDesc:
        output_dtypes(X.dtype, scale.dtype)
        output_shapes(tuple(X.shape_expr), tuple(scale.shape_expr))
        return X.like()

    @trtp.autotune(PLUGIN_ID)
    def rms_norm_autotune(X: trtp.TensorDesc, scale: trtp.TensorDesc, epsilon: float,
                          outputs: Tuple[trtp.TensorDesc]) -> list:
        return [trtp.AutoTuneCombination(autotune_types(["T", "T", "T"]))]

    @trtp.aot_impl(PLUGIN_ID)
    def rms_norm_aot(X: trtp.TensorDesc, scale: trtp.TensorDesc, epsilon: float, outputs: Tuple[trtp.TensorDesc],
                     tactic: int) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams,
                                           trtp.SymExprs]:
        return aot_result(trtp, __name__, aot_kernel(tuple(X.shape_expr), X.dtype, epsilon))

    @trtp.impl(PLUGIN_ID)
    def rms_norm_impl(X: trtp.Tensor, scale: trtp.Tensor, epsilon: float, outputs: Tuple[trtp.Tensor],
                      stream: int) -> None:
        import torch

        from llmtrt.plugins.rms_norm.kernel import rms_norm

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            y = torch.as_tensor(outputs[0], device="cuda")
            y.copy_(rms_norm(torch.as_tensor(X, device="cuda"), torch.as_tensor(scale, device="cuda"), epsilon))
