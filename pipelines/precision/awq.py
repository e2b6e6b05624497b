"""AWQ's two searches, on sampled calibration rows with ``X @ W`` products (torch, CPU threads).

    s, ratio, err, rtn_err = search_scales(x, channel_mean, [w_q, w_k, w_v], block_size=128, grid=20)
    amax = search_clip(x / s, w * s[:, None], block_size=128)

Scale search: for r in 0, 1/grid, ..., 1 the per-input-channel scale ``s = mean|x|^r`` (normalized)
is tried on every layer of the group, and the one with the smallest output error
``sum ||x @ W - (x / s) @ Q(diag(s) W)||^2`` over the sampled rows wins (r = 0 is round-to-nearest).
Clip search: per int4 block and output column, the shrunk range ``ratio * max|w|`` whose quantized
block minimizes that block's share of the output error ``||x_b @ (Q(W_b) - W_b)||^2``.

Cost per layer of ``in x out`` with ``n`` sampled rows: the scale search runs ``grid + 1`` fake
quantizations (``in * out`` each) and as many ``n x in x out`` GEMMs (plus one for the reference);
the clip search ``len(CLIP_RATIOS)`` of each, its GEMMs batched per block. Work goes in column
chunks (about CHUNK_ELEMENTS weights at a time), so the temporaries stay a few MB whatever the layer.
The Gram form (``(Q(W) - W)^T X^T X (Q(W) - W)``) costs ``in^2 * out`` per grid point instead of
``n * in * out``: with n = 128 rows and in = 4096 that is 32x more.
"""

from __future__ import annotations

import numpy as np

CHUNK_ELEMENTS = 1 << 21
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)


def _torch():
    import torch

    return torch


def fake_int4(w, block_size: int, amax=None):
    """Symmetric int4 quantize-dequantize of ``w`` [in, cols] in blocks of ``block_size`` rows (torch),
    the arithmetic of :func:`quant_math.int4_blocked` (``in`` a multiple of ``block_size``)."""
    torch = _torch()
    rows, cols = w.shape
    wb = w.reshape(rows // block_size, block_size, cols)
    if amax is None:
        amax = wb.abs().amax(dim=1, keepdim=True)
    else:
        amax = amax.reshape(rows // block_size, 1, cols)
    scale = torch.where(amax > 1e-12, amax / 7.0, torch.ones_like(amax))
    return (torch.clamp(torch.round(wb / scale), -8, 7) * scale).reshape(rows, cols)


def _chunks(rows: int, cols: int):
    step = max(1, CHUNK_ELEMENTS // max(1, rows))
    for c in range(0, cols, step):
        yield slice(c, min(cols, c + step))


def candidate_scales(channel_mean: np.ndarray, ratio: float) -> np.ndarray:
    from llmtrt.pipelines.precision import quant_math as qm

    if ratio == 0:
        return np.ones(len(channel_mean), dtype=np.float32)
    return qm.awq_scales(channel_mean, ratio)


def search_scales(x: np.ndarray, channel_mean: np.ndarray, weights: list[np.ndarray], block_size: int,
                  grid: int) -> tuple[np.ndarray, float, float, float]:
    """(scales, best ratio, its error, the error at ratio 0 = round-to-nearest) for one group."""
    torch = _torch()
    X = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    candidates = [candidate_scales(channel_mean, k / grid) for k in range(grid + 1)]
    S = [torch.from_numpy(s) for s in candidates]
    errors = np.zeros(grid + 1)
    with torch.no_grad():
        for w in weights:
            W = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
            for cols in _chunks(W.shape[0], W.shape[1]):
                Wc = W[:, cols]
                ref = X @ Wc
                for k, s in enumerate(S):
                    out = (X / s) @ fake_int4(Wc * s[:, None], block_size)
                    errors[k] += float(torch.sum((out - ref).double() ** 2))
    best = int(np.argmin(errors))
    return candidates[best], best / grid, float(errors[best]), float(errors[0])


def search_clip(x: np.ndarray, w: np.ndarray, block_size: int,
                ratios: tuple[float, ...] = CLIP_RATIOS) -> tuple[np.ndarray, float]:
    """(block amax [in/B, out] minimizing each block's output error, the resulting total error)."""
    torch = _torch()
    rows, cols_total = w.shape
    nb = rows // block_size
    X = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    Xb = X.reshape(X.shape[0], nb, block_size).permute(1, 0, 2).contiguous()      # [nb, n, B]
    W = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
    best_amax = np.empty((nb, cols_total), dtype=np.float32)
    total = 0.0
    step = max(1, CHUNK_ELEMENTS // max(1, nb * X.shape[0], rows))
    with torch.no_grad():
        for c in range(0, cols_total, step):
            Wc = W[:, c:c + step]
            full = Wc.reshape(nb, block_size, -1).abs().amax(dim=1)                # [nb, cols]
            best_err = torch.full_like(full, float("inf"), dtype=torch.float64)
            best = full.clone()
            for ratio in ratios:
                amax = full * ratio
                dw = (fake_int4(Wc, block_size, amax) - Wc).reshape(nb, block_size, -1)
                err = torch.sum(torch.bmm(Xb, dw).double() ** 2, dim=1)            # [nb, cols]
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best = torch.where(better, amax, best)
            best_amax[:, c:c + step] = best.numpy()
            total += float(best_err.sum())
    return best_amax, total
