"""GQA attention with a growing KV cache as Triton kernels: concat + attention in one pass.

Q [B, Hq, S, D] is read as [B, Hkv, groups*S, D] (the ``groups`` query heads of one KV head are
consecutive rows), so a K/V tile is loaded once per KV head and decode (S = 1) still fills a tile.
Keys j < past come from ``past_key``, the rest from ``K``; the row-tile-0 program of each KV head
also writes the tile it read into ``present_key`` / ``present_value`` (the cache concat costs no
extra pass). Softmax is online (flash-attention) in fp32; probabilities are rounded to the input
dtype before the PV product, as in ``reference``.

Masking: the additive ``attn_mask`` [B, 1, S, past+S] (the op's contract: causality and left padding
both live in the mask), or, with ``attn_mask=None``, causal by cache index: query i sees keys
j <= past + i (no padding), which also lets prefill tiles stop early.

Decode with few (row tile x batch x KV head) programs splits the keys across programs
(flash-decoding): each split writes a normalised partial output and its log-sum-exp, and
``combine_kernel`` merges them. Argument order is inputs, int32 scalars, outputs — the order
TensorRT's AOT plugins pass — and only the single-pass kernel is used there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmtrt.plugins.launch import attention_launch

NEG_BIG = -1.0e30   # finite "masked" score: a fully masked split stays NaN-free and weighs zero when combined


@triton.jit
def _attend_tile(q_ptr, k_ptr, v_ptr, mask_ptr, pk_ptr, pv_ptr, present_k_ptr, present_v_ptr,
                 seq, past, groups, kv_heads, key_lo, key_hi, pid_m, bh,
                 SCALE: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    rows_n = groups * seq
    total = past + seq
    b = bh // kv_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = offs_m < rows_n
    pos_i = offs_m % seq                       # query index within the sequence
    d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + bh * rows_n * BLOCK_D + offs_m[:, None] * BLOCK_D + d[None, :],
                mask=row_in[:, None], other=0.0)
    past_base = bh * past * BLOCK_D
    new_base = bh * seq * BLOCK_D
    present_base = bh * total * BLOCK_D
    writer = pid_m == 0
    if not HAS_MASK:  # causal: the tile's last query bounds the keys it needs
        r_last = tl.minimum(pid_m * BLOCK_M + BLOCK_M, rows_n) - 1
        r_first = pid_m * BLOCK_M
        one_head = (r_first // seq) == (r_last // seq)
        max_i = tl.where(one_head, r_last % seq, seq - 1)
        key_hi_attend = tl.minimum(key_hi, past + max_i + 1)
        # the writer tile must still walk every key of its range to fill present
        key_hi = tl.where(writer, key_hi, key_hi_attend)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(key_lo, key_hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_in = offs_n < key_hi
        from_past = offs_n < past
        old = (n_in & from_past)[:, None]
        new = (n_in & (offs_n >= past))[:, None]
        p_off = past_base + offs_n[:, None] * BLOCK_D + d[None, :]
        n_off = new_base + (offs_n - past)[:, None] * BLOCK_D + d[None, :]
        kt = tl.where(old, tl.load(pk_ptr + p_off, mask=old, other=0.0), tl.load(k_ptr + n_off, mask=new, other=0.0))
        vt = tl.where(old, tl.load(pv_ptr + p_off, mask=old, other=0.0), tl.load(v_ptr + n_off, mask=new, other=0.0))
        out_off = present_base + offs_n[:, None] * BLOCK_D + d[None, :]
        store = (n_in & ((tl.zeros([BLOCK_N], tl.int32) + pid_m) == 0))[:, None]
        tl.store(present_k_ptr + out_off, kt, mask=store)
        tl.store(present_v_ptr + out_off, vt, mask=store)

        s = tl.dot(q, tl.trans(kt), input_precision=DOT_PRECISION) * SCALE
        if HAS_MASK:
            add = tl.load(mask_ptr + (b * seq + pos_i)[:, None] * total + offs_n[None, :],
                          mask=row_in[:, None] & n_in[None, :], other=0.0)
            s = s + add.to(tl.float32)
        else:
            s = tl.where(offs_n[None, :] <= past + pos_i[:, None], s, NEG_BIG)
        s = tl.where(n_in[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i, offs_m, row_in


@triton.jit
def attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, pk_ptr, pv_ptr, seq, past, groups, kv_heads,
                     y_ptr, present_k_ptr, present_v_ptr,
                     SCALE: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Single pass: grid (row tiles, batch * kv_heads); writes Y and the present caches."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    acc, m_i, l_i, offs_m, row_in = _attend_tile(
        q_ptr, k_ptr, v_ptr, mask_ptr, pk_ptr, pv_ptr, present_k_ptr, present_v_ptr,
        seq, past, groups, kv_heads, 0, past + seq, pid_m, bh,
        SCALE, HAS_MASK, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION)
    out = acc / l_i[:, None]
    d = tl.arange(0, BLOCK_D)
    tl.store(y_ptr + bh * groups * seq * BLOCK_D + offs_m[:, None] * BLOCK_D + d[None, :],
             out.to(y_ptr.dtype.element_ty), mask=row_in[:, None])


@triton.jit
def attention_split_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, pk_ptr, pv_ptr, seq, past, groups, kv_heads,
                           keys_per_split, present_k_ptr, present_v_ptr, o_part_ptr, lse_ptr,
                           SCALE: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Flash-decoding: grid (row tiles, batch * kv_heads, splits); partials [B*Hkv, splits, rows, D]."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    key_lo = split * keys_per_split
    key_hi = tl.minimum(key_lo + keys_per_split, past + seq)
    acc, m_i, l_i, offs_m, row_in = _attend_tile(
        q_ptr, k_ptr, v_ptr, mask_ptr, pk_ptr, pv_ptr, present_k_ptr, present_v_ptr,
        seq, past, groups, kv_heads, key_lo, key_hi, pid_m, bh,
        SCALE, HAS_MASK, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION)
    rows_n = groups * seq
    part = (bh * num_splits + split) * rows_n + offs_m
    d = tl.arange(0, BLOCK_D)
    tl.store(o_part_ptr + part[:, None] * BLOCK_D + d[None, :], acc / l_i[:, None], mask=row_in[:, None])
    tl.store(lse_ptr + part, m_i + tl.log(l_i), mask=row_in)


@triton.jit
def combine_kernel(o_part_ptr, lse_ptr, rows_n, num_splits, y_ptr,
                   BLOCK_D: tl.constexpr, BLOCK_SPLITS: tl.constexpr):
    """One program per output row: softmax-weighted sum of the splits' partial outputs."""
    row = tl.program_id(0).to(tl.int64)          # bh * rows_n + r
    bh = row // rows_n
    r = row % rows_n
    sp = tl.arange(0, BLOCK_SPLITS)
    sp_in = sp < num_splits
    part = (bh * num_splits + sp) * rows_n + r
    lse = tl.load(lse_ptr + part, mask=sp_in, other=float("-inf"))
    w = tl.exp(lse - tl.max(lse, 0))
    d = tl.arange(0, BLOCK_D)
    o = tl.load(o_part_ptr + part[:, None] * BLOCK_D + d[None, :], mask=sp_in[:, None], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(y_ptr + row * BLOCK_D + d, out.to(y_ptr.dtype.element_ty))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs must not silently drop to TF32 (the reference is fp32)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                  past_key: torch.Tensor, past_value: torch.Tensor, q_num_heads: int, kv_num_heads: int,
                  scale: float, num_splits: int | None = None, num_sms: int = 132
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel launch with the reference's signature; ``attn_mask=None`` means causal by cache index."""
    batch, q_heads, seq, head_dim = q.shape
    past = past_key.shape[2]
    total = past + seq
    expect = {"K": (k, (batch, kv_num_heads, seq, head_dim)), "V": (v, (batch, kv_num_heads, seq, head_dim)),
              "past_key": (past_key, (batch, kv_num_heads, past, head_dim)),
              "past_value": (past_value, (batch, kv_num_heads, past, head_dim))}
    if attn_mask is not None:
        expect["attn_mask"] = (attn_mask, (batch, 1, seq, total))
    if q_heads != q_num_heads:
        raise ValueError(f"gqa_attention: Q has {q_heads} heads, q_num_heads is {q_num_heads}")
    for name, (tensor, shape) in expect.items():
        if tuple(tensor.shape) != shape or tensor.dtype != q.dtype:
            raise ValueError(f"gqa_attention: {name} must be {list(shape)} {q.dtype}, got "
                             f"{list(tensor.shape)} {tensor.dtype}")
    launch = attention_launch(batch, q_heads, kv_num_heads, seq, total, head_dim, num_sms=num_sms,
                              num_splits=num_splits)
    groups = q_heads // kv_num_heads
    q, k, v, past_key, past_value = (t.contiguous() for t in (q, k, v, past_key, past_value))
    mask = attn_mask.contiguous() if attn_mask is not None else q   # unused pointer when causal
    y = torch.empty_like(q)
    present_key = q.new_empty(batch, kv_num_heads, total, head_dim)
    present_value = q.new_empty(batch, kv_num_heads, total, head_dim)
    meta = dict(SCALE=float(scale), HAS_MASK=attn_mask is not None, BLOCK_M=launch.block_m,
                BLOCK_N=launch.block_n, BLOCK_D=launch.block_d, DOT_PRECISION=dot_precision(q.dtype),
                num_warps=launch.num_warps)
    if launch.num_splits == 1:
        attention_kernel[launch.grid](q, k, v, mask, past_key, past_value, seq, past, groups, kv_num_heads,
                                      y, present_key, present_value, **meta)
        return y, present_key, present_value
    rows = groups * seq
    o_part = q.new_empty(batch * kv_num_heads, launch.num_splits, rows, head_dim, dtype=torch.float32)
    lse = q.new_empty(batch * kv_num_heads, launch.num_splits, rows, dtype=torch.float32)
    attention_split_kernel[launch.grid](q, k, v, mask, past_key, past_value, seq, past, groups, kv_num_heads,
                                        launch.keys_per_split, present_key, present_value, o_part, lse, **meta)
    combine_kernel[launch.combine_grid](o_part, lse, rows, launch.num_splits, y, BLOCK_D=head_dim,
                                        BLOCK_SPLITS=launch.block_splits)
    return y, present_key, present_value
