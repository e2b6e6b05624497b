"""RMSNorm Triton kernel: one program per row, sum of squares in fp32, same rounding as ``reference``.

``y = weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``: the normalised row is rounded to the input
dtype before the weight multiply, like transformers' LlamaRMSNorm. Runs on CUDA tensors, or on CPU
tensors under ``TRITON_INTERPRET=1`` (how CI checks it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmtrt.plugins.launch import rms_norm_launch


@triton.jit
def rms_norm_kernel(x_ptr, w_ptr, hidden, y_ptr, EPS: tl.constexpr, BLOCK: tl.constexpr):
    # argument order: inputs, int32 scalars, outputs (TensorRT AOT plugins pass them in this order)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < hidden
    x = tl.load(x_ptr + row * hidden + cols, mask=inside, other=0.0)
    xf = x.to(tl.float32)
    mean_sq = tl.sum(xf * xf, axis=0) / hidden
    normed = (xf * (1.0 / tl.sqrt(mean_sq + EPS))).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=inside, other=0.0)
    y = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(y_ptr + row * hidden + cols, y.to(y_ptr.dtype.element_ty), mask=inside)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Kernel launch with the reference's signature (x [..., hidden], weight [hidden])."""
    hidden = x.shape[-1]
    if weight.shape != (hidden,) or weight.dtype != x.dtype:
        raise ValueError(f"rms_norm: weight must be [{hidden}] {x.dtype}, got {list(weight.shape)} {weight.dtype}")
    x2 = x.contiguous()
    y = torch.empty_like(x2)
    rows = x2.numel() // hidden
    if rows == 0:
        return y
    launch = rms_norm_launch(rows, hidden)
    rms_norm_kernel[launch.grid](x2, weight.contiguous(), hidden, y, EPS=float(epsilon), BLOCK=launch.block,
                                 num_warps=launch.num_warps)
    return y
