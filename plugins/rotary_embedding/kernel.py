"""RotaryEmbedding Triton kernel: half-split rotation with cos/sin rows gathered by position id.

X [batch, heads, seq, head_dim], position_ids [batch, seq] int64, cos/sin [max_positions, head_dim/2].
One program per (token, block of heads); the rotation is computed in fp32 and rounded once (the
reference rounds each product in the input dtype, so fp16/bf16 results differ by about one ulp).
Position ids must be < max_positions; the engine's profiles bound past + seq by it (not checked here,
a check would need a device sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmtrt.plugins.launch import rotary_launch


@triton.jit
def rotary_kernel(x_ptr, pos_ptr, cos_ptr, sin_ptr, heads, seq, head_dim, y_ptr,
                  BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)          # b * seq + s
    head0 = tl.program_id(1) * BLOCK_HEADS
    b = token // seq
    s = token % seq
    half = head_dim // 2
    cols = tl.arange(0, BLOCK_HALF)
    col_in = cols < half
    pos = tl.load(pos_ptr + token)
    cos = tl.load(cos_ptr + pos * half + cols, mask=col_in, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * half + cols, mask=col_in, other=0.0).to(tl.float32)
    hs = head0 + tl.arange(0, BLOCK_HEADS)
    # element (b, h, s, c) of a contiguous [B, H, S, D] tensor
    rows = ((b * heads + hs.to(tl.int64)) * seq + s) * head_dim
    inside = (hs < heads)[:, None] & col_in[None, :]
    p1 = rows[:, None] + cols[None, :]
    x1 = tl.load(x_ptr + p1, mask=inside, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + p1 + half, mask=inside, other=0.0).to(tl.float32)
    y1 = x1 * cos[None, :] - x2 * sin[None, :]
    y2 = x2 * cos[None, :] + x1 * sin[None, :]
    out_ty = y_ptr.dtype.element_ty
    tl.store(y_ptr + p1, y1.to(out_ty), mask=inside)
    tl.store(y_ptr + p1 + half, y2.to(out_ty), mask=inside)


def rotary_embedding(x: torch.Tensor, position_ids: torch.Tensor, cos_cache: torch.Tensor,
                     sin_cache: torch.Tensor) -> torch.Tensor:
    """Kernel launch with the reference's signature."""
    batch, heads, seq, head_dim = x.shape
    if position_ids.shape != (batch, seq) or position_ids.dtype != torch.int64:
        raise ValueError(f"rotary_embedding: position_ids must be [{batch}, {seq}] int64, got "
                         f"{list(position_ids.shape)} {position_ids.dtype}")
    if cos_cache.shape[-1] * 2 != head_dim or sin_cache.shape != cos_cache.shape:
        raise ValueError(f"rotary_embedding: cos/sin must be [max_positions, {head_dim // 2}], got "
                         f"{list(cos_cache.shape)} / {list(sin_cache.shape)}")
    x2 = x.contiguous()
    y = torch.empty_like(x2)
    if x2.numel() == 0:
        return y
    launch = rotary_launch(batch, heads, seq, head_dim)
    rotary_kernel[launch.grid](x2, position_ids.contiguous(), cos_cache.contiguous(), sin_cache.contiguous(),
                               heads, seq, head_dim, y, BLOCK_HEADS=launch.block_heads,
                               BLOCK_HALF=launch.block_half, num_warps=launch.num_warps)
    return y
