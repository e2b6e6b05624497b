"""AWQ's two searches on sampled calibration rows (torch, on the idle cores: :func:`search_threads`).

    s, ratio, err, rtn_err = search_scales(x128, channel_mean, [w_q, w_k, w_v], block_size=128, grid=20)
    amax, err, unclipped = search_clip(x256 / s, w * s[:, None], block_size=128)

Scale search: for r in 0, 1/grid, ..., 1 the per-input-channel scale ``s = mean|x|^r`` (normalized)
is tried on every layer of the group, and the one with the smallest output error
``||x @ W - (x / s) @ Q(diag(s) W)||^2`` wins (r = 0 is round-to-nearest). ``X @ W`` products on n
sampled rows and up to SCALE_COLUMNS evenly spaced output columns per layer: per grid point a
fake quantization of ``in x 512`` weights and an ``n x in x 512`` GEMM, where the former Gram form
(``dW^T X^T X dW``) cost ``in^2 x out``: 32x more at n = 128, in = 4096, before the column sample.
Clip search: per int4 block and output column, the shrunk range ``ratio * max|w|`` whose quantized
block minimizes that block's share of the output error, ``||x_b dW_b||^2 = dW_b^T G_b dW_b`` with
the block's B x B Gram matrix (every sampled row counts, at the cost of B rows); coarse ratios
1, 0.85, 0.7, 0.55 then the best +-0.05: 6 fake quantizations of the layer and 6 ``B x in x out``
products. Work goes in column chunks of about CHUNK_ELEMENTS weights, so temporaries stay small.
Per-column errors are summed in fp32 (128 terms each; the totals in fp64), the fake quantization runs
in place, and the searches use the idle cores: together, 1.1B-shaped int4-awq quantize 204 s -> 152 s on
an idle 2-core machine (docs/precision.md; not measured one change at a time).
"""

from __future__ import annotations

import os

import numpy as np

CHUNK_ELEMENTS = 1 << 21
CLIP_COARSE = (1.0, 0.85, 0.7, 0.55)   # then +-CLIP_FINE around the best: AWQ's 1, 0.95, ..., 0.5 grid
CLIP_FINE = 0.05
SCALE_COLUMNS = 512          # output columns per layer the scale search measures (evenly spaced)


def _torch():
    import torch

    return torch


THREADS_ENV = "LLMTRT_SEARCH_THREADS"


def search_threads() -> int:
    """Torch threads for the searches: $LLMTRT_SEARCH_THREADS when set, else the idle cores
    (:func:`llmtrt.pipelines.cpu.idle_cores`, rounded), at least 1, at most torch's own thread count.
    Torch's thread pool spins: on a busy machine two threads ran the searches 5-10x slower than one;
    on an idle machine one thread leaves a core unused."""
    from llmtrt.pipelines.cpu import idle_cores

    value = os.environ.get(THREADS_ENV)
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            from llmtrt.exporter.errors import LlmtrtUserError

            raise LlmtrtUserError(f"${THREADS_ENV}={value!r}: give a whole number of threads (e.g. 1 or 2)") from None
    return max(1, int(idle_cores() + 0.5))


class search_thread_scope:
    """Torch on :func:`search_threads` threads for the searches (one on a busy machine), restored after."""

    def __enter__(self):
        torch = _torch()
        self.threads = torch.get_num_threads()
        torch.set_num_threads(min(self.threads, search_threads()))
        return self

    def __exit__(self, *exc) -> None:
        _torch().set_num_threads(self.threads)


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
    q = wb / scale  # the one temporary; the rest in place (same arithmetic, same bits)
    return q.round_().clamp_(-8, 7).mul_(scale).reshape(rows, cols)


def _chunks(rows: int, cols: int):
    step = max(1, CHUNK_ELEMENTS // max(1, rows))
    for c in range(0, cols, step):
        yield slice(c, min(cols, c + step))


def sample_rows(x: np.ndarray, n: int) -> np.ndarray:
    """``n`` rows of ``x`` evenly spaced (all of them when it has fewer)."""
    if x.shape[0] <= n:
        return x
    return x[np.unique(np.linspace(0, x.shape[0] - 1, n).round().astype(np.int64))]


def candidate_scales(channel_mean: np.ndarray, ratio: float) -> np.ndarray:
    from llmtrt.pipelines.precision import quant_math as qm

    if ratio == 0:
        return np.ones(len(channel_mean), dtype=np.float32)
    return qm.awq_scales(channel_mean, ratio)


def search_scales(x: np.ndarray, channel_mean: np.ndarray, weights: list[np.ndarray], block_size: int,
                  grid: int, columns: int = SCALE_COLUMNS) -> tuple[np.ndarray, float, float, float]:
    """(scales, best ratio, its error, the error at ratio 0 = round-to-nearest) for one group; the
    errors are measured on ``columns`` evenly spaced output columns of each layer (all when fewer):
    the ratio is one number per group, every column is scaled alike, so a sample of them ranks the
    candidates as all of them do."""
    torch = _torch()
    candidates = [candidate_scales(channel_mean, k / grid) for k in range(grid + 1)]
    errors = np.zeros(grid + 1)
    with torch.no_grad(), search_thread_scope():
        X = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        S = [torch.from_numpy(s) for s in candidates]
        XS = [X / s for s in S]
        for w in weights:
            keep = np.unique(np.linspace(0, w.shape[1] - 1, min(columns, w.shape[1])).round().astype(np.int64))
            W = torch.from_numpy(np.ascontiguousarray(w[:, keep], dtype=np.float32))
            for cols in _chunks(W.shape[0], W.shape[1]):
                Wc = W[:, cols]
                ref = X @ Wc
                for k, s in enumerate(S):
                    d = (XS[k] @ fake_int4(Wc * s[:, None], block_size)).sub_(ref)
                    errors[k] += float(d.square_().sum(dim=0).sum(dtype=torch.float64))
    best = int(np.argmin(errors))
    return candidates[best], best / grid, float(errors[best]), float(errors[0])


def block_grams(x: np.ndarray, block_size: int):
    """G_b = x_b^T x_b for every block b of ``block_size`` input channels: [in/B, B, B] (torch)."""
    torch = _torch()
    X = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    nb = X.shape[1] // block_size
    Xb = X.reshape(X.shape[0], nb, block_size).permute(1, 0, 2)                   # [nb, n, B]
    return torch.bmm(Xb.transpose(1, 2), Xb)


def search_clip(x: np.ndarray, w: np.ndarray, block_size: int, coarse: tuple[float, ...] = CLIP_COARSE,
                fine: float = CLIP_FINE) -> tuple[np.ndarray, float, float]:
    """(block amax [in/B, out] minimizing each block's output error, the resulting total error, the
    total error without clipping) over the rows ``x``.

    A block's error ``||x_b dW_b||^2 = dW_b^T G_b dW_b`` needs only its B x B Gram matrix, so every
    sampled row counts at the cost of B rows. Each (block, column) tries the ``coarse`` ratios of its
    max |w| (1 = no clipping), then its best ratio +- ``fine``: AWQ's grid 1, 0.95, ..., 0.5 in 6
    evaluations instead of 11."""
    torch = _torch()
    rows, cols_total = w.shape
    nb = rows // block_size
    best_amax = np.empty((nb, cols_total), dtype=np.float32)
    total = unclipped = 0.0
    lo, hi = min(coarse), max(coarse)
    with torch.no_grad(), search_thread_scope():
        G = block_grams(x, block_size)                                              # [nb, B, B]
        W = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
        step = max(1, CHUNK_ELEMENTS // max(1, rows))
        for c in range(0, cols_total, step):
            Wc = W[:, c:c + step]
            full = Wc.reshape(nb, block_size, -1).abs().amax(dim=1)                # [nb, cols]

            def error(ratio, Wc=Wc, full=full):
                dw = fake_int4(Wc, block_size, full * ratio).sub_(Wc).reshape(nb, block_size, -1)
                return torch.bmm(G, dw).mul_(dw).sum(dim=1)                       # [nb, cols], fp32

            best_err = torch.full(full.shape, float("inf"), dtype=torch.float32)
            best_ratio = torch.ones_like(full)
            for ratio in coarse:
                err = error(ratio)
                if ratio == 1.0:
                    unclipped += float(err.sum(dtype=torch.float64))
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_ratio = torch.where(better, torch.full_like(full, ratio), best_ratio)
            around = best_ratio.clone()
            for delta in (fine, -fine):
                ratio = torch.clamp(around + delta, lo, hi)
                err = error(ratio)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_ratio = torch.where(better, ratio, best_ratio)
            best_amax[:, c:c + step] = (full * best_ratio).numpy()
            total += float(best_err.sum(dtype=torch.float64))
    return best_amax, total, unclipped
