"""Launch parameters for the Triton kernels, as pure Python (no triton, no GPU needed).

Each ``*_launch`` function turns tensor shapes into the grid, the compile-time block sizes and the
warp count that ``plugins/<op>/kernel.py`` launches with and that the TensorRT AOT plugins bake into
their kernels. Dimension arguments may be plain ints or symbolic shape expressions (TensorRT's
``tensorrt.plugin.ShapeExpr`` supports ``+ - * //``): grids are built with ``cdiv`` from those
operators only, while block sizes need concrete ints (head_dim, hidden size, head counts are fixed
by the model's weights, so they always are).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAX_BLOCK_HIDDEN = 16384   # RMSNorm keeps one row in registers; bigger rows need a looped kernel
MAX_SPLITS = 64            # flash-decoding splits of the past (combine kernel loads them at once)
MIN_KEYS_PER_SPLIT = 256   # below this a split's work does not pay for its share of the combine


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: Any, b: int) -> Any:
    """Ceiling division that also works on symbolic shape expressions (only ``+`` and ``//``)."""
    return (a + (b - 1)) // b


def _dims_int(name: str, **dims: Any) -> None:
    for key, value in dims.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}: {key} must be a positive int known at build time, got {value!r}")


@dataclass(frozen=True)
class RMSNormLaunch:
    grid: tuple                 # (rows,)
    block: int                  # BLOCK: power of two >= hidden
    num_warps: int


def rms_norm_launch(rows: Any, hidden: int) -> RMSNormLaunch:
    """One program per row of ``hidden`` elements; the whole row stays in registers."""
    _dims_int("rms_norm", hidden=hidden)
    block = next_power_of_2(hidden)
    if block > MAX_BLOCK_HIDDEN:
        raise ValueError(f"rms_norm: hidden size {hidden} exceeds the single-pass kernel's {MAX_BLOCK_HIDDEN}")
    return RMSNormLaunch(grid=(rows,), block=block, num_warps=min(max(block // 256, 1), 16))


@dataclass(frozen=True)
class RotaryLaunch:
    grid: tuple                 # (batch * seq, cdiv(heads, block_heads))
    block_heads: int
    block_half: int             # power of two >= head_dim / 2
    num_warps: int


def rotary_launch(batch: Any, heads: int, seq: Any, head_dim: int) -> RotaryLaunch:
    """One program per (token, block of heads): the token's cos/sin row is loaded once."""
    _dims_int("rotary_embedding", heads=heads, head_dim=head_dim)
    if head_dim % 2:
        raise ValueError(f"rotary_embedding: head_dim must be even (half-split rotation), got {head_dim}")
    block_half = next_power_of_2(head_dim // 2)
    block_heads = min(next_power_of_2(heads), max(1, 4096 // block_half))
    num_warps = min(max(block_heads * block_half // 256, 1), 8)
    return RotaryLaunch(grid=(batch * seq, cdiv(heads, block_heads)), block_heads=block_heads,
                        block_half=block_half, num_warps=num_warps)


@dataclass(frozen=True)
class AttentionLaunch:
    grid: tuple                 # (cdiv(groups * seq, block_m), batch * kv_heads, num_splits)
    block_m: int                # query rows per program (rows = groups * seq of one KV head)
    block_n: int                # keys per inner step
    block_d: int                # head_dim (power of two)
    num_splits: int             # 1 = write Y directly; > 1 = flash-decoding partials + combine kernel
    keys_per_split: int         # multiple of block_n
    num_warps: int
    combine_grid: tuple         # (batch * kv_heads * groups * seq,) when num_splits > 1, else ()
    block_splits: int           # power of two >= num_splits (combine kernel)


def attention_launch(batch: int, q_heads: int, kv_heads: int, seq: int, total: int, head_dim: int,
                     num_sms: int = 132, num_splits: int | None = None) -> AttentionLaunch:
    """Grid and split count for GQA attention over ``total`` = past + seq keys.

    The ``groups = q_heads // kv_heads`` query heads of one KV head are packed as rows of one tile
    (Q [B, Hq, S, D] viewed as [B, Hkv, groups*S, D]), so decode (S = 1) still fills a tile and each
    K/V row is read once per KV head. When the (row-tile x batch x KV head) grid cannot fill the GPU
    (``num_sms`` multiprocessors, 132 = H100 SXM), the keys are split across programs
    (flash-decoding) and a second kernel combines the partial softmax results.
    """
    _dims_int("gqa_attention", batch=batch, q_heads=q_heads, kv_heads=kv_heads, seq=seq, total=total,
              head_dim=head_dim)
    if q_heads % kv_heads:
        raise ValueError(f"gqa_attention: q_heads {q_heads} is not a multiple of kv_heads {kv_heads}")
    if head_dim != next_power_of_2(head_dim) or head_dim < 16:
        raise ValueError(f"gqa_attention: head_dim must be a power of two >= 16, got {head_dim}")
    groups = q_heads // kv_heads
    rows = groups * seq
    block_m = min(max(next_power_of_2(rows), 16), 64 if head_dim <= 64 else 32)
    block_n = 64 if head_dim <= 64 else 32
    m_tiles = cdiv(rows, block_m)
    base_programs = m_tiles * batch * kv_heads
    if num_splits is None:
        want = cdiv(2 * num_sms, base_programs) if base_programs < num_sms else 1
        num_splits = max(1, min(want, MAX_SPLITS, cdiv(total, MIN_KEYS_PER_SPLIT)))
    keys_per_split = cdiv(cdiv(total, num_splits), block_n) * block_n
    num_splits = cdiv(total, keys_per_split)          # no empty split
    num_warps = 4 if head_dim <= 64 else 8
    combine_grid = (batch * kv_heads * rows,) if num_splits > 1 else ()
    return AttentionLaunch(grid=(m_tiles, batch * kv_heads, num_splits), block_m=block_m, block_n=block_n,
                           block_d=head_dim, num_splits=num_splits, keys_per_split=keys_per_split,
                           num_warps=num_warps, combine_grid=combine_grid,
                           block_splits=next_power_of_2(num_splits))


AOT_TACTICS = {1: "decode", 2: "prefill"}   # TensorRT times both at build and keeps the faster one


def attention_aot_launch(batch: Any, q_heads: int, kv_heads: int, seq: Any, head_dim: int,
                         tactic: int) -> AttentionLaunch:
    """Single-pass launch for an AOT plugin, where batch and seq are symbolic at compile time.

    No key splitting (one PTX kernel per tactic); tactic 1 sizes the row tile for decode (the
    ``groups`` rows of one token), tactic 2 for prefill (the largest tile).
    """
    _dims_int("gqa_attention", q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim)
    if tactic not in AOT_TACTICS:
        raise ValueError(f"gqa_attention: unknown tactic {tactic}; expected one of {sorted(AOT_TACTICS)}")
    rows_hint = q_heads // kv_heads if AOT_TACTICS[tactic] == "decode" else 1 << 20
    ref = attention_launch(1, q_heads, kv_heads, rows_hint // (q_heads // kv_heads) or 1, 1, head_dim,
                           num_splits=1)
    groups = q_heads // kv_heads
    return AttentionLaunch(grid=(cdiv(seq * groups, ref.block_m), batch * kv_heads, 1), block_m=ref.block_m,
                           block_n=ref.block_n, block_d=head_dim, num_splits=1, keys_per_split=0,
                           num_warps=ref.num_warps, combine_grid=(), block_splits=1)
