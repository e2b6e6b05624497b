"""One linear of a precision artifact against the checkpoint, through the manifest's weight map.

    finding = check_linear(module, entry, initializers, artifact_dir, sources)

``entry`` is ``manifest["weight_map"]["linears"][module]`` (written by ``llmtrt quantize``, format in
docs/precision.md): the checkpoint tensors the weight is made of (``source``: HF ``[out, in]`` rows that
become the graph weight's columns), its scheme and initializers, and the smoothing folded into it.

Rules (the source weight ``W`` is ``[in, out]``; a smoothing factor ``s`` per input channel makes the
weight that was quantized ``diag(s) W``):

- fp32 / fp16 / bf16: the stored weight is exactly ``diag(s) W`` rounded to its type.
- int8 (per output channel) and int4 (blocked): each dequantized value ``q * scale`` lies within half
  a step of ``diag(s) W`` clipped to the representable range ``[qmin * scale, qmax * scale]`` (AWQ's
  clipped ranges saturate the values beyond them; nothing else may move a value more than half a step),
  plus fp32 rounding. Scales must be finite and positive.

``s`` comes from where the map says the smoothing went: ``folded`` into a norm weight (``s`` = source
norm / the graph's norm, so a corrupted norm shows up as a wrong ``s`` in every linear it feeds) or a
``mul`` node (``s`` = 1 / the initializer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from llmtrt.pipelines.checks.findings import Finding
from llmtrt.pipelines.checks.tensors import read_initializer, rounded_to

_RANGES = {8: (-127, 127), 4: (-8, 7)}
_REL = 1e-5  # fp32 rounding of the scaled products, relative to the value


def covered_initializers(weight_map: dict[str, Any]) -> set[str]:
    """Initializers the linears' checks account for (their weights, scales and smoothed norms)."""
    names = set()
    for entry in (weight_map.get("linears") or {}).values():
        names.update((entry.get("initializers") or {}).values())
        smoothing = entry.get("smoothing") or {}
        if smoothing.get("initializer"):
            names.add(smoothing["initializer"])
    names.update(weight_map.get("norms") or {})
    return names


def check_linear(module: str, entry: dict[str, Any], initializers: dict, base_dir: Path, sources) -> Finding:
    def tensor(name: str) -> np.ndarray:
        if name not in initializers:
            raise KeyError(name)
        return read_initializer(initializers[name], base_dir)

    try:
        source = _source_weight(entry, sources)
        inits = entry.get("initializers") or {}
        scheme = entry.get("scheme")
        if scheme in ("fp32", "fp16", "bf16"):
            stored = tensor(inits["weight"]).astype(np.float32)
            want = source * _smoothing(entry, tensor, sources, source.shape[0])[:, None]
            if any(part.get("tied") for part in entry["source"]):
                want = want.T  # a tied lm_head is read in the embedding's [out, in] layout
            if stored.shape != want.shape:
                return _bad(module, f"weight {inits['weight']} has shape {stored.shape}, its source gives {want.shape}")
            return _exact(module, inits["weight"], stored, want, scheme)
        if scheme in ("int8", "int4"):
            return _quantized(module, entry, tensor, source, sources)
        return _bad(module, f"unknown scheme {scheme!r} in the manifest's weight map")
    except KeyError as missing:
        return _bad(module, f"the weight map names {missing}, which is neither in the graph nor in the checkpoint")


def _source_weight(entry: dict[str, Any], sources) -> np.ndarray:
    """The ``[in, out]`` weight the map's source parts make (fused linears: parts side by side)."""
    parts = []
    for part in entry["source"]:
        full = sources.get(part["tensor"])
        lo, hi = part["rows"]
        parts.append((part["columns"][0], full[lo:hi]))
    parts.sort(key=lambda p: p[0])
    return np.concatenate([p[1] for p in parts], axis=0).T.astype(np.float32)


def _smoothing(entry: dict[str, Any], tensor, sources, rows: int) -> np.ndarray:
    smoothing = entry.get("smoothing")
    if not smoothing:
        return np.ones(rows, dtype=np.float32)
    if smoothing["kind"] == "folded":
        folded = tensor(smoothing["initializer"]).astype(np.float64)
        original = sources.get(smoothing["source"]).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            return (original / folded).astype(np.float32)
    if smoothing["kind"] == "mul":
        with np.errstate(divide="ignore"):
            return (1.0 / tensor(smoothing["initializer"]).astype(np.float64)).astype(np.float32).reshape(-1)
    raise KeyError(f"smoothing kind {smoothing['kind']!r}")


def _quantized(module: str, entry: dict[str, Any], tensor, source: np.ndarray, sources) -> Finding:
    inits, bits = entry["initializers"], int(entry["bits"])
    qmin, qmax = _RANGES[bits]
    values = tensor(inits["values"]).astype(np.float32)
    scale = tensor(inits["scale"]).astype(np.float32)
    if values.size != source.size:
        return _bad(module, f"{inits['values']} holds {values.size} values, its source {source.shape} needs {source.size}")
    values = values.reshape(source.shape)
    if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        return _bad(module, f"{inits['scale']} holds non-finite or non-positive scales")
    if values.min() < qmin or values.max() > qmax:
        return _bad(module, f"{inits['values']} holds values outside {qmin}..{qmax}")
    if bits == 8:
        step = np.broadcast_to(scale.reshape(1, -1), source.shape)
    else:
        block = int(entry["block_size"])
        step = np.repeat(scale.reshape(-1, source.shape[1]), block, axis=0)[: source.shape[0]]
    smoothed = source * _smoothing(entry, tensor, sources, source.shape[0])[:, None]
    if not np.all(np.isfinite(smoothed)):
        return _bad(module, "its smoothing factors are not finite (a norm or smoothing weight of 0 or NaN?)")
    want = np.clip(smoothed, qmin * step, qmax * step)
    err = np.abs(values * step - want)
    allowed = 0.5 * step * (1 + 1e-3) + _REL * np.abs(want)
    worst = np.unravel_index(int(np.argmax(err - allowed)), err.shape)
    over = float(err[worst] / step[worst])
    if err[worst] > allowed[worst]:
        return _bad(module, f"dequantized {entry['scheme']} weight differs from its smoothed source by "
                    f"{err[worst]:.3g} = {over:.2f} quantization steps at {tuple(int(i) for i in worst)} "
                    f"(allowed: half a step)", float(err.max()))
    return Finding("weights", module, True, f"{entry['scheme']} within half a step of the smoothed source "
                   f"(worst {over:.2f} steps)", float(err.max()))


def _exact(module: str, name: str, stored: np.ndarray, want: np.ndarray, scheme: str) -> Finding:
    expected = rounded_to(want, scheme)
    diff = float(np.abs(stored.astype(np.float64) - expected).max()) if stored.size else 0.0
    if diff != 0.0:
        at = np.unravel_index(int(np.argmax(np.abs(stored - expected))), stored.shape)
        return _bad(module, f"{name} differs from its {scheme} source by up to {diff:.3g} at "
                    f"{tuple(int(i) for i in at)}", diff)
    return Finding("weights", module, True, f"{scheme}, exactly its source", 0.0)


def _bad(module: str, detail: str, diff: float | None = None) -> Finding:
    return Finding("weights", module, False, detail, diff)
