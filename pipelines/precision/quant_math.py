"""Quantization arithmetic, exactly as ONNX QuantizeLinear / DequantizeLinear define it.

    q = saturate(round_half_to_even(x / scale) + zero_point)      # QuantizeLinear
    x' = (q - zero_point) * scale                                   # DequantizeLinear

Everything here is numpy on plain arrays, with no graph in sight, so it is unit-tested against
hand-computed values (tests/pipelines/test_quant_math.py). Conventions used by llmtrt.pipelines.precision.quantize:

- weights of a linear layer are stored ``[in, out]`` (``<module>.weight_t``: ``y = x @ W``);
- int8 weights are symmetric per output channel (axis 1, zero point 0, range -127..127 so that
  ``-q`` is always representable);
- int4 weights are symmetric and blocked along the input axis (axis 0): one scale per
  ``block_size`` consecutive input rows and output column, range -8..7 with ``scale = amax / 7``
  (DequantizeLinear-21 ``block_size``; no zero point, which TensorRT's int4 path requires);
- activations are symmetric per tensor int8 with ``scale = amax / 127``.

Observers turn a sample of ``|x|`` into one ``amax``: ``max``, ``percentile`` and ``entropy``
(TensorRT's KL-divergence calibration: the clipping threshold whose 128-level quantized histogram
is closest to the original one).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

INT8_MAX = 127
INT4_MIN, INT4_MAX = -8, 7
FP16_MAX = 65504.0
_TINY = np.float32(1e-12)
_SMOOTH = 1e-4


def round_half_to_even(x: np.ndarray) -> np.ndarray:
    """ONNX QuantizeLinear rounding: halves go to the even neighbour (2.5 -> 2, 3.5 -> 4, -2.5 -> -2)."""
    return np.rint(x)


def symmetric_scale(amax: np.ndarray | float, qmax: int) -> np.ndarray:
    """``amax / qmax`` as float32; an all-zero channel gets scale 1 (its values quantize to 0 either way)."""
    amax = np.asarray(amax, dtype=np.float32)
    return np.where(amax > _TINY, amax / np.float32(qmax), np.float32(1.0)).astype(np.float32)


def quantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | int, qmin: int, qmax: int) -> np.ndarray:
    """QuantizeLinear with broadcasting scale/zero point; returns int32 values in [qmin, qmax]."""
    x32 = np.asarray(x, dtype=np.float32)
    q = round_half_to_even(x32 / np.asarray(scale, dtype=np.float32)) + np.asarray(zero_point, dtype=np.float32)
    return np.clip(q, qmin, qmax).astype(np.int32)


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | int = 0) -> np.ndarray:
    return ((np.asarray(q, dtype=np.float32) - np.asarray(zero_point, dtype=np.float32))
            * np.asarray(scale, dtype=np.float32)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# half types
# --------------------------------------------------------------------------------------------
def to_fp16(x: np.ndarray) -> tuple[np.ndarray, int]:
    """fp32 -> fp16 (round to nearest even), finite values beyond +-65504 clamped (not sent to inf);
    returns the array and how many values were clamped."""
    v = np.asarray(x, dtype=np.float32)
    big = np.isfinite(v) & (np.abs(v) > FP16_MAX)
    clamped = int(np.count_nonzero(big))
    if clamped:
        v = np.where(big, np.sign(v) * np.float32(FP16_MAX), v)
    return v.astype(np.float16), clamped


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns (uint16), round to nearest even, NaN kept a quiet NaN; finite values
    stay finite unless they are within half a bf16 step of fp32's maximum."""
    v = np.ascontiguousarray(x, dtype=np.float32)
    bits = v.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(v), np.uint16(0x7FC0), rounded)


def bf16_bits_to_fp32(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns -> fp32, exactly."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """fp32 values rounded to the nearest bf16 (still stored as fp32)."""
    return bf16_bits_to_fp32(to_bf16_bits(x))


# --------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------
def int8_per_channel(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel of a ``[in, out]`` weight: (int8 [in, out], scale float32 [out])."""
    scale = symmetric_scale(np.abs(weight).max(axis=0), INT8_MAX)
    return quantize(weight, scale[None, :], 0, -INT8_MAX, INT8_MAX).astype(np.int8), scale


def num_blocks(rows: int, block_size: int) -> int:
    return -(-rows // block_size)


def expand_blocks(scale: np.ndarray, rows: int, block_size: int) -> np.ndarray:
    """A blocked scale ``[ceil(rows/B), out]`` repeated to ``[rows, out]`` (the last block may be short)."""
    return np.repeat(scale, block_size, axis=0)[:rows]


def block_amax(weight: np.ndarray, block_size: int) -> np.ndarray:
    """max |w| over each block of ``block_size`` input rows, per output column: [ceil(in/B), out]."""
    rows = weight.shape[0]
    pad = num_blocks(rows, block_size) * block_size - rows
    padded = np.pad(np.abs(weight), ((0, pad), (0, 0)))
    return padded.reshape(-1, block_size, weight.shape[1]).max(axis=1)


def int4_blocked(weight: np.ndarray, block_size: int, amax: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int4 of a ``[in, out]`` weight, one scale per ``block_size`` input rows and output column.

    ``amax`` ([ceil(in/B), out]) overrides the block maxima (a clipped range; values beyond saturate).
    Returns (int8 array holding values in -8..7, shape [in, out]; scale float32 [ceil(in/B), out]).
    """
    rows = weight.shape[0]
    scale = symmetric_scale(block_amax(weight, block_size) if amax is None else amax, INT4_MAX)
    q = quantize(weight, expand_blocks(scale, rows, block_size), 0, INT4_MIN, INT4_MAX)
    return q.astype(np.int8), scale


def fake_int4_blocked(weight: np.ndarray, block_size: int, amax: np.ndarray | None = None) -> np.ndarray:
    """What DequantizeLinear will hand the MatMul after int4 blocked quantization of ``weight``."""
    q, scale = int4_blocked(weight, block_size, amax)
    return dequantize(q, expand_blocks(scale, weight.shape[0], block_size))


def pack_int4(values: np.ndarray) -> bytes:
    """ONNX INT4 raw_data: two values per byte, the first in the low nibble; an odd count pads with 0."""
    flat = np.asarray(values, dtype=np.int8).reshape(-1)
    if flat.size and (flat.min() < INT4_MIN or flat.max() > INT4_MAX):
        raise ValueError(f"int4 values must lie in {INT4_MIN}..{INT4_MAX}")
    if flat.size % 2:
        flat = np.append(flat, np.int8(0))
    nibbles = (flat.astype(np.uint8) & 0x0F)
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_int4(raw: bytes, count: int) -> np.ndarray:
    """Inverse of :func:`pack_int4`: ``count`` signed values as int8."""
    b = np.frombuffer(raw, dtype=np.uint8)
    nibbles = np.empty(b.size * 2, dtype=np.uint8)
    nibbles[0::2], nibbles[1::2] = b & 0x0F, b >> 4
    signed = nibbles.astype(np.int8)
    signed[signed > INT4_MAX] -= 16
    return signed[:count]


# --------------------------------------------------------------------------------------------
# SmoothQuant and AWQ scales
# --------------------------------------------------------------------------------------------
def smoothquant_scales(act_channel_amax: np.ndarray, weight_row_amax: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's per-input-channel factor ``s_j = amax|X_j|^alpha / amax|W_j|^(1-alpha)``.

    The layer computes ``(X / s) @ (diag(s) W)``; alpha 0.5 splits the outlier range evenly between
    activations and weights. Channels with no signal on either side get 1.
    """
    a = np.maximum(np.asarray(act_channel_amax, dtype=np.float64), 1e-5)
    w = np.maximum(np.asarray(weight_row_amax, dtype=np.float64), 1e-5)
    s = a ** alpha / w ** (1.0 - alpha)
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


def awq_scales(act_channel_mean: np.ndarray, ratio: float) -> np.ndarray:
    """AWQ's candidate scale ``s = mean|X_j|^ratio``, normalized so ``sqrt(max * min) = 1``."""
    s = np.maximum(np.asarray(act_channel_mean, dtype=np.float64), 1e-8) ** ratio
    s = s / np.sqrt(s.max() * s.min())
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


# --------------------------------------------------------------------------------------------
# observers: a 1-D sample of |x| -> amax
# --------------------------------------------------------------------------------------------
def observe_max(abs_values: np.ndarray) -> float:
    return float(np.max(abs_values)) if abs_values.size else 0.0


def observe_percentile(abs_values: np.ndarray, percentile: float = 99.99) -> float:
    if not abs_values.size:
        return 0.0
    return float(np.percentile(abs_values.astype(np.float64), percentile, method="linear"))


def observe_entropy(abs_values: np.ndarray, bins: int = 2048, levels: int = 128) -> float:
    """TensorRT's entropy calibration: the threshold minimizing KL(P || Q) between the |x| histogram
    clipped at the threshold (P, outliers folded into the last bin) and P quantized to ``levels``."""
    top = observe_max(abs_values)
    if top <= 0.0:
        return 0.0
    hist, edges = np.histogram(abs_values, bins=bins, range=(0.0, top))
    hist = hist.astype(np.float64)
    best, best_i = np.inf, bins
    for i in range(levels, bins + 1):
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()
        nonzero = p != 0
        # quantize the first i bins into `levels` groups, spreading each group's mass over its nonzero bins
        groups = np.minimum((np.arange(i) * levels) // i, levels - 1)
        mass = np.bincount(groups, weights=hist[:i], minlength=levels)
        count = np.bincount(groups, weights=nonzero.astype(np.float64), minlength=levels)
        q = np.where(nonzero, mass[groups] / np.maximum(count[groups], 1.0), 0.0)
        ps, qs = p.sum(), q.sum()
        if ps == 0 or qs == 0:
            continue
        p_n, q_n = p / ps, q / qs
        # smooth empty bins of Q (MXNet / TensorRT style) so a clipped outlier costs a finite amount
        q_n = np.where(q_n == 0, _SMOOTH, q_n)
        q_n = q_n / q_n.sum()
        mask = p_n > 0
        kl = float(np.sum(p_n[mask] * np.log(p_n[mask] / q_n[mask])))
        if kl < best:
            best, best_i = kl, i
    return float(edges[best_i])


OBSERVERS: dict[str, Callable[[np.ndarray], float]] = {
    "max": observe_max,
    "percentile": observe_percentile,
    "entropy": observe_entropy,
}
